"""Cost of one search step per hypergradient estimator, relative to first order.

Runs ``dnas.bench.run_bench`` once per estimator on the same configuration and prints one
JSON object per estimator (the ``dnas bench`` record plus ``step_ratio`` and
``temp_ratio`` against ``first``), then a summary object. Example (CPU, issue 4's figure):

    python benchmarks/bench_hypergrad.py --space nb201 --channels 16 --cells 1 --batch-size 64

The iterative estimators use ``--inner K`` Hessian-vector products / inner steps
(CG iterations, Neumann terms, unrolled-k steps).
"""
from __future__ import annotations

import argparse
import json

ESTIMATORS = ["first", "unrolled", "unrolled-fd", "unrolled-k", "implicit-cg", "implicit-neumann"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--space", default="nb201")
    p.add_argument("--relaxation", default="darts")
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--cells", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--inner", type=int, default=5)
    p.add_argument("--estimators", default=",".join(ESTIMATORS))
    args = p.parse_args(argv)

    from dnas.bench import run_bench

    key = "cells_per_stage" if args.space == "nb201" else "layers"
    options = {"unrolled-k": {"steps": args.inner}, "implicit-cg": {"iters": args.inner},
               "implicit-neumann": {"terms": args.inner}}
    rows = {}
    for name in args.estimators.split(","):
        r = run_bench(args.space, args.relaxation, batch_size=args.batch_size, steps=args.steps, warmup=1,
                      space_options={"channels": args.channels, key: args.cells},
                      hypergrad=name, hypergrad_options=options.get(name))
        if "first" in rows:
            r["step_ratio"] = r["median_step_ms"] / rows["first"]["median_step_ms"]
            r["temp_ratio"] = r["temp_bytes"] / rows["first"]["temp_bytes"]
        rows[name] = r
        print(json.dumps(r), flush=True)
    print(json.dumps({"summary": {n: {k: r.get(k) for k in ("median_step_ms", "min_step_ms", "compile_s",
                                                              "temp_bytes", "step_ratio", "temp_ratio")}
                                  for n, r in rows.items()}}))


if __name__ == "__main__":
    main()
