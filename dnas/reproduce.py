"""``dnas reproduce nb201``: the NAS-Bench-201 rows of the DNAS methods, from one command.

NAS-Bench-201 (Dong & Yang, ICLR 2020) trained all 15,625 cells of its space, so a search on
it is judged by looking its derived cell up in the benchmark's 200-epoch table instead of
retraining it. The benchmark paper (Table 5) (Chen et al., ICLR 2021, Table 3)
and DrNAS (Chen et al., ICLR 2021, its NAS-Bench-201 table)
report, per method, the mean ± std over 3 searches of the derived cell's test accuracy on
CIFAR-10, CIFAR-100 and ImageNet16-120 (:data:`PUBLISHED`). This module runs those searches
with the benchmark's search protocol pinned (:data:`NB201_PROTOCOL`, the values of xautodl's
NAS-Bench-201 scripts), looks every epoch's derived cell up, and writes

* ``report.json`` / ``report.md``: per method the cells of every seed, mean ± std of the three
  test accuracies of the final cells beside the published row and the random-cell baseline of
  the table (:func:`random_baseline`: mean, median and 90th percentile over all cells);
* ``accuracy.png``: CIFAR-10 test accuracy of the derived cell against the epoch, per method
  (mean and min-max band over seeds);
* ``param_free.png``: the number of parameter-free ops (``none``, ``skip_connect``,
  ``avg_pool_3x3``) in the derived cell against the epoch, so a collapse is seen as it happens;
* ``protocol.json``: the protocol and budget actually run;
* ``<method>/``: each method's ``dnas search`` output (per seed ``seed-<s>/`` when several seeds
  run as one vmapped program).

Budgets (:data:`BUDGETS`): ``paper`` is the protocol itself (C=16, N=5, the whole CIFAR-10
training split, 50 epochs, 250 for GDAS); ``cpu`` is a *proxy* that fits 5 methods × 3 seeds
in about an hour on 2 CPU cores (C=8, N=1, a 10,000-image stratified subset, 10 epochs, seeds
vmapped, α's learning rate scaled so that α's total Adam travel, lr × steps, equals the paper
protocol's); ``smoke`` is for tests. A proxy's cells are evaluated in the benchmark's network
(C=16, N=5, 200 epochs) like any other cell: a proxy tests whether the search *ranks* ops
well at small scale, not whether the supernet it trains is the benchmark's.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

@dataclasses.dataclass(frozen=True)
class Method:
    """One row of the reproduction: a relaxation, the anti-collapse remedies that change its
    search step (:mod:`dnas.remedies`), the published row to compare with, and an optional
    selection after the search (``"pt"``: DARTS-PT, :mod:`dnas.select`, run on the search of
    the method without it)."""

    relaxation: str
    row: str
    remedies: dict = dataclasses.field(default_factory=dict)
    select: str | None = None

    def search_key(self) -> tuple:
        """Methods with equal keys share one search (DARTS-PT selects on DARTS's)."""
        return (self.relaxation, json.dumps(self.remedies, sort_keys=True))


#: The methods this command runs, by name. The first five are the relaxations of the benchmark's
#: own tables; the others are first-order DARTS with an anti-collapse remedy (docs/anticollapse.md).
METHODS = {
    "darts": Method("darts", "DARTS-V1"), "gdas": Method("gdas", "GDAS"), "snas": Method("snas", "SNAS"),
    "pc_darts": Method("pc_darts", "PC-DARTS"), "drnas": Method("drnas", "DrNAS"),
    "darts_minus": Method("darts", "DARTS-", {"darts_minus": {}}),
    "beta_darts": Method("darts", "beta-DARTS", {"beta_decay": {}}),
    "sdarts_rs": Method("darts", "SDARTS-RS", {"sdarts": {"mode": "rs"}}),
    "sdarts_adv": Method("darts", "SDARTS-ADV", {"sdarts": {"mode": "adv"}}),
    "fair_darts": Method("fair_darts", "FairDARTS"),
    "darts_pt": Method("darts", "DARTS-PT", select="pt"),
}
METHOD_ROWS = {name: m.row for name, m in METHODS.items()}
#: The default methods: the benchmark's own rows.
DEFAULT_METHODS = ("darts", "gdas", "snas", "pc_darts", "drnas")
#: The remedies against the collapse, each with first-order DARTS (``--methods remedies``).
REMEDY_METHODS = ("darts", "darts_minus", "beta_darts", "sdarts_rs", "sdarts_adv", "fair_darts", "darts_pt")

#: Published NAS-Bench-201 rows: test accuracy (%) of the derived cell, mean and std over 3
#: searches, from the benchmark's 200-epoch table. DARTS-V1 and GDAS: Dong & Yang, ICLR 2020,
#: Table 5; SNAS, PC-DARTS, DrNAS: Chen et al. (DrNAS), ICLR 2021, NAS-Bench-201 table.
PUBLISHED = {
    "DARTS-V1": {"cifar10": (54.30, 0.00), "cifar100": (15.61, 0.00), "imagenet16_120": (16.32, 0.00)},
    "GDAS": {"cifar10": (93.61, 0.09), "cifar100": (70.70, 0.30), "imagenet16_120": (41.71, 0.98)},
    "SNAS": {"cifar10": (92.77, 0.83), "cifar100": (69.34, 1.98), "imagenet16_120": (43.16, 2.64)},
    "PC-DARTS": {"cifar10": (93.41, 0.30), "cifar100": (67.48, 0.89), "imagenet16_120": (41.31, 0.22)},
    "DrNAS": {"cifar10": (94.36, 0.00), "cifar100": (73.51, 0.00), "imagenet16_120": (46.34, 0.00)},
    # CIFAR-10 test accuracy as the anti-collapse issue quotes it (paper budget); None: not quoted here
    "DARTS-": {"cifar10": (93.80, None), "cifar100": (None, None), "imagenet16_120": (None, None)},
    "beta-DARTS": {"cifar10": (94.36, None), "cifar100": (None, None), "imagenet16_120": (None, None)},
    "DARTS-PT": {"cifar10": (88.0, None), "cifar100": (None, None), "imagenet16_120": (None, None)},
    "SDARTS-RS": {d: (None, None) for d in ("cifar10", "cifar100", "imagenet16_120")},
    "SDARTS-ADV": {d: (None, None) for d in ("cifar10", "cifar100", "imagenet16_120")},
    "FairDARTS": {d: (None, None) for d in ("cifar10", "cifar100", "imagenet16_120")},
}

DATASETS = ("cifar10", "cifar100", "imagenet16_120")
#: Ops without parameters: a cell full of them is the signature of a DARTS collapse.
PARAM_FREE = ("none", "skip_connect", "avg_pool_3x3")

#: The NAS-Bench-201 search protocol (xautodl's ``configs/nas-benchmark/algos/*.config`` and
#: ``exps/NATS-algos/search-cell.py``): supernet C=16, N=5 with affine-free BatchNorm in the
#: cells, batch 64, the training split halved into a weight half and an architecture half;
#: weights by SGD with Nesterov momentum 0.9, lr 0.025 cosine-annealed to 0.001, weight decay
#: 5e-4, gradient-norm clip 5; α by Adam 3e-4, β=(0.5, 0.999), weight decay 1e-3; 50 epochs
#: (250 for GDAS, whose τ falls linearly 10 → 0.1).
NB201_PROTOCOL = {
    "channels": 16, "cells_per_stage": 5, "affine": False, "batch_size": 64,
    "epochs": 50, "epochs_gdas": 250,
    "w_lr": 0.025, "w_lr_min": 0.001, "w_momentum": 0.9, "w_nesterov": True, "w_weight_decay": 5e-4,
    "w_grad_clip": 5.0,
    "a_lr": 3e-4, "a_beta1": 0.5, "a_beta2": 0.999, "a_weight_decay": 1e-3,
    "gdas_tau": (10.0, 0.1),
    "split": "the training split halved: weight half / architecture half",
    "augment": "random crop (pad 4) and horizontal flip",
}

#: Where the protocol differs from DARTS's own CIFAR-10 search settings (``dnas search``'s
#: defaults: :class:`dnas.searcher.Hyper`).
DIFFERS_FROM_DARTS = {
    "w_weight_decay": "5e-4 here, 3e-4 in DARTS",
    "w_nesterov": "Nesterov momentum here, plain momentum in DARTS",
    "cells": "3 stages of 5 NB201 cells with residual reduction blocks, against DARTS's 8-cell "
             "supernet of normal and reduction cells",
    "epochs_gdas": "250 epochs for GDAS (xautodl's config), 50 for the DARTS family as in DARTS",
}

#: The paper's α travel, lr × steps: 3e-4 × 50 epochs × 390 steps (25,000 images, batch 64).
PAPER_ALPHA_TRAVEL = 3e-4 * 50 * 390


@dataclasses.dataclass(frozen=True)
class Budget:
    """How much of the protocol a run affords. ``a_lr=None``: α's learning rate is scaled so
    that lr × steps equals :data:`PAPER_ALPHA_TRAVEL` (the paper's own for ``paper``)."""

    channels: int
    cells_per_stage: int
    epochs: int
    epochs_gdas: int
    batch_size: int = 64
    limit_examples: int | None = None
    a_lr: float | None = 3e-4
    description: str = ""


BUDGETS = {
    "paper": Budget(16, 5, 50, 250, description="the NAS-Bench-201 protocol itself"),
    "cpu": Budget(8, 1, 10, 10, limit_examples=10_000, a_lr=None,
                  description="CPU proxy: C=8, N=1 supernet, a stratified 10,000-image subset, 10 epochs "
                              "(GDAS too), seeds vmapped, α lr scaled to the paper's total α travel"),
    "smoke": Budget(4, 1, 2, 2, batch_size=16, limit_examples=160, a_lr=None,
                    description="smoke test: C=4, N=1, 160 images, 2 epochs"),
}


@dataclasses.dataclass
class ReproduceConfig:
    dataset: str
    nb201_table: str
    out: str
    methods: tuple = DEFAULT_METHODS
    seeds: tuple = (777, 888, 999)
    budget: str = "cpu"
    epochs: int | None = None          # override the budget's epochs (DARTS family)
    epochs_gdas: int | None = None     # override the budget's GDAS epochs
    limit_examples: int | None = None  # override the budget's subset
    data_dir: str | None = None
    progress: bool = True


def random_baseline(table) -> dict:
    """Mean, median and 90th percentile of each test accuracy over every cell of the table:
    what a cell drawn uniformly at random reaches."""
    acc = {d: np.array([row[1][d] for row in table.rows.values()]) for d in DATASETS}
    return {d: {"mean": float(a.mean()), "median": float(np.median(a)), "p90": float(np.percentile(a, 90))}
            for d, a in acc.items()}


def num_param_free(arch: str) -> int:
    from dnas.supernet.genotype import nb201_string_to_ops
    return sum(op in PARAM_FREE for op in nb201_string_to_ops(arch))


def _check(cfg: ReproduceConfig) -> Budget:
    """Every input checked before anything is computed or written."""
    from dnas.relaxations import REGISTRY
    if cfg.budget not in BUDGETS:
        raise ValueError(f"unknown budget {cfg.budget!r}; expected one of {', '.join(BUDGETS)}")
    bad = [m for m in cfg.methods if m not in METHODS]
    if bad:
        raise ValueError(f"--methods: {bad} not reproducible on NAS-Bench-201 here; choose from "
                         f"{', '.join(METHODS)} (other relaxations: "
                         f"{sorted(set(REGISTRY) - {m.relaxation for m in METHODS.values()})})")
    if not cfg.methods or len(set(cfg.methods)) != len(cfg.methods):
        raise ValueError(f"--methods must list distinct methods, got {list(cfg.methods)}")
    if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds):
        raise ValueError(f"--seeds must list distinct seeds, got {list(cfg.seeds)}")
    b = BUDGETS[cfg.budget]
    return dataclasses.replace(
        b, epochs=cfg.epochs or b.epochs, epochs_gdas=cfg.epochs_gdas or cfg.epochs or b.epochs_gdas,
        limit_examples=cfg.limit_examples or b.limit_examples)


