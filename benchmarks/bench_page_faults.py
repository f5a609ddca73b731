"""Minor page faults, kernel time and wall time of single compiled search steps.

XLA:CPU allocates a step's temporary buffers afresh on each execution; without huge pages
every step faults its working set in again, 4 KiB at a time (``dnas/hugepages.py``). Prints
one JSON object: XLA's temporary bytes, then per step ``getrusage`` deltas (minor faults,
user and system CPU seconds) and the wall time, plus ``GLIBC_TUNABLES``. Run it twice to
compare (this script does not restart itself, so the environment is what you give it):

    DNAS_HUGEPAGES=0 python benchmarks/bench_page_faults.py --space nb201
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python benchmarks/bench_page_faults.py --space nb201
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--space", choices=("nb201", "darts"), default="nb201")
    ap.add_argument("--relaxation", default="darts")
    ap.add_argument("--cells", type=int, default=None, help="nb201: cells per stage (5); darts: cells (8)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()

    import jax
    import numpy as np

    from dnas.searcher import make_searcher
    opts = {"channels": 16, "in_channels": 3, "num_classes": 10}
    opts["cells_per_stage" if args.space == "nb201" else "layers"] = args.cells or (5 if args.space == "nb201" else 8)
    s = make_searcher(args.space, args.relaxation, space_options=opts, total_steps=1000)
    rng = np.random.default_rng(0)

    def batch():
        return (rng.standard_normal((args.batch_size, 32, 32, 3)).astype(np.float32),
                rng.integers(0, 10, args.batch_size).astype(np.int32))

    state, tb, vb = s.init(jax.random.PRNGKey(0)), batch(), batch()
    t0 = time.perf_counter()
    step = s.compiled_step(donate=True).lower(state, tb, vb).compile()
    compile_s = time.perf_counter() - t0
    steps = []
    for _ in range(args.steps):
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        state, _ = step(state, tb, vb)
        jax.block_until_ready(state)
        wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
        steps.append({"wall_s": round(wall, 4), "minor_faults": r1.ru_minflt - r0.ru_minflt,
                      "user_s": round(r1.ru_utime - r0.ru_utime, 3), "sys_s": round(r1.ru_stime - r0.ru_stime, 3)})
    print(json.dumps({"space": args.space, "relaxation": args.relaxation, "config": opts, "batch_size": args.batch_size,
                      "temp_bytes": int(step.memory_analysis().temp_size_in_bytes),
                      "compile_s": round(compile_s, 2),
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                      "glibc_tunables": os.environ.get("GLIBC_TUNABLES"), "load_average": os.getloadavg(),
                      "steps": steps}))


if __name__ == "__main__":
    main()
