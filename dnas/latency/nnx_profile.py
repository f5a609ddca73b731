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
from dnas.nnx import Choice, choice_points, fix, set_search_mode
from dnas.supernet.layers import Ctx


def choice_point_inputs(space, input_shape: tuple, batch_size: int = 1) -> dict[str, tuple]:
    """``{label: input shape}`` of every :class:`~dnas.nnx.Choice` of ``space`` (an
    :class:`~dnas.supernet.nnx_space.NNXSpace`) for inputs of ``(batch_size, *input_shape)``."""
    labels = list(space.points)
    samples = {label: np.array([k]) for k, label in enumerate(labels)}
    shapes: dict[str, tuple] = {}

    def record(sample, candidates, x):
        shapes[labels[int(sample)]] = tuple(x.shape)
        outs, _ = candidates.all(x)
        return outs[0], None

    params, stats = space.init(jax.random.PRNGKey(0))
    x = jax.ShapeDtypeStruct((batch_size, *input_shape), jnp.float32)
    jax.eval_shape(lambda p, s, x_: space.apply(p, s, x_, samples, record, Ctx(train=False)), params, stats, x)
    return {label: shapes[label] for label in labels if isinstance(space.points[label], Choice) and label in shapes}


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
    points = choice_points(model)
    entries: dict[str, dict] = {}
    first: dict = {}
    with LoadMonitor() as load:
        overhead = dispatch_overhead(batch_size, repeats, warmup, statistic=statistic) if subtract_overhead else 0.0
        for label, (_, point) in points.items():
            if not isinstance(point, Choice):
                for name in point.names:
                    entries[choice_key(label, 0, name)] = {"mean_ms": 0.0, "std_ms": 0.0, "count": 0}
                first[label] = (0,)
                continue
            x = jnp.asarray(rng.standard_normal(inputs[label]), jnp.float32)
            for name, candidate in zip(point.names, point.candidates):
                ms = max(_time_module(candidate, x, repeats, warmup, statistic) - overhead, 0.0)
                entries[choice_key(label, 0, name)] = {"mean_ms": ms, "std_ms": float("nan"), "count": repeats}
                if progress:
                    print(f"  {label}/{name}: {ms:.4f} ms")
            first[label] = point.names[0]
        net = fix(model, first)
        x = jnp.asarray(rng.standard_normal((batch_size, *input_shape)), jnp.float32)
        whole = _time_module(net, x, repeats, warmup, statistic) - overhead
        chosen = sum(entries[choice_key(label, 0, c)]["mean_ms"] for label, c in first.items() if isinstance(c, str))
        entries[FIXED_KEY] = {"mean_ms": max(whole - chosen, 0.0), "std_ms": float("nan"), "count": repeats}
    meta = runtime_meta(dtype="float32", batch_size=batch_size, input_size=int(input_shape[0]), method="profile",
                        space=space.name, granularity="choice_point", statistic=statistic, repeats=repeats,
                        warmup=warmup, overhead_ms=overhead, subtract_overhead=subtract_overhead,
                        load=load.summary(), wall_s=load.summary()["wall_s"],
                        how=("each candidate of each choice point alone, jitted, inference mode, on its input shape in "
                             f"the model; {statistic} per-call time minus an empty call's dispatch overhead; fixed = "
                             "the model with every choice point on its first candidate, minus those candidates"))
    return LatencyTable(entries, meta, name=f"profiled {space.name} table")