def search_config(cfg: ReproduceConfig, budget: Budget, method: str, steps_per_epoch: int | None = None):
    """The :class:`dnas.run.SearchConfig` of one method under the protocol and budget."""
    from dnas.run import SearchConfig
    from dnas.searcher import Hyper

    p = NB201_PROTOCOL
    m = METHODS[method]
    epochs = budget.epochs_gdas if m.relaxation == "gdas" else budget.epochs
    a_lr = budget.a_lr
    if a_lr is None:
        a_lr = PAPER_ALPHA_TRAVEL / max(1, epochs * (steps_per_epoch or 1))
    hyper = Hyper(w_lr=p["w_lr"], w_lr_min=p["w_lr_min"], w_momentum=p["w_momentum"], w_nesterov=p["w_nesterov"],
                  w_weight_decay=p["w_weight_decay"], w_grad_clip=p["w_grad_clip"], a_lr=a_lr,
                  a_beta1=p["a_beta1"], a_beta2=p["a_beta2"], a_weight_decay=p["a_weight_decay"])
    relax_opts = {"tau_max": p["gdas_tau"][0], "tau_min": p["gdas_tau"][1]} if m.relaxation == "gdas" else {}
    return SearchConfig(
        space="nb201", relaxation=m.relaxation, remedies=m.remedies, dataset=cfg.dataset, epochs=epochs, batch_size=budget.batch_size,
        seeds=tuple(cfg.seeds), out=str(Path(cfg.out) / method), limit_examples=budget.limit_examples,
        space_options={"channels": budget.channels, "cells_per_stage": budget.cells_per_stage,
                       "affine": p["affine"]},
        relaxation_options=relax_opts, hyper=hyper, nb201_table=cfg.nb201_table, data_dir=cfg.data_dir,
        progress=cfg.progress, log_every=50)


