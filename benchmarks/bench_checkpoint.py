"""What a checkpoint costs: the finite check of every array and the orbax save, per space.

    python benchmarks/bench_checkpoint.py [--repeats 5]

For the search states of the README's default search (NB201, C=16, N=2), the NAS-Bench-201
paper supernet (C=16, N=5) and the DARTS space (C=16, 8 cells), on 10 classes of 32x32x3
images: the state's size, the median time of ``dnas.rundir.first_nonfinite`` (host copy and
NaN/inf scan) and of ``dnas.rundir.save_checkpoint`` (which includes the check), and the
checkpoint's size on disk. Prints one JSON object per space; ``docs/benchmarks.md`` ("Robust
runs") quotes the figures, which say how small ``--checkpoint-steps`` can be before
checkpoints cost a noticeable share of a step.
"""
import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import jax

from dnas.rundir import first_nonfinite, save_checkpoint
from dnas.searcher import make_searcher

CASES = {
    "nb201-readme": ("nb201", {"channels": 16, "cells_per_stage": 2}),
    "nb201-paper": ("nb201", {"channels": 16, "cells_per_stage": 5}),
    "darts-c16-l8": ("darts", {"channels": 16, "layers": 8}),
}


def measure(space: str, options: dict, repeats: int) -> dict:
    s = make_searcher(space, "darts", space_options={**options, "in_channels": 3, "num_classes": 10})
    state = s.init(jax.random.PRNGKey(0))
    leaves = jax.tree_util.tree_leaves(state)
    check, save = [], []
    with tempfile.TemporaryDirectory() as d:
        for i in range(repeats):
            t = time.perf_counter()
            assert first_nonfinite(state._asdict()) is None
            check.append(time.perf_counter() - t)
            t = time.perf_counter()
            path = save_checkpoint(Path(d) / "ck", state, i + 1)
            save.append(time.perf_counter() - t)
        disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return {"space": space, "options": options, "arrays": len(leaves),
            "state_mb": round(sum(a.size * a.dtype.itemsize for a in leaves) / 2**20, 2),
            "finite_check_ms": round(1e3 * statistics.median(check), 1),
            "save_ms": round(1e3 * statistics.median(save), 1), "disk_mb": round(disk / 2**20, 2),
            "repeats": repeats, "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else jax.__version__,
            "backend": jax.default_backend()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    for name, (space, options) in CASES.items():
        print(json.dumps({"case": name, **measure(space, options, args.repeats)}), flush=True)


if __name__ == "__main__":
    main()
