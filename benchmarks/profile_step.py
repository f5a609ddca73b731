"""Where a search step spends its time: one step under ``jax.profiler``, its XLA:CPU thunks
summed by kind.

Compiles ``make_searcher(SPACE, RELAXATION).step`` for a random 32x32x3 batch, runs
``--warmup`` steps, times ``--steps`` more, then traces one step with ``jax.profiler`` and sums
the trace's events by name with the instruction numbers removed (``add_bitcast_fusion.12`` and
``add_bitcast_fusion.40`` are one kind). Two spaces that compute the same function (two forms
of one model, e.g. a copy of a built-in space's module changed in one place, named by its
import spec) can then be compared kind by kind: a kind that takes longer in one of them names
the formulation to look at. Prints one JSON object per space; the trace stays under
``--trace-dir`` for TensorBoard or Perfetto.

    python benchmarks/profile_step.py darts my_pkg.cells:space --option channels=16 --option layers=5

The step runs in the ``dnas`` command's environment: its XLA:CPU flags (:mod:`dnas.xla_flags`)
and huge pages for XLA's buffers (:mod:`dnas.hugepages`, a restart of the script), so the
profile is of the program ``dnas bench`` and ``dnas search`` run (without the flags XLA:CPU
emits other fusions, and the two forms of a space compare differently).

``--option K=V`` is passed to every space (a factory that copies a built-in space should take
its option names: ``channels``, ``layers``, ``cells_per_stage``); where a factory names one
otherwise, ``--builtin-option`` gives the built-in space its own.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import time

from dnas.hugepages import reexec_with_hugepages
from dnas.xla_flags import apply_cpu_defaults

if __name__ == "__main__":     # before JAX starts its backend, as the dnas command does
    reexec_with_hugepages()
    apply_cpu_defaults()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dnas.options import key_values  # noqa: E402
from dnas.searcher import make_searcher  # noqa: E402
from dnas.supernet.spaces import SPACES  # noqa: E402


def event_kinds(trace_dir: str) -> tuple[float, dict]:
    """``(the step's wall time in ms, {kind: (ms, count)})`` from the newest trace under ``trace_dir``."""
    path = sorted(glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "*.trace.json.gz")))[-1]
    events = [e for e in json.load(gzip.open(path))["traceEvents"] if e.get("ph") == "X"]
    kinds: dict = collections.defaultdict(lambda: [0.0, 0])
    for e in events:
        kind = re.sub(r"\.\d+", "", e["name"])
        kinds[kind][0] += e["dur"] / 1e3
        kinds[kind][1] += 1
    wall = kinds.get("ThunkExecutor::Execute (wait for completion)", [0.0])[0]
    return wall, {k: (round(ms, 1), n) for k, (ms, n) in sorted(kinds.items(), key=lambda kv: -kv[1][0])}


def profile(space: str, relaxation: str, options: dict, batch: int, warmup: int, steps: int, trace_dir: str,
            top: int, hlo_path: str | None = None) -> dict:
    s = make_searcher(space, relaxation, space_options={**options, "in_channels": 3, "num_classes": 10},
                      total_steps=1000)
    state = s.replicate(s.init(jax.random.PRNGKey(0)))
    b = s.shard((jax.random.normal(jax.random.PRNGKey(1), (batch, 32, 32, 3)), jnp.zeros((batch,), jnp.int32)))
    t = time.perf_counter()
    step = s.compiled_step(donate=True).lower(state, b, b).compile()   # dnas bench's program
    compile_s = time.perf_counter() - t
    if hlo_path:     # the optimised HLO XLA runs, to diff two spaces' programs instruction by instruction
        os.makedirs(os.path.dirname(hlo_path) or ".", exist_ok=True)
        with open(hlo_path, "w") as f:
            f.write(step.as_text())
    for _ in range(warmup):
        state, _ = jax.block_until_ready(step(state, b, b))
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, _ = jax.block_until_ready(step(state, b, b))
        times.append(time.perf_counter() - t)
    jax.profiler.start_trace(trace_dir)
    state, _ = jax.block_until_ready(step(state, b, b))
    jax.profiler.stop_trace()
    wall, kinds = event_kinds(trace_dir)
    fusions = {k: v for k, v in kinds.items() if not k.startswith(("ThunkExecutor", "$", "PjitFunction", "CommonPjRt"))}
    return {"space": space, "relaxation": relaxation, "options": options, "batch_size": batch,
            "compile_s": round(compile_s, 1), "step_s": [round(x, 3) for x in times],
            "traced_step_ms": round(wall, 1), "kinds": dict(list(fusions.items())[:top]),
            "trace_dir": trace_dir, "jax_version": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", "")}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("spaces", nargs="+", help="built-in space names or import specs (module:factory)")
    ap.add_argument("--relaxation", default="darts")
    ap.add_argument("--option", action="append", default=[], metavar="K=V", help="an option for every space")
    ap.add_argument("--builtin-option", action="append", default=[], metavar="K=V",
                    help="an option for the built-in spaces only (overrides --option)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=25, help="how many kinds to print, longest first")
    ap.add_argument("--trace-dir", default="profile_step")
    ap.add_argument("--compile-cache", default="off", metavar="DIR|off",
                    help="persistent compilation cache (as dnas bench's: a program it compiled loads from it)")
    ap.add_argument("--hlo", action="store_true", help="also write each space's optimised HLO to TRACE_DIR/I-SPACE.hlo")
    args = ap.parse_args(argv)
    from dnas.cli import enable_compile_cache
    enable_compile_cache(args.compile_cache)
    common, builtin = key_values(args.option, "--option"), key_values(args.builtin_option, "--builtin-option")
    for i, space in enumerate(args.spaces):
        options = {**common, **builtin} if space in SPACES else common
        where = os.path.join(args.trace_dir, f"{i}-{re.sub(r'[^A-Za-z0-9_]+', '_', space)}")
        out = profile(space, args.relaxation, options, args.batch_size, args.warmup, args.steps, where, args.top,
                      where + ".hlo" if args.hlo else None)
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
