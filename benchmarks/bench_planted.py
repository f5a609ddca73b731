"""Planted-architecture recovery per relaxation (dnas/planted.py); prints one JSON object.

    python benchmarks/bench_planted.py                                   # the budgets of docs/reproduce.md
    python benchmarks/bench_planted.py --runs gdas:2000:0.01 snas:600:0.02

Each run is RELAXATION:STEPS:ALPHA_LR; every run searches the default plant and a second one.
"""
from __future__ import annotations

import argparse
import json
import time

DEFAULT_RUNS = ["darts:300:0.01", "pc_darts:600:0.003", "drnas:600:0.02", "snas:600:0.02", "gdas:2000:0.01"]
OTHER_PLANT = ("nor_conv_1x1", "avg_pool_3x3", "skip_connect", "nor_conv_3x3", "nor_conv_3x3", "nor_conv_1x1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", nargs="+", default=DEFAULT_RUNS)
    args = ap.parse_args()
    from dnas.planted import DEFAULT_PLANT, PlantedTask, planted_search

    results = []
    for run in args.runs:
        name, steps, a_lr = run.split(":")
        for plant in (DEFAULT_PLANT, OTHER_PLANT):
            t0 = time.perf_counter()
            r = planted_search(name, int(steps), a_lr=float(a_lr), task=PlantedTask(plant=plant))
            r.pop("arch")
            r.pop("problem")
            r["wall_s"] = round(time.perf_counter() - t0, 1)
            results.append(r)
            print(f"{name:9s} {steps:>5s} steps a_lr {a_lr:6s}: {r['recovered']}/{r['of']} {r['chosen']}", flush=True)
    print(json.dumps({"results": results}))


if __name__ == "__main__":
    main()
