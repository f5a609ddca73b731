"""Latency tables of a user's model, keyed by choice point (``dnas latency profile --space SPEC``).

A built-in space is described op signature by op signature (:mod:`dnas.latency.space_latency`);
a user's Flax NNX model is not known to dnas beyond its choice points, so its table is per
choice point, the ``choice_point`` granularity :func:`dnas.latency.space_latency.latency_matrix`
already reads: ``choice/<label>/0/<candidate>`` and ``fixed``.

* **Candidates.** Each is timed alone, jitted, in inference mode (BatchNorm running statistics),
  on the input shape it sees in the model (found by tracing the model once with
  ``jax.eval_shape``). The median per-call time is taken minus the dispatch overhead of an empty
  jitted call. Input choices cost 0: selecting a tensor computes nothing.
* **The fixed part.** The model with every choice point on its first candidate, minus those
  candidates' times (clamped at 0).

The table is additive, as every latency table dnas uses is (the expected latency is linear in
the choice probabilities). Its error against whole networks is what ``dnas latency validate``
measures for the built-in spaces; for a user model, time a few fixed networks (``dnas.fix``) to
check it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dnas.latency.profile import LoadMonitor, dispatch_overhead, time_call
from dnas.latency.space_latency import FIXED_KEY, choice_key
from dnas.latency.table import LatencyTable, runtime_meta
from dnas.nnx import Choice, choice_point_uses, first_candidates, fix, set_search_mode


def choice_point_inputs(space, input_shape: tuple, batch_size: int = 1) -> dict[str, list[tuple | None]]:
    """``{label: [input shape of each use]}`` of every :class:`~dnas.nnx.Choice` of ``space``
    (an :class:`~dnas.supernet.nnx_space.NNXSpace`) for inputs of ``(batch_size, *input_shape)``,
    in :func:`~dnas.nnx.choice_point_uses`'s order (a label shared by several choice points has
    one shape per use; ``None`` for a use the model did not call). Found by tracing the model
    once (``jax.eval_shape``) with every choice point on its first candidate."""
    model = set_search_mode(space.module(*space.init(jax.random.PRNGKey(0))), train=False)
    graphdef, state = nnx.split(model)
    shapes: dict = {}

    def run(st, x_):
        traced = nnx.merge(graphdef, st)
        where = {id(point): (label, k) for label, points in choice_point_uses(traced).items()
                 for k, (_, point) in enumerate(points)}

        with first_candidates(lambda choice, x: shapes.__setitem__(where[id(choice)], tuple(x.shape))):
            return traced(x_)

    jax.eval_shape(run, state, jax.ShapeDtypeStruct((batch_size, *input_shape), jnp.float32))
    return {label: [shapes.get((label, k)) for k in range(len(points))]
            for label, points in choice_point_uses(model).items() if isinstance(points[0][1], Choice)}


def _time_module(module: nnx.Module, x, repeats: int, warmup: int, statistic: str) -> float:
    graphdef, state = nnx.split(set_search_mode(nnx.clone(module), train=False))
    fn = jax.jit(lambda st, x_: nnx.merge(graphdef, st)(x_))
    t = time_call(fn, (state, x), repeats, warmup)
    return t["median_ms"] if statistic == "median" else t["min_ms"]


def profile_choice_points(space, input_shape: tuple, batch_size: int = 1, repeats: int = 20, warmup: int = 3,
                          seed: int = 0, statistic: str = "median", subtract_overhead: bool = True,
                          progress: bool = False) -> LatencyTable:
    """A ``choice_point`` latency table of a user's model (see the module docstring).
    ``input_shape``: one example's ``(H, W, C)``."""
    inputs = choice_point_inputs(space, tuple(input_shape), batch_size)
    rng = np.random.default_rng(seed)
    model = space.module(*space.init(jax.random.PRNGKey(seed)))
    entries: dict[str, dict] = {}
    first: dict = {}
    with LoadMonitor() as load:
        overhead = dispatch_overhead(batch_size, repeats, warmup, statistic=statistic) if subtract_overhead else 0.0
        for label, uses in choice_point_uses(model).items():
            point, (group, row) = uses[0][1], space.rows[label]
            if not isinstance(point, Choice):
                for name in point.names:
                    entries[choice_key(group, row, name)] = {"mean_ms": 0.0, "std_ms": 0.0, "count": 0}
                first[label] = (0,)
                continue
            # a shared label costs the sum over its uses (each its own module, at its own input shape)
            used = [(p, jnp.asarray(rng.standard_normal(shape), jnp.float32))
                    for (_, p), shape in zip(uses, inputs[label]) if shape is not None]
            for j, name in enumerate(point.names):
                ms = sum(max(_time_module(p.candidates[j], x, repeats, warmup, statistic) - overhead, 0.0)
                         for p, x in used)
                entries[choice_key(group, row, name)] = {"mean_ms": ms, "std_ms": float("nan"), "count": repeats}
                if progress:
                    print(f"  {label}/{name}: {ms:.4f} ms")
            first[label] = point.names[0]
        net = fix(model, first)
        x = jnp.asarray(rng.standard_normal((batch_size, *input_shape)), jnp.float32)
        whole = _time_module(net, x, repeats, warmup, statistic) - overhead
        chosen = sum(entries[choice_key(*space.rows[label], c)]["mean_ms"] for label, c in first.items()
                     if isinstance(c, str))
        entries[FIXED_KEY] = {"mean_ms": max(whole - chosen, 0.0), "std_ms": float("nan"), "count": repeats}
    meta = runtime_meta(dtype="float32", batch_size=batch_size, input_size=int(input_shape[0]), method="profile",
                        space=space.name, granularity="choice_point", statistic=statistic, repeats=repeats,
                        warmup=warmup, overhead_ms=overhead, subtract_overhead=subtract_overhead,
                        load=load.summary(), wall_s=load.summary()["wall_s"],
                        how=("each candidate of each choice point alone, jitted, inference mode, on its input shape in "
                             f"the model; {statistic} per-call time minus an empty call's dispatch overhead; fixed = "
                             "the model with every choice point on its first candidate, minus those candidates"))
    return LatencyTable(entries, meta, name=f"profiled {space.name} table")
