"""xautodl's GDAS at the same small budget, on the same data, as ``dnas reproduce nb201 --budget cpu``.

Is GDAS's poor cell at a small CPU budget the budget or dnas's implementation? This runs the
reference implementation — xautodl's ``GDAS`` search network (``get_cell_based_tiny_net``,
affine-free, untracked BatchNorm, as in xautodl's ``exps/NATS-algos/search-cell.py``) — with
the search loop of that script (per iteration: a weight step on the weight half, gradient
norm clipped to 5, then an α step on the architecture half; τ linear from 10 to 0.1 over the
epochs), on exactly the batches dnas's ``cpu`` budget feeds each seed (the same subset, split,
order and augmentation, from dnas's data functions), with the same supernet size, optimisers
and α learning rate. Every epoch's derived cell is looked up in the NAS-Bench-201 table.

    pip install torch==2.13.0 && pip install --no-deps xautodl
    python experiments/gdas_peer.py --dataset PATH --nb201-table CSV --out runs/gdas_peer

Prints one JSON object (per seed: final cell, its accuracies, the per-epoch cells and the
supernet's accuracies) and writes it to ``OUT/gdas_peer.json``. Compare with
``OUT_OF_REPRODUCE/gdas/seed-*/metrics.jsonl``.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np


def run_seed(seed: int, args, table) -> dict:
    import jax
    import torch
    import torch.nn.functional as F
    from xautodl.models import get_cell_based_tiny_net

    from dnas.data import augment_batch, darts_split, epoch_batches, load_dataset, num_batches
    from dnas.device_loop import ARCH_STREAM_OFFSET, AUG_SALT
    from dnas.reproduce import BUDGETS, NB201_PROTOCOL, PAPER_ALPHA_TRAVEL
    from dnas.supernet.genotype import NB201_OPS

    budget = BUDGETS[args.budget]
    epochs = args.epochs or budget.epochs_gdas
    p = NB201_PROTOCOL
    torch.manual_seed(seed)
    data = load_dataset(args.dataset, limit_examples=budget.limit_examples, seed=seed)
    (wx, wy), (ax, ay) = darts_split(data.train_x, data.train_y, seed=seed)
    steps = min(num_batches(len(wy), budget.batch_size), num_batches(len(ay), budget.batch_size))
    a_lr = budget.a_lr if budget.a_lr is not None else PAPER_ALPHA_TRAVEL / (epochs * steps)
    net = get_cell_based_tiny_net({
        "name": "GDAS", "C": budget.channels, "N": budget.cells_per_stage, "max_nodes": 4,
        "num_classes": data.num_classes, "space": list(NB201_OPS), "affine": False, "track_running_stats": False})
    w_opt = torch.optim.SGD(net.get_weights(), lr=p["w_lr"], momentum=p["w_momentum"], nesterov=True,
                            weight_decay=p["w_weight_decay"])
    a_opt = torch.optim.Adam(net.get_alphas(), lr=a_lr, betas=(p["a_beta1"], p["a_beta2"]),
                             weight_decay=p["a_weight_decay"])
    total = epochs * steps
    aug = jax.jit(augment_batch, static_argnames=("pad", "flip"))
    k_aug = jax.random.fold_in(jax.random.PRNGKey(seed), AUG_SALT)   # dnas.run's augmentation stream

    def to_torch(x, y):
        return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2))), torch.from_numpy(y.astype(np.int64))

    tau_max, tau_min = p["gdas_tau"]
    per_epoch, step = [], 0
    for epoch in range(epochs):
        net.set_tau(tau_max - (tau_max - tau_min) * epoch / max(epochs - 1, 1))
        net.train()
        accs = []
        for (xt, yt), (xv, yv) in zip(epoch_batches(wx, wy, budget.batch_size, seed=seed, epoch=epoch),
                                      epoch_batches(ax, ay, budget.batch_size, seed=seed + ARCH_STREAM_OFFSET, epoch=epoch)):
            kt, kv = jax.random.split(jax.random.fold_in(k_aug, step))
            xt, xv = aug(kt, xt, pad=4, flip=True), aug(kv, xv, pad=4, flip=True)
            (xt, yt), (xv, yv) = to_torch(xt, yt), to_torch(xv, yv)
            lr = p["w_lr_min"] + 0.5 * (p["w_lr"] - p["w_lr_min"]) * (1 + math.cos(math.pi * step / total))
            for g in w_opt.param_groups:
                g["lr"] = lr
            w_opt.zero_grad()
            loss = F.cross_entropy(net(xt)[1], yt)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.get_weights(), p["w_grad_clip"])
            w_opt.step()
            a_opt.zero_grad()
            logits = net(xv)[1]
            F.cross_entropy(logits, yv).backward()
            a_opt.step()
            accs.append(float((logits.argmax(-1) == yv).float().mean()))
            step += 1
        arch = net.genotype().tostr()
        probs = torch.softmax(net.arch_parameters.detach(), -1).numpy()
        ent = float(-(probs * np.log(probs)).sum(-1).mean())
        per_epoch.append({"epoch": epoch, "arch": arch, "val_acc": float(np.mean(accs)), "entropy": ent,
                          **table.lookup(arch)})
        print(json.dumps({"seed": seed, **per_epoch[-1]}), flush=True)
    return {"seed": seed, "final": per_epoch[-1], "epochs": per_epoch, "a_lr": a_lr, "steps": step}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--nb201-table", required=True)
    ap.add_argument("--seeds", default="777,888,999")
    ap.add_argument("--budget", default="cpu")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import torch

    from dnas.nb201_table import NB201Table
    torch.set_num_threads(args.threads)
    table = NB201Table.load(args.nb201_table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    runs = [run_seed(int(s), args, table) for s in args.seeds.split(",")]
    result = {"what": "xautodl GDAS, dnas reproduce's budget and batches", "budget": args.budget,
              "runs": runs, "wall_time_s": time.perf_counter() - t0,
              "cifar10_mean": float(np.mean([r["final"]["cifar10"] for r in runs])),
              "cifar10_std": float(np.std([r["final"]["cifar10"] for r in runs]))}
    (out / "gdas_peer.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}))


if __name__ == "__main__":
    main()
