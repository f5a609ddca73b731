"""What the compiled search step is made of: XLA's instructions counted by opcode.

XLA:CPU compiles every fusion to machine code of its own, so a step whose time to compile grew
without more arithmetic usually grew in instructions: slices, reshapes and fusions that move
weights around. This compiles ``make_searcher(SPACE, RELAXATION).step`` for a random batch,
times JAX's tracing, the lowering and XLA's compilation apart (the persistent compile cache
off), and counts the optimised HLO's instructions by opcode (``Compiled.as_text()``) and the
StableHLO's operations (``Lowered.as_text()``). Two source trees compare as

    python benchmarks/hlo_counts.py darts --option channels=8 --option layers=5 --loops scan \\
        --batch-size 8 --image-size 16
    PYTHONPATH=/path/to/other/tree python benchmarks/hlo_counts.py ...   # the same arguments

It times the compile as ``dnas bench`` does (:func:`dnas.bench.run_bench`) but on its own,
using only what older trees have too (``make_searcher``, ``Searcher.compiled_step``, the CLI's
``--loops`` values, ``dnas.options.key_values``), so that it runs unchanged against them. Prints one JSON object. ``--loops`` is ``dnas bench``'s (``unroll``, ``scan-cells``, ``scan``;
default: the space's own choice).
"""
from __future__ import annotations

import argparse
import collections
import json
import re
import time

import jax
import numpy as np

from dnas.cli import LOOP_FLAGS
from dnas.options import key_values
from dnas.searcher import make_searcher


def counts(space: str, relaxation: str, options: dict, batch_size: int, image_size: int,
           top: int = 12) -> dict:
    s = make_searcher(space, relaxation, space_options={"in_channels": 3, "num_classes": 10, **options},
                      total_steps=1000)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch_size, image_size, image_size, 3)).astype(np.float32)
    y = rng.integers(0, 10, batch_size).astype(np.int32)
    batch = s.shard((x, y))
    state = s.replicate(s.init(jax.random.PRNGKey(0)))
    step = s.compiled_step(donate=True)
    t0 = time.perf_counter()
    traced = step.trace(state, batch, batch)
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    compiled = lowered.compile()
    t3 = time.perf_counter()
    hlo = collections.Counter(re.findall(r"= \S+ ([a-z][a-z0-9\-]*)\(", compiled.as_text()))
    stablehlo = collections.Counter(re.findall(r"(stablehlo\.[a-z_]+)", lowered.as_text()))
    return {"space": space, "relaxation": relaxation, "options": options, "batch_size": batch_size,
            "image_size": image_size, "jax_version": jax.__version__,
            "compile_split_s": {"trace": t1 - t0, "lower": t2 - t1, "xla": t3 - t2},
            "hlo_instructions": sum(hlo.values()), "hlo_fusions": hlo["fusion"], "hlo_slices": hlo["slice"],
            "hlo_top": hlo.most_common(top), "stablehlo_ops": sum(stablehlo.values()),
            "stablehlo_top": stablehlo.most_common(top)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("space")
    p.add_argument("--relaxation", default="darts")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="space option (repeatable)")
    p.add_argument("--loops", choices=sorted(LOOP_FLAGS), default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=32)
    args = p.parse_args(argv)
    jax.config.update("jax_enable_compilation_cache", False)
    options = key_values(args.option, "--option")
    if args.loops is not None:
        options["unroll"] = LOOP_FLAGS[args.loops]
    print(json.dumps(counts(args.space, args.relaxation, options, args.batch_size, args.image_size)))


if __name__ == "__main__":
    main()
