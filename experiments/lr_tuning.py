"""Joint tuning of the weight learning rate with the architecture (issue 4's demonstration).

From a learning rate 10x too small and 10x too large, a NAS-Bench-201 search on a CIFAR-10
subset (JPEG tree of ``../shared/data/cifar10-jpeg.tar.gz``) runs with ``--tune lr`` (online
hypergradient through one unrolled step) and with the learning rate fixed, over several
seeds; the fixed run at the usual learning rate is the reference. Prints one JSON object and
writes ``results.json``, ``table.md`` and ``lr_trajectories.png`` under ``--out``.

    python experiments/lr_tuning.py --out runs/lr_tuning            # 3 seeds, ~minutes per run on 2 CPU cores

The learning rate is held constant within a run (no cosine decay) so that its trajectory is
the tuning alone.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CIFAR_TAR = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def extract_subset(dest: Path, train_per_class: int, test_per_class: int, tar_path: Path = CIFAR_TAR) -> Path:
    """The first ``train_per_class`` / ``test_per_class`` JPEGs of each class, once."""
    from dnas.data import extract_image_subset

    marker = dest / f".done-{train_per_class}-{test_per_class}"
    if not marker.exists():
        if not tar_path.is_file():
            raise SystemExit(f"{tar_path} not found: this experiment needs the shared CIFAR-10 JPEG tree")
        extract_image_subset(tar_path, dest, {"train": train_per_class, "test": test_per_class})
        marker.write_text("ok\n")
    return dest


def lr_trajectory(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["lr"]) for r in rows if r.get("kind") == "step"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/lr_tuning")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--train-per-class", type=int, default=150)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--channels", type=int, default=8)
    p.add_argument("--cells", type=int, default=1)
    p.add_argument("--lr", type=float, default=0.025, help="the well-chosen learning rate")
    p.add_argument("--hyper-lr", type=float, default=0.05)
    p.add_argument("--hypergrad", default="unrolled")
    args = p.parse_args(argv)

    from dnas.run import SearchConfig, run_search
    from dnas.searcher import Hyper, NonFiniteLossError

    out = Path(args.out)
    data = extract_subset(out / "cifar10-subset", args.train_per_class, 10)
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = [("fixed", args.lr / 10), ("tuned", args.lr / 10), ("fixed", args.lr),
            ("fixed", args.lr * 10), ("tuned", args.lr * 10)]
    results_path = out / "results.json"
    done = {r["run"]: r for r in json.loads(results_path.read_text())} if results_path.exists() else {}
    results = []
    for seed in seeds:
        for mode, lr0 in runs:
            name = f"{mode}-lr{lr0:g}-seed{seed}"
            if name in done:  # resumable: finished runs are kept
                results.append(done[name])
                continue
            cfg = SearchConfig(space="nb201", relaxation="darts", dataset=str(data), epochs=args.epochs,
                               batch_size=args.batch_size, seed=seed, out=str(out / name), progress=False,
                               space_options={"channels": args.channels, "cells_per_stage": args.cells},
                               hyper=Hyper(w_lr=lr0, w_lr_min=lr0, hyper_lr=args.hyper_lr),
                               hypergrad=args.hypergrad, tune=("lr",) if mode == "tuned" else (),
                               log_every=5)
            t0 = time.perf_counter()
            try:
                summary = run_search(cfg)
                final = summary["final"]
                traj = lr_trajectory(out / name)
                rec = {"run": name, "mode": mode, "lr_init": lr0, "seed": seed, "diverged": False,
                       "val_acc": final["val_acc"], "train_acc": final["train_acc"],
                       "lr_final": traj[-1][1], "lr_trajectory": traj, "genotype": summary["genotype"]}
            except NonFiniteLossError as e:
                rec = {"run": name, "mode": mode, "lr_init": lr0, "seed": seed, "diverged": True, "error": str(e)}
            rec["wall_s"] = time.perf_counter() - t0
            results.append(rec)
            results_path.write_text(json.dumps(results, indent=1) + "\n")
            print(json.dumps({k: v for k, v in rec.items() if k != "lr_trajectory"}), file=sys.stderr, flush=True)

    table = summarise(results, runs, seeds)
    (out / "table.md").write_text(table)
    plot(results, out / "lr_trajectories.png")
    print(table)
    return 0


def summarise(results, runs, seeds) -> str:
    import numpy as np

    lines = ["| run | initial lr | final lr (mean over seeds) | final val acc (mean ± std) | diverged |",
             "|---|---|---|---|---|"]
    for mode, lr0 in runs:
        rs = [r for r in results if r["mode"] == mode and r["lr_init"] == lr0]
        ok = [r for r in rs if not r["diverged"]]
        acc = np.array([r["val_acc"] for r in ok]) if ok else np.array([np.nan])
        lr_f = np.exp(np.mean(np.log([r["lr_final"] for r in ok]))) if ok else float("nan")
        lines.append(f"| {mode} | {lr0:g} | {lr_f:.4g} | {acc.mean():.3f} ± {acc.std():.3f} | "
                     f"{len(rs) - len(ok)}/{len(rs)} |")
    return "\n".join(lines) + "\n"


def plot(results, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colors = {}
    for r in results:
        if r["diverged"]:
            continue
        key = (r["mode"], r["lr_init"])
        c = colors.setdefault(key, f"C{len(colors)}")
        s, lr = zip(*r["lr_trajectory"])
        ax.plot(s, lr, color=c, ls="-" if r["mode"] == "tuned" else "--", lw=1.2,
                label=f"{r['mode']} from {r['lr_init']:g}" if r["seed"] == results[0]["seed"] else None)
    ax.set_yscale("log")
    ax.set_xlabel("search step")
    ax.set_ylabel("weight learning rate")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    sys.exit(main())
