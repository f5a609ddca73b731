"""Search-step cost of several relaxations, timed in alternation in one process.

``dnas bench`` compiles and times one relaxation per process; on a shared 2-core machine the
load changes between runs, so step *times* of separate runs are hard to compare. This script
compiles each relaxation's step once (same space, batch and data), then times the steps in
round-robin order (A, B, C, A, B, C, ...) and prints one JSON object with, per relaxation,
min and median step time, compile time, XLA temporary memory and XLA FLOPs (as ``dnas bench``
reports them), plus the load average. Read the ratios of the ``min_ms`` figures; memory and
FLOPs are deterministic.

    python benchmarks/bench_relaxations_ab.py darts,pc_darts,gdas --rounds 6
    python benchmarks/bench_relaxations_ab.py darts,proxyless --space chain --rounds 4
    python benchmarks/bench_relaxations_ab.py darts,gdas,snas,pc_darts --space darts --cells 8 --rounds 2
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

from dnas.bench import compiled_costs
from dnas.searcher import make_searcher


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("relaxations", help="comma-separated relaxation names")
    ap.add_argument("--space", default="nb201")
    ap.add_argument("--cells", type=int, default=5, help="NB201: cells per stage; darts: cells (layers)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=1,
                    help="untimed steps per relaxation first; a sampled relaxation's first ~10 steps are "
                         "slower (each new choice of ops touches memory for the first time)")
    args = ap.parse_args()
    opts = {"in_channels": 3, "num_classes": 10}
    if args.space == "nb201":
        opts.update(channels=16, cells_per_stage=args.cells)
    elif args.space == "darts":
        opts.update(channels=16, layers=args.cells)
    elif args.space == "chain":
        from dnas.supernet.chain import ChainConfig  # the CLI's default: width 0.25, <=2 blocks per stage
        opts.update(width_mult=0.25, stem_stride=1, stage_depths=tuple(min(d, 2) for d in ChainConfig.stage_depths))
    rng = np.random.default_rng(0)

    def batch():
        return (rng.standard_normal((args.batch_size, 32, 32, 3)).astype(np.float32),
                rng.integers(0, 10, args.batch_size).astype(np.int32))

    runs = {}
    for name in args.relaxations.split(","):
        s = make_searcher(args.space, name, space_options=opts, total_steps=1000)
        state, tb, vb = s.init(jax.random.PRNGKey(0)), batch(), batch()
        t0 = time.perf_counter()
        step = s.compiled_step(donate=True).lower(state, tb, vb).compile()
        compile_s = time.perf_counter() - t0
        for _ in range(args.warmup):
            state, _ = step(state, tb, vb)
        jax.block_until_ready(state)
        runs[name] = {"step": step, "state": state, "batches": (tb, vb), "times": [], "compile_s": compile_s,
                      "costs": compiled_costs(step)}
    for _ in range(args.rounds):
        for r in runs.values():
            t0 = time.perf_counter()
            r["state"], _ = r["step"](r["state"], *r["batches"])
            jax.block_until_ready(r["state"])
            r["times"].append(time.perf_counter() - t0)
    out = {name: {"min_step_ms": round(1e3 * min(r["times"])), "median_step_ms": round(1e3 * float(np.median(r["times"]))),
                  "compile_s": round(r["compile_s"], 1), "temp_bytes": r["costs"]["temp_bytes"],
                  "flops": r["costs"]["flops"]} for name, r in runs.items()}
    out["warmup_steps"], out["rounds"] = args.warmup, args.rounds
    out["load_average"] = os.getloadavg()
    print(json.dumps(out))


if __name__ == "__main__":
    from dnas.hugepages import reexec_with_hugepages   # as the `dnas` command does (DNAS_HUGEPAGES=0: off)
    reexec_with_hugepages()
    main()
