"""Throughput of several seeds in one vmapped program vs the same seeds one after another.

    python benchmarks/bench_seeds.py --space nb201 --channels 16 --cells 1 --seeds 4 --rounds 3

Compiles (a) the single-search step and (b) the ``--seeds S`` step (``Searcher(num_seeds=S)``,
``jax.vmap`` over members; on the CPU with per-member convolutions, see
``dnas.kernels.cpu.branch_conv.member_conv``) and, with ``--jax-rule``, (c) the same vmapped step
with JAX's own batching of convolutions (grouped convolutions). Then times, in interleaved
rounds, S single steps in a row against one vmapped step, and prints one JSON object:
seconds per round of S search steps for each, and the throughput ratio sequential / vmapped
(> 1: the vmapped program is faster).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import numpy as np

from dnas.searcher import make_searcher


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--space", default="nb201", choices=["nb201", "darts", "chain"])
    p.add_argument("--relaxation", default="darts")
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--cells", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--seeds", type=int, default=4, help="number of seeds S")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--jax-rule", action="store_true", help="also time JAX's own (grouped-conv) batching")
    p.add_argument("--out", default=None)
    a = p.parse_args()

    opts = {"in_channels": 3, "num_classes": 10}
    if a.space == "chain":
        opts.update(width_mult=0.25, stage_depths=tuple(min(d, a.cells) for d in (4, 4, 4, 4, 4, 1)), stem_stride=1)
    else:
        opts.update(channels=a.channels, **({"cells_per_stage": a.cells} if a.space == "nb201" else {"layers": a.cells}))
    S, rng = a.seeds, np.random.default_rng(0)

    def batch(lead=()):
        return (rng.standard_normal(lead + (a.batch_size, a.image_size, a.image_size, 3)).astype(np.float32),
                rng.integers(0, 10, lead + (a.batch_size,)).astype(np.int32))

    variants = {}
    single = make_searcher(a.space, a.relaxation, space_options=opts, total_steps=1000)
    tb, vb = batch(), batch()
    t0 = time.perf_counter()
    f1 = jax.jit(single.step).lower(single.init(jax.random.PRNGKey(0)), tb, vb).compile()
    variants["sequential"] = {"fn": f1, "state": single.init(jax.random.PRNGKey(0)), "args": (tb, vb),
                              "calls": S, "compile_s": time.perf_counter() - t0}
    rules = [True, False] if a.jax_rule else [True]
    for member_convs in rules:
        m = make_searcher(a.space, a.relaxation, space_options=opts, total_steps=1000, num_seeds=S)
        m.member_convs = member_convs and m.member_convs
        state = m.init_members(tuple(range(S)))
        tbs, vbs = batch((S,)), batch((S,))
        t0 = time.perf_counter()
        fv = m.compiled_step(donate=False).lower(state, tbs, vbs).compile()
        name = "vmapped" if member_convs else "vmapped_jax_rule"
        variants[name] = {"fn": fv, "state": state, "args": (tbs, vbs), "calls": 1,
                          "compile_s": time.perf_counter() - t0, "member_convs": m.member_convs}

    times = {k: [] for k in variants}
    for k, v in variants.items():  # warm-up
        jax.block_until_ready(v["fn"](v["state"], *v["args"]))
    load = [os.getloadavg()[0]]
    for _ in range(a.rounds):
        for k, v in variants.items():
            t0 = time.perf_counter()
            for _ in range(v["calls"]):
                out = v["fn"](v["state"], *v["args"])
            jax.block_until_ready(out)
            times[k].append(time.perf_counter() - t0)
    load.append(os.getloadavg()[0])
    result = {"space": a.space, "relaxation": a.relaxation, "options": {k: list(v) if isinstance(v, tuple) else v
                                                                        for k, v in opts.items()},
              "batch_size": a.batch_size, "image_size": a.image_size, "seeds": S, "rounds": a.rounds,
              "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
              "load_avg_1min": load, "jax": jax.__version__}
    for k, v in variants.items():
        result[k] = {"median_s_per_S_steps": statistics.median(times[k]), "min_s_per_S_steps": min(times[k]),
                     "compile_s": v["compile_s"], **({"member_convs": v["member_convs"]} if "member_convs" in v else {})}
    for k in variants:
        if k != "sequential":
            result[f"throughput_{k}_vs_sequential"] = (result["sequential"]["median_s_per_S_steps"]
                                                       / result[k]["median_s_per_S_steps"])
    text = json.dumps(result, indent=1)
    print(text)
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    from dnas.hugepages import reexec_with_hugepages   # as the `dnas` command does (DNAS_HUGEPAGES=0: off)
    reexec_with_hugepages()
    main()
