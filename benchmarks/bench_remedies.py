"""What each anti-collapse remedy costs per search step, and what DARTS-PT costs per decision.

    python benchmarks/bench_remedies.py [--repeats 3] [--cells 2]

For the NAS-Bench-201 supernet (C=16, N=``--cells``; 2 is the README's default search size) on one batch of
64 random 32x32x3 images: the median time of a compiled first-order search step with each
remedy of ``dnas/remedies.py`` (and FairDARTS's relaxation) against plain DARTS, with compile
times; and DARTS-PT's time to decide one choice point (5 accuracy measurements on 1,024 images,
then 20 fine-tuning steps). Prints one JSON object; ``docs/benchmarks.md`` ("Anti-collapse")
quotes it.
"""
import argparse
import json
import time

import jax
import numpy as np

from bench_hessian import timed   # (first call, median of the repeats), same directory
from dnas.searcher import make_searcher

CASES = {"darts": ("darts", {}), "darts_minus": ("darts", {"darts_minus": {}}),
         "beta_decay": ("darts", {"beta_decay": {}}), "sdarts_rs": ("darts", {"sdarts": {"mode": "rs"}}),
         "sdarts_adv": ("darts", {"sdarts": {"mode": "adv"}}), "fair_darts": ("fair_darts", {})}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--cells", type=int, default=2, help="NB201 cells per stage")
    args = p.parse_args()
    opts = {"channels": 16, "cells_per_stage": args.cells, "in_channels": 3, "num_classes": 10}
    k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    x = jax.random.normal(k1, (args.batch_size, 32, 32, 3))
    y = jax.random.randint(k2, (args.batch_size,), 0, 10)
    out = {}
    for name, (relaxation, remedies) in CASES.items():
        s = make_searcher("nb201", relaxation, space_options=opts, remedies=remedies, total_steps=100)
        state = s.init(jax.random.PRNGKey(0))
        first, med = timed(jax.jit(s.step), state, (x, y), (x, y), repeats=args.repeats)
        out[name] = {"step_s": round(med, 3), "compile_s": round(first - med, 1)}
    for name in CASES:
        out[name]["over_darts"] = round(out[name]["step_s"] / out["darts"]["step_s"], 2)

    from dnas.select import PTOptions, perturbation_select
    s = make_searcher("nb201", "darts", space_options=opts)
    state = s.init(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    vx = rng.normal(size=(1024, 32, 32, 3)).astype(np.float32)
    vy = rng.integers(0, 10, 1024).astype(np.int32)
    t = time.perf_counter()
    perturbation_select(s, state, (vx, vy), (vx, vy), PTOptions(tune_steps=20, eval_examples=1024))
    pt_s = time.perf_counter() - t
    print(json.dumps({"space": "nb201", "channels": 16, "cells_per_stage": args.cells, "batch": args.batch_size, "image": 32,
                      "steps": out, "darts_pt_6_decisions_s": round(pt_s, 1), "repeats": args.repeats,
                      "backend": jax.default_backend(), "jax": jax.__version__}))


if __name__ == "__main__":
    main()
