"""Measure latency tables on the current JAX backend, and check that a table predicts reality.

:func:`profile_space` times every candidate op at every distinct choice-point signature of a
space, plus its fixed parts (:mod:`dnas.latency.space_latency`), on ``jax.devices()[0]``
— CPU, GPU or TPU: the op alone, jitted, inference mode (BatchNorm with running
statistics), at the given batch size; compiled and warmed up, then ``repeats`` timings of
``number`` back-to-back calls each, every call ended by ``block_until_ready``; the entry is
the median per-call time, its std over the repeats, and the count of calls. The dispatch
overhead of an empty jitted call (measured the same way) is subtracted unless
``subtract_overhead=False``, so that the sum of many small ops is not dominated by it; the
overhead is kept in ``meta["overhead_ms"]``.

:func:`validate` builds N random architectures of the space as fixed networks (the supernet
with each choice point statically running its one chosen op; for DARTS, genotypes of the
derived form: two non-``none`` inputs per node), times each end to end the same way, and
compares with the table's prediction: Spearman ρ, mean absolute percentage error, and the
per-architecture pairs.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dnas.latency.space_latency import (OpSignature, SpaceLatencyModel, architecture_latency, describe_space,
                                        latency_matrix)
from dnas.latency.table import LatencyTable, runtime_meta
from dnas.supernet import layers as L
from dnas.supernet.genotype import DARTS_EDGES

_INFER = L.Ctx(train=False)


# ------------------------------------------------------------------------------ timing

def time_call(fn: Callable, args: tuple, repeats: int = 20, warmup: int = 3, number: int | None = None,
              min_repeat_s: float = 0.002) -> dict:
    """Time ``fn(*args)`` (already jitted): compile, ``warmup`` calls, then ``repeats``
    repeats of ``number`` calls (each blocked on). ``number=None`` picks it so that one
    repeat lasts at least ``min_repeat_s``. Returns per-call ``median_ms``, ``std_ms`` (over
    the repeats), ``count`` (calls timed), ``compile_s``."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    if number is None:
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        one = max(time.perf_counter() - t0, 1e-7)
        number = int(min(max(1, np.ceil(min_repeat_s / one)), 1000))
    per_call = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        for _ in range(number):
            jax.block_until_ready(fn(*args))
        per_call.append((time.perf_counter() - t0) / number * 1e3)
    per_call = np.asarray(per_call)
    return {"median_ms": float(np.median(per_call)), "std_ms": float(per_call.std(ddof=1)) if len(per_call) > 1 else 0.0,
            "count": int(len(per_call) * number), "compile_s": compile_s}


def dispatch_overhead(batch_size: int = 1, repeats: int = 20, warmup: int = 3, dtype=jnp.float32) -> float:
    """Median time (ms) of a jitted call that does (almost) nothing: the per-call floor."""
    x = jnp.zeros((batch_size, 4), dtype)
    return time_call(jax.jit(lambda x: x[:1, :1] + 1), (x,), repeats, warmup)["median_ms"]


def numpy_init(init: Callable, seed: int = 0, dtype=jnp.float32):
    """``init(key)``'s pytree filled from numpy: weights ~ 0.1·N(0, 1), BatchNorm ``var`` and
    ``scale`` ones, other state zeros. Timing does not depend on the values, and this avoids
    compiling ``jax.random.normal`` for every shape (seconds each on XLA:CPU)."""
    rng = np.random.default_rng(seed)
    params_shape, state_shape = jax.eval_shape(init, jax.random.PRNGKey(seed))

    def leaf_name(path):
        last = path[-1] if path else None
        return str(getattr(last, "key", getattr(last, "name", "")))

    def fill(is_state):
        def f(path, leaf):
            dt = dtype if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf.dtype
            name = leaf_name(path)
            if name in ("var", "scale"):
                return jnp.ones(leaf.shape, dt)
            if is_state or name == "bias" or not jnp.issubdtype(leaf.dtype, jnp.floating):
                return jnp.zeros(leaf.shape, dt)
            return jnp.asarray(0.1 * rng.standard_normal(leaf.shape), dt)
        return f

    return (jax.tree_util.tree_map_with_path(fill(False), params_shape),
            jax.tree_util.tree_map_with_path(fill(True), state_shape))


