"""What the RobustDARTS curvature costs: one λ_max(∇²_α L_val) estimate against one search step.

    python benchmarks/bench_hessian.py [--iters 20] [--repeats 3]

For the NAS-Bench-201 supernet (C=16, N=2, the README's default search size) on one batch of
64 random 32x32x3 images: the median time of a compiled search step (first-order DARTS) and of
a compiled ``Searcher.hessian_function(iters)`` (Lanczos, one Hessian-vector product per
step), and their compile times. Prints one JSON object; ``docs/benchmarks.md``
("Anti-collapse") quotes it.
"""
import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

from dnas.searcher import make_searcher


def timed(fn, *args, repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        runs.append(time.perf_counter() - t)
    return first, statistics.median(runs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args()
    s = make_searcher("nb201", "darts", space_options={"channels": 16, "cells_per_stage": 2, "in_channels": 3,
                                                       "num_classes": 10})
    state = s.init(jax.random.PRNGKey(0))
    k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    x = jax.random.normal(k1, (args.batch_size, 32, 32, 3))
    y = jax.random.randint(k2, (args.batch_size,), 0, 10)
    step = jax.jit(s.step)
    step_first, step_s = timed(step, state, (x, y), (x, y), repeats=args.repeats)
    hess = s.hessian_function(args.iters)
    hess_first, hess_s = timed(hess, state, (x, y), repeats=args.repeats)
    print(json.dumps({"space": "nb201", "channels": 16, "cells_per_stage": 2, "batch": args.batch_size,
                      "image": 32, "lanczos_iters": args.iters, "step_s": round(step_s, 3),
                      "hessian_s": round(hess_s, 3), "hessian_over_step": round(hess_s / step_s, 2),
                      "step_compile_s": round(step_first - step_s, 1),
                      "hessian_compile_s": round(hess_first - hess_s, 1), "repeats": args.repeats,
                      "backend": jax.default_backend(), "jax": jax.__version__}))


if __name__ == "__main__":
    main()