def _steps_per_epoch(cfg: ReproduceConfig, budget: Budget) -> int:
    from dnas.data import darts_split, load_dataset, num_batches
    data = load_dataset(cfg.dataset, limit_examples=budget.limit_examples, seed=cfg.seeds[0], data_dir=cfg.data_dir)
    (_, wy), (_, ay) = darts_split(data.train_x, data.train_y, seed=cfg.seeds[0])
    return min(num_batches(len(wy), budget.batch_size), num_batches(len(ay), budget.batch_size))


def _epoch_records(run_dir: Path, seeds) -> dict:
    """``{seed: [epoch records]}`` of one method's search output."""
    out = {}
    for s in seeds:
        d = run_dir / f"seed-{s}" if len(seeds) > 1 else run_dir
        recs = [json.loads(line) for line in (d / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if line]
        out[s] = [r for r in recs if r.get("kind") == "epoch"]
    return out


def summarise(method: str, records: dict, selected: dict | None = None) -> dict:
    """Per seed the final cell and its accuracies; per dataset mean ± std over seeds (population
    std, as the benchmark's papers report over their 3 runs), next to the published row.
    ``selected``: ``{seed: {"arch", "nb201"}}`` of a selection after the search (DARTS-PT), which
    replaces the search's own final cell."""
    seeds = {}
    for s, recs in records.items():
        last = recs[-1]
        arch, acc = last["arch"], {d: last[f"nb201_{d}"] for d in DATASETS}
        if selected is not None:
            arch, acc = selected[s]["arch"], {d: selected[s]["nb201"][d] for d in DATASETS}
        seeds[str(s)] = {"arch": arch, **acc, "param_free": num_param_free(arch),
                         "supernet_val_acc": last.get("val_acc"), "entropy": last.get("entropy")}
    stats = {d: {"mean": float(np.mean([v[d] for v in seeds.values()])),
                 "std": float(np.std([v[d] for v in seeds.values()]))} for d in DATASETS}
    row = METHOD_ROWS[method]
    return {"row": row, "seeds": seeds, "accuracy": stats,
            "published": {d: {"mean": m, "std": sd} for d, (m, sd) in PUBLISHED[row].items()}}


def _curves(records: dict, key) -> np.ndarray:
    """(seeds, epochs) array of ``key(record)``; seeds with fewer epochs padded with NaN."""
    n = max(len(r) for r in records.values())
    out = np.full((len(records), n), np.nan)
    for i, recs in enumerate(records.values()):
        out[i, :len(recs)] = [key(r) for r in recs]
    return out


def plot_report(out: Path, all_records: dict, baseline: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    for name, key, ylabel, title in (
            ("accuracy.png", lambda r: r["nb201_cifar10"], "CIFAR-10 test accuracy of the derived cell (%)",
             "NAS-Bench-201: the derived cell during the search"),
            ("param_free.png", lambda r: num_param_free(r["arch"]), "parameter-free ops in the derived cell (of 6)",
             "none / skip_connect / avg_pool_3x3 in the derived cell")):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for method, records in all_records.items():
            c = _curves(records, key)
            x = np.arange(1, c.shape[1] + 1)
            line, = ax.plot(x, np.nanmean(c, 0), marker="o", ms=3, label=f"{method} (mean of {c.shape[0]})")
            ax.fill_between(x, np.nanmin(c, 0), np.nanmax(c, 0), color=line.get_color(), alpha=0.15)
        if name == "accuracy.png":
            ax.axhline(baseline["cifar10"]["mean"], color="grey", ls="--", lw=1, label="random cell, mean")
            ax.axhline(baseline["cifar10"]["p90"], color="grey", ls=":", lw=1, label="random cell, 90th pct")
        else:
            ax.set_ylim(-0.2, 6.2)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("search epoch")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)


def _fmt(m: float | None, s: float | None) -> str:
    if m is None:
        return "—"
    return f"{m:.2f}" if s is None else f"{m:.2f} ± {s:.2f}"


def write_markdown(path: Path, report: dict) -> None:
    b = report["random_cell"]
    lines = [f"# NAS-Bench-201 reproduction ({report['budget']} budget)", "",
             f"{report['budget_description']}. Seeds {', '.join(map(str, report['seeds']))}; "
             f"dataset `{report['dataset']}`; wall time {report['wall_time_s'] / 60:.1f} min.", "",
             "Test accuracy (%) of the final derived cell in the benchmark's 200-epoch table, mean ± std over "
             "seeds; the published row beside it.", "",
             "| method | CIFAR-10 | published | CIFAR-100 | published | ImageNet16-120 | published | "
             "param-free ops | wall (min) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m, r in report["methods"].items():
        a, p = r["accuracy"], r["published"]
        pf = [v["param_free"] for v in r["seeds"].values()]
        cells = " | ".join(f"{_fmt(a[d]['mean'], a[d]['std'])} | {_fmt(p[d]['mean'], p[d]['std'])}" for d in DATASETS)
        lines.append(f"| {m} ({r['row']}) | {cells} | {np.mean(pf):.1f} | {r['wall_time_s'] / 60:.1f} |")
    lines.append("| random cell: mean / median / 90th pct | "
                 + " | ".join(f"{b[d]['mean']:.2f} / {b[d]['median']:.2f} / {b[d]['p90']:.2f} |" for d in DATASETS)
                 + " | |")
    lines += ["", "Derived cells:", ""]
    for m, r in report["methods"].items():
        for s, v in r["seeds"].items():
            lines.append(f"- {m}, seed {s}: `{v['arch']}` ({v['cifar10']:.2f} %, {v['param_free']} parameter-free)")
    lines += ["", "![accuracy](accuracy.png)", "", "![parameter-free ops](param_free.png)", ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def _select_pt(run_dir: Path, out: Path, seeds) -> dict:
    """DARTS-PT (:mod:`dnas.select`, default options) on every seed of a finished search:
    ``{seed: {"arch", "nb201"}}``."""
    from dnas.select import select_run
    picked = {}
    for s in seeds:
        rec = select_run(run_dir, "pt", out=out / f"seed-{s}", seed=s if len(seeds) > 1 else None)
        picked[s] = {"arch": rec["genotype"]["arch"], "nb201": rec["nb201"]}
    return picked


def run_reproduce(cfg: ReproduceConfig) -> dict:
    """Run every method's search (seeds vmapped), then write the report; returns it."""
    from dnas.nb201_table import NB201Table
    from dnas.run import run_search

    budget = _check(cfg)
    table = NB201Table.load(cfg.nb201_table)      # a bad table fails before any compute
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out} is not empty: choose a new directory")
    steps = _steps_per_epoch(cfg, budget)
    t0 = time.perf_counter()
    configs, searched_by = {}, {}   # one search per search key: DARTS-PT selects on DARTS's search
    for m in sorted(cfg.methods, key=lambda m: METHODS[m].select is not None):
        key = METHODS[m].search_key()
        if key not in searched_by:
            searched_by[key] = m
            configs[m] = search_config(cfg, budget, m, steps)
    out.mkdir(parents=True, exist_ok=True)
    protocol = {"benchmark": "nb201", "budget": cfg.budget, "budget_description": budget.description,
                "protocol": NB201_PROTOCOL, "differs_from_darts": DIFFERS_FROM_DARTS,
                "run": {**dataclasses.asdict(budget), "steps_per_epoch": steps,
                        "a_lr": {m: c.hyper.a_lr for m, c in configs.items()},
                        "epochs": {m: c.epochs for m, c in configs.items()}},
                "seeds": list(cfg.seeds), "dataset": cfg.dataset, "nb201_table": str(cfg.nb201_table)}
    (out / "protocol.json").write_text(json.dumps(protocol, indent=2) + "\n", encoding="utf-8")
    methods, all_records = {}, {}
    for m in sorted(cfg.methods, key=lambda m: METHODS[m].select is not None):   # searches first
        t = time.perf_counter()
        searcher_method = searched_by[METHODS[m].search_key()]
        scfg = configs[searcher_method]
        if searcher_method == m:
            run_search(scfg)
            all_records[m] = _epoch_records(Path(scfg.out), cfg.seeds)
        records = all_records[searcher_method]
        selected = None
        if METHODS[m].select == "pt":
            selected = _select_pt(Path(scfg.out), out / m, cfg.seeds)
        methods[m] = {**summarise(m, records, selected), "wall_time_s": time.perf_counter() - t,
                      "epochs": scfg.epochs, "a_lr": scfg.hyper.a_lr, "search": searcher_method}
    methods = {m: methods[m] for m in cfg.methods}
    baseline = random_baseline(table)
    report = {"benchmark": "nb201", "budget": cfg.budget, "budget_description": budget.description,
              "seeds": list(cfg.seeds), "dataset": cfg.dataset, "methods": methods, "random_cell": baseline,
              "wall_time_s": time.perf_counter() - t0}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    write_markdown(out / "report.md", report)
    plot_report(out, all_records, baseline)
    return report


__all__ = ["BUDGETS", "NB201_PROTOCOL", "PUBLISHED", "ReproduceConfig", "run_reproduce", "random_baseline"]