def _op_fn(sig: OpSignature, batch_size: int, dtype, seed: int):
    layer = sig.build()
    params, state = numpy_init(layer.init, seed, dtype)
    x = jnp.asarray(np.random.default_rng(seed + 1).standard_normal((batch_size,) + tuple(sig.input_shape)), dtype)

    def run(p, s, x):
        y, _ = layer.apply(p, s, x, _INFER)
        return y + x if sig.residual else y

    return jax.jit(run), (params, state, x)


def profile_signatures(signatures: dict[str, OpSignature], batch_size: int = 1, repeats: int = 20, warmup: int = 3,
                       dtype: str = "float32", subtract_overhead: bool = True, progress: bool = True, seed: int = 0,
                       number: int | None = None) -> tuple[dict, float]:
    """Measure each signature; returns ``({key: entry}, overhead_ms)``."""
    from tqdm.auto import tqdm

    dt = jnp.dtype(dtype)
    overhead = dispatch_overhead(batch_size, repeats, warmup, dt) if subtract_overhead else 0.0
    entries = {}
    bar = tqdm(signatures.items(), desc="profiling ops", unit="op", disable=not progress, leave=False)
    for key, sig in bar:
        bar.set_postfix_str(key[:60])
        fn, args = _op_fn(sig, batch_size, dt, seed)
        t = time_call(fn, args, repeats, warmup, number)
        entries[key] = {"mean_ms": max(t["median_ms"] - overhead, 0.0), "std_ms": t["std_ms"], "count": t["count"]}
    return entries, overhead


def profile_space(space, batch_size: int = 1, input_size: int | None = None, repeats: int = 20, warmup: int = 3,
                  dtype: str = "float32", subtract_overhead: bool = True, progress: bool = True, seed: int = 0,
                  number: int | None = None) -> LatencyTable:
    """A complete :class:`LatencyTable` for ``space`` measured on the current backend."""
    model = describe_space(space, input_size)
    sigs = model.signatures()
    t0 = time.time()
    entries, overhead = profile_signatures(sigs, batch_size, repeats, warmup, dtype, subtract_overhead, progress,
                                           seed, number)
    meta = runtime_meta(dtype=dtype, batch_size=batch_size, input_size=model.input_size, method="profile",
                        space=model.space, space_config=model.config,
                        how=("each op alone, jitted, inference mode (BN running statistics), compiled and warmed up; "
                             "median over repeats of the per-call time of back-to-back calls, each blocked on with "
                             "block_until_ready" + ("; minus the dispatch overhead of an empty jitted call"
                                                    if subtract_overhead else "")),
                        repeats=repeats, warmup=warmup, overhead_ms=overhead, subtract_overhead=subtract_overhead,
                        wall_s=round(time.time() - t0, 2))
    return LatencyTable(entries, meta, name=f"profiled {model.space} table")


# ------------------------------------------------------------------------------ validation

def _static_mix(sample, candidates, x):
    """Run only the chosen op; ``sample`` is a concrete (numpy) op index."""
    i = int(np.asarray(sample))
    y, s = candidates.layers[i].apply(candidates.params[i], candidates.state[i], x, candidates.ctx)
    return y, candidates.state[:i] + (s,) + candidates.state[i + 1:]


def _discrete_space(space):
    """The same space with its loops unrolled (so each choice point sees a static op index)
    and full-width candidates (no partial channels)."""
    cfg = space.config
    names = {f.name for f in dataclasses.fields(cfg)}
    changes = {k: v for k, v in (("unroll", True), ("partial_channels", 1)) if k in names}
    return type(space)(dataclasses.replace(cfg, **changes))


def random_architecture(model: SpaceLatencyModel, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per group, one op index per choice point: uniform for NAS-Bench-201 and the chain
    (``zero`` included where offered), derived-genotype-like for DARTS (every intermediate
    node keeps two incoming edges with non-``none`` ops, the other edges are ``none``)."""
    if model.space != "darts":
        return {g: rng.integers(0, k, size=n) for g, (n, k) in model.groups.items()}
    out = {}
    for g, (n, k) in model.groups.items():
        names = model.op_names[g]
        none = names.index("none")
        ops = [j for j in range(k) if j != none]
        idx = np.full(n, none, np.int64)
        for d in range(2, 6):
            edges = [e for e, (_, dd) in enumerate(DARTS_EDGES) if dd == d]
            for e in rng.choice(edges, 2, replace=False):
                idx[e] = rng.choice(ops)
        out[g] = idx
    return out


def _spearman(a, b) -> float:
    from dnas.latency.fit import spearman
    return spearman(a, b)


def validate(table: LatencyTable, space, n_archs: int = 20, batch_size: int | None = None,
             input_size: int | None = None, seed: int = 0, repeats: int = 10, warmup: int = 2,
             progress: bool = True, subtract_overhead: bool | None = None) -> dict:
    """Predicted (table) vs measured end-to-end latency of ``n_archs`` random architectures.

    ``batch_size``/``input_size``/``subtract_overhead`` default to the table's meta. Returns
    a JSON-ready dict with ``spearman``, ``mape`` (mean |pred − meas| / meas), the mean
    ratio measured/predicted, and the per-architecture records.
    """
    from tqdm.auto import tqdm

    batch_size = int(batch_size or table.meta.get("batch_size") or 1)
    if input_size is None and table.meta.get("space") in (None, space.name):
        input_size = table.meta.get("input_size")
    model = describe_space(space, input_size)
    mats, fixed = latency_matrix(model, table)
    if subtract_overhead is None:
        subtract_overhead = bool(table.meta.get("subtract_overhead", False))
    net = _discrete_space(space)
    params, state = numpy_init(net.init, seed)
    x = jnp.asarray(np.random.default_rng(seed + 1).standard_normal(
        (batch_size, model.input_size, model.input_size, model.in_channels)), jnp.float32)
    overhead = dispatch_overhead(batch_size, repeats, warmup) if subtract_overhead else 0.0
    rng = np.random.default_rng(seed)
    records = []
    for _ in tqdm(range(n_archs), desc="validating", unit="arch", disable=not progress, leave=False):
        arch = random_architecture(model, rng)

        def run(p, s, x, arch=arch):
            with jax.ensure_compile_time_eval():   # keeps the static op indices static under jit
                return net.apply(p, s, x, arch, _static_mix, _INFER)[0]

        t = time_call(jax.jit(run), (params, state, x), repeats, warmup)
        measured = max(t["median_ms"] - overhead, 1e-9)
        predicted = architecture_latency(arch, mats, fixed)
        records.append({"arch": {g: [model.op_names[g][i] for i in v] for g, v in arch.items()},
                        "predicted_ms": predicted, "measured_ms": measured, "measured_std_ms": t["std_ms"],
                        "compile_s": round(t["compile_s"], 3)})
    pred = np.array([r["predicted_ms"] for r in records])
    meas = np.array([r["measured_ms"] for r in records])
    return {"space": model.space, "space_config": model.config, "input_size": model.input_size,
            "batch_size": batch_size, "n_archs": n_archs, "table": table.name, "table_meta": table.meta,
            "device": runtime_meta(), "overhead_ms": overhead,
            "spearman": _spearman(pred, meas) if n_archs > 1 else float("nan"),
            "mape": float(np.mean(np.abs(pred - meas) / meas)),
            "mean_ratio_measured_to_predicted": float(np.mean(meas / np.maximum(pred, 1e-9))),
            "predicted_ms": {"min": float(pred.min()), "max": float(pred.max())},
            "measured_ms": {"min": float(meas.min()), "max": float(meas.max())},
            "archs": records}
