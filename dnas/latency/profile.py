"""Measure latency tables on the current JAX backend, and check that a table predicts reality.

:func:`profile_space` times every candidate op at every distinct choice-point signature of a
space, plus its fixed parts (:mod:`dnas.latency.space_latency`), on ``jax.devices()[0]``
— CPU, GPU or TPU — jitted, in inference mode (BatchNorm with running statistics), at the
given batch size. Two methods:

* ``context`` (default): the op's marginal cost inside a compiled program — a dependent chain
  of ``chain`` copies of the op (each with its own parameters) timed against one copy,
  ``(T(chain) - T(1)) / (chain - 1)``. Launching an executable costs tens of µs on XLA:CPU
  (argument handling, output allocation, thread hand-offs), more than many small ops at
  batch 1; a network pays it once, not once per op, and here it cancels.
* ``isolated``: the op alone in its own executable, minus the dispatch overhead of an empty
  jitted call (``subtract_overhead``).

Every executable is compiled and warmed up first; then ``repeats`` timings of ``number``
back-to-back calls (each blocked on) are taken per executable in ``rounds`` round-robin passes
over all of them, so that a burst of load from other processes hits a few timings of many
ops rather than all timings of one; the entry is the ``statistic`` (``median``, or ``min`` —
the uncontended time on a shared machine) of the per-call times. ``meta`` records the method,
the statistic and :class:`LoadMonitor`'s account of the machine's load while measuring.

:func:`validate` builds N random architectures of the space as fixed networks (the supernet
with each choice point statically running its one chosen op; for DARTS, genotypes of the
derived form: two non-``none`` inputs per node), compiles them all, times them in round-robin
passes the same way, and compares with the table's prediction of the compiled network
(:func:`~dnas.latency.space_latency.deployed_latency`; the plain additive sum is reported
too): Spearman ρ, mean absolute percentage error, and the per-architecture pairs.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dnas.latency.space_latency import (OpSignature, architecture_latency, deployed_latency,
                                        describe_space, latency_matrix)
from dnas.latency.table import LatencyTable, runtime_meta
from dnas.supernet.context import Ctx

_INFER = Ctx(train=False)


# ------------------------------------------------------------------------------ timing

#: Statistics of the per-call times over the repeats that a table entry / a measurement can use.
STATISTICS = ("median", "min")


class LoadMonitor:
    """How loaded the machine was while measuring (a context manager).

    Records ``os.getloadavg()`` at the start and the end, and, where ``/proc/stat`` exists
    (Linux), the average number of cores busy over the interval: in total, with this process
    (its CPU time, all threads) and with *other* processes (the difference) — on a shared
    machine the last one says whether the timings competed for the cores."""

    def __enter__(self):
        self.load_start, self._t0, self._stat0, self._self0 = self._loadavg(), time.perf_counter(), self._proc_stat(), \
            self._self_cpu()
        return self

    def __exit__(self, *exc):
        self.load_end, self._t1, self._stat1, self._self1 = self._loadavg(), time.perf_counter(), self._proc_stat(), \
            self._self_cpu()
        return False

    @staticmethod
    def _loadavg():
        try:
            return [round(v, 2) for v in os.getloadavg()]
        except (AttributeError, OSError):
            return None

    @staticmethod
    def _proc_stat():
        try:
            with open("/proc/stat", encoding="ascii") as f:
                vals = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        total = sum(vals[:8])
        return total - idle, total

    @staticmethod
    def _self_cpu():
        import resource
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    def summary(self) -> dict:
        wall = max(self._t1 - self._t0, 1e-9)
        out = {"loadavg_start": self.load_start, "loadavg_end": self.load_end, "wall_s": round(wall, 2)}
        if self._stat0 and self._stat1:
            hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
            busy = (self._stat1[0] - self._stat0[0]) / hz / wall
            mine = (self._self1 - self._self0) / wall
            out.update(busy_cores=round(busy, 2), busy_cores_self=round(mine, 2),
                       busy_cores_other=round(max(busy - mine, 0.0), 2))
        return out


@dataclasses.dataclass
class _Timed:
    """A compiled callable with its arguments, calls per repeat and the per-call times (ms)."""

    fn: Callable
    args: tuple
    number: int = 1
    compile_s: float = 0.0
    samples: list = dataclasses.field(default_factory=list)


def _prepare(fn: Callable, args: tuple, warmup: int, number: int | None, min_repeat_s: float) -> _Timed:
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
    return _Timed(fn, args, number, compile_s)


def _sample(t: _Timed, repeats: int) -> None:
    fn, args = t.fn, t.args
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(t.number):
            jax.block_until_ready(fn(*args))
        t.samples.append((time.perf_counter() - t0) / t.number * 1e3)


def _sample_rounds(items: list[_Timed], repeats: int, rounds: int, progress=None) -> None:
    """``repeats`` timings of every item, taken in ``rounds`` passes over all items (round
    robin), so that a burst of load from other processes hits a few timings of many items
    rather than all timings of one."""
    rounds = max(1, min(rounds, repeats))
    per = [repeats // rounds + (r < repeats % rounds) for r in range(rounds)]
    for n in per:
        for t in items:
            _sample(t, n)
            if progress is not None:
                progress.update(n)


def _stat(samples, statistic: str) -> float:
    if statistic not in STATISTICS:
        raise ValueError(f"unknown statistic {statistic!r}; choose from {', '.join(STATISTICS)}")
    a = np.asarray(samples, np.float64)
    return float(np.median(a) if statistic == "median" else a.min())


def _summary(t: _Timed) -> dict:
    a = np.asarray(t.samples, np.float64)
    return {"median_ms": float(np.median(a)), "min_ms": float(a.min()),
            "std_ms": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "count": int(len(a) * t.number),
            "compile_s": t.compile_s}


def time_call(fn: Callable, args: tuple, repeats: int = 20, warmup: int = 3, number: int | None = None,
              min_repeat_s: float = 0.002) -> dict:
    """Time ``fn(*args)`` (already jitted): compile, ``warmup`` calls, then ``repeats``
    repeats of ``number`` calls (each blocked on). ``number=None`` picks it so that one
    repeat lasts at least ``min_repeat_s``. Returns per-call ``median_ms``, ``min_ms``,
    ``std_ms`` (over the repeats), ``count`` (calls timed), ``compile_s``."""
    t = _prepare(fn, args, warmup, number, min_repeat_s)
    _sample(t, max(1, repeats))
    return _summary(t)


def dispatch_overhead(batch_size: int = 1, repeats: int = 20, warmup: int = 3, dtype=jnp.float32,
                      statistic: str = "median") -> float:
    """Time (ms) of a jitted call that does (almost) nothing: the per-call floor."""
    x = jnp.zeros((batch_size, 4), dtype)
    t = time_call(jax.jit(lambda x: x[:1, :1] + 1), (x,), repeats, warmup)
    return t["median_ms"] if statistic == "median" else t["min_ms"]


def numpy_init(init: Callable | None, seed: int = 0, dtype=jnp.float32, shapes=None):
    """``init(key)``'s pytree filled from numpy: weights ~ 0.1·N(0, 1), BatchNorm ``var`` and
    ``scale`` ones, other state zeros. Timing does not depend on the values, and this avoids
    compiling ``jax.random.normal`` for every shape (seconds each on XLA:CPU). ``shapes``: the
    ``(params, state)`` shapes when known, instead of ``jax.eval_shape(init)``."""
    rng = np.random.default_rng(seed)
    params_shape, state_shape = shapes if shapes is not None else jax.eval_shape(init, jax.random.PRNGKey(seed))

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


#: Profiling methods: each op alone in its own executable, or its marginal cost in a chain.
METHODS = ("context", "isolated")


def _op_fn(sig: OpSignature, batch_size: int, dtype, seed: int, copies: int = 1):
    """The jitted op at ``sig`` and its arguments; ``copies > 1`` runs it ``copies`` times in a
    dependent chain (copy ``k+1`` reads ``x + c·y_k``, or ``x + c·Σ y_k`` when the shapes
    differ, with ``c = 0`` passed at run time so that the compiler can neither drop nor merge
    the copies). Every copy has its own parameters (one stacked argument per leaf, sliced per
    copy, as the spaces stack the parameters of their cells), so that work that depends on the
    parameters only — BatchNorm's rsqrt, weight layout changes — is not shared between copies."""
    layer = sig.build()
    params, state = numpy_init(layer.init, seed, dtype)
    stacked = jax.tree_util.tree_map(lambda a: jnp.stack([a] * copies), (params, state))
    x = jnp.asarray(np.random.default_rng(seed + 1).standard_normal((batch_size,) + tuple(sig.input_shape)), dtype)

    def run(ps, x, c):
        xi = x
        for k in range(copies):
            p, s = jax.tree_util.tree_map(lambda a: a[k], ps)
            y, _ = layer.apply(p, s, xi, _INFER)
            if sig.residual:
                y = y + xi
            if k + 1 < copies:
                xi = x + c * (y if y.shape == x.shape else jnp.sum(y)).astype(x.dtype)
        return y

    return jax.jit(run), (stacked, x, jnp.zeros((), dtype))


def profile_signatures(signatures: dict[str, OpSignature], batch_size: int = 1, repeats: int = 20, warmup: int = 3,
                       dtype: str = "float32", subtract_overhead: bool = True, progress: bool = True, seed: int = 0,
                       number: int | None = None, method: str = "context", chain: int = 8, rounds: int = 1,
                       statistic: str = "median") -> tuple[dict, float]:
    """Measure each signature; returns ``({key: entry}, overhead_ms)``.

    ``method="context"`` (default): the op's marginal cost inside a compiled program — the
    time of a dependent chain of ``chain`` copies minus the time of one copy, divided by
    ``chain - 1``. The fixed cost of launching an executable (argument handling, output
    allocation, thread-pool hand-off: tens of µs on XLA:CPU, more than many small ops
    themselves at batch 1) cancels, as it does for all but one op of a network.
    ``method="isolated"``: the op alone, minus the dispatch overhead of an empty jitted call
    (``subtract_overhead``). The entry is ``statistic`` (median or min) over ``repeats``
    timings, taken in ``rounds`` round-robin passes over all ops."""
    from tqdm.auto import tqdm

    if method not in METHODS:
        raise ValueError(f"unknown profiling method {method!r}; choose from {', '.join(METHODS)}")
    if method == "context" and chain < 2:
        raise ValueError(f"chain must be >= 2 for the context method, got {chain}")
    _stat([0.0], statistic)
    dt = jnp.dtype(dtype)
    overhead = dispatch_overhead(batch_size, repeats, warmup, dt, statistic) if subtract_overhead else 0.0
    copies = (1, chain) if method == "context" else (1,)
    timed: dict[str, list[_Timed]] = {}
    bar = tqdm(signatures.items(), desc="compiling ops", unit="op", disable=not progress, leave=False)
    for key, sig in bar:
        bar.set_postfix_str(key[:60])
        timed[key] = [_prepare(*_op_fn(sig, batch_size, dt, seed, n), warmup, number, 0.002) for n in copies]
    items = [t for ts in timed.values() for t in ts]
    with tqdm(total=len(items) * max(1, repeats), desc="timing ops", unit="run", disable=not progress,
              leave=False) as bar:
        _sample_rounds(items, max(1, repeats), rounds, bar)
    entries = {}
    for key, ts in timed.items():
        if method == "context":
            one, many = (np.asarray(t.samples) for t in ts)
            mean = (_stat(many, statistic) - _stat(one, statistic)) / (chain - 1)
            n = min(len(one), len(many))
            std = float(np.std((many[:n] - one[:n]) / (chain - 1), ddof=1)) if n > 1 else 0.0
            count = sum(len(t.samples) * t.number for t in ts)
        else:
            mean = _stat(ts[0].samples, statistic) - overhead
            std = _summary(ts[0])["std_ms"]
            count = len(ts[0].samples) * ts[0].number
        entries[key] = {"mean_ms": max(mean, 0.0), "std_ms": std, "count": int(count)}
    return entries, overhead


def profile_space(space, batch_size: int = 1, input_size: int | None = None, repeats: int = 20, warmup: int = 3,
                  dtype: str = "float32", subtract_overhead: bool = True, progress: bool = True, seed: int = 0,
                  number: int | None = None, method: str = "context", chain: int = 8, rounds: int = 1,
                  statistic: str = "median") -> LatencyTable:
    """A complete :class:`LatencyTable` for ``space`` measured on the current backend
    (:func:`profile_signatures`; ``meta`` records the method, the statistic and the load of
    the machine while measuring)."""
    model = describe_space(space, input_size)
    sigs = model.signatures()
    with LoadMonitor() as load:
        entries, overhead = profile_signatures(sigs, batch_size, repeats, warmup, dtype, subtract_overhead, progress,
                                               seed, number, method, chain, rounds, statistic)
    if method == "context":
        how = (f"each op's marginal cost in a compiled program: (T(chain of {chain} dependent copies) - T(one copy)) "
               f"/ {chain - 1}, where T is the {statistic} over repeats of the per-call time of back-to-back jitted "
               "calls, each blocked on with block_until_ready; inference mode (BN running statistics); the per-call "
               "launch cost cancels")
    else:
        how = ("each op alone, jitted, inference mode (BN running statistics), compiled and warmed up; "
               f"{statistic} over repeats of the per-call time of back-to-back calls, each blocked on with "
               "block_until_ready" + ("; minus the dispatch overhead of an empty jitted call" if subtract_overhead
                                      else ""))
    meta = runtime_meta(dtype=dtype, batch_size=batch_size, input_size=model.input_size, method="profile",
                        space=model.space, space_config=model.config, how=how, profile_method=method,
                        chain=chain if method == "context" else None, statistic=statistic, repeats=repeats,
                        rounds=rounds, warmup=warmup, overhead_ms=overhead, subtract_overhead=subtract_overhead,
                        load=load.summary(), wall_s=load.summary()["wall_s"])
    return LatencyTable(entries, meta, name=f"profiled {model.space} table")


# ------------------------------------------------------------------------------ validation

def _static_mix(sample, candidates, x):
    """Run only the chosen op; ``sample`` is a concrete (numpy) op index."""
    return candidates.static(int(np.asarray(sample)), x)


def _discrete_space(space):
    """The same space with its loops unrolled (so each choice point sees a static op index)
    and full-width candidates (no partial channels)."""
    cfg = space.config
    names = {f.name for f in dataclasses.fields(cfg)}
    changes = {k: v for k, v in (("unroll", True), ("partial_channels", 1)) if k in names}
    return type(space)(dataclasses.replace(cfg, **changes))


def _spearman(a, b) -> float:
    from dnas.latency.fit import spearman
    return spearman(a, b)


def validate(table: LatencyTable, space, n_archs: int = 20, batch_size: int | None = None,
             input_size: int | None = None, seed: int = 0, repeats: int = 10, warmup: int = 2,
             progress: bool = True, subtract_overhead: bool | None = None, rounds: int = 1,
             statistic: str | None = None) -> dict:
    """Predicted (table) vs measured end-to-end latency of ``n_archs`` random architectures.

    Every network is compiled first, then all are timed in ``rounds`` round-robin passes
    (``repeats`` timings each). ``batch_size``/``input_size``/``subtract_overhead``/``statistic``
    default to the table's meta. The prediction is :func:`~dnas.latency.space_latency.deployed_latency`
    — the table sum over the parts the compiled network runs (NAS-Bench-201 cells drop dead
    and constant edges); ``additive`` reports the plain sum over every chosen op that the
    search's expected latency uses. Returns a JSON-ready dict with ``spearman``, ``mape``
    (mean |pred − meas| / meas), the mean ratio measured/predicted, the load of the machine
    while timing, and the per-architecture records.
    """
    from tqdm.auto import tqdm

    batch_size = int(batch_size or table.meta.get("batch_size") or 1)
    statistic = statistic or table.meta.get("statistic") or "median"
    _stat([0.0], statistic)
    if input_size is None and table.meta.get("space") in (None, space.name):
        input_size = table.meta.get("input_size")
    model = describe_space(space, input_size)
    mats, fixed = latency_matrix(model, table)
    if subtract_overhead is None:
        subtract_overhead = bool(table.meta.get("subtract_overhead", False))
    net = _discrete_space(space)
    if hasattr(net, "unstacked"):   # an NNX model's stacked leaves: filled by the layers' own leaf names
        params, state = net.stacked(*numpy_init(None, seed, shapes=net.weight_shapes()))
    else:
        params, state = numpy_init(net.init, seed)
    x = jnp.asarray(np.random.default_rng(seed + 1).standard_normal(
        (batch_size, model.input_size, model.input_size, model.in_channels)), jnp.float32)
    rng = np.random.default_rng(seed)
    archs, timed = [], []
    with LoadMonitor() as load:
        overhead = dispatch_overhead(batch_size, repeats, warmup, statistic=statistic) if subtract_overhead else 0.0
        for _ in tqdm(range(n_archs), desc="compiling networks", unit="arch", disable=not progress, leave=False):
            arch = space.random_indices(rng)

            def run(p, s, x, arch=arch):
                with jax.ensure_compile_time_eval():   # keeps the static op indices static under jit
                    return net.apply(p, s, x, arch, _static_mix, _INFER)[0]

            archs.append(arch)
            timed.append(_prepare(jax.jit(run), (params, state, x), warmup, None, 0.002))
        with tqdm(total=n_archs * max(1, repeats), desc="timing networks", unit="run", disable=not progress,
                  leave=False) as bar:
            _sample_rounds(timed, max(1, repeats), rounds, bar)
    records = []
    for arch, t in zip(archs, timed):
        summ = _summary(t)
        records.append({"arch": {g: [model.op_names[g][i] for i in v] for g, v in arch.items()},
                        "predicted_ms": deployed_latency(model, table, arch),
                        "predicted_additive_ms": architecture_latency(arch, mats, fixed),
                        "measured_ms": max(_stat(t.samples, statistic) - overhead, 1e-9),
                        "measured_median_ms": summ["median_ms"], "measured_min_ms": summ["min_ms"],
                        "measured_std_ms": summ["std_ms"], "compile_s": round(t.compile_s, 3)})
    meas = np.array([r["measured_ms"] for r in records])

    def scores(pred):
        return {"spearman": _spearman(pred, meas) if n_archs > 1 else float("nan"),
                "mape": float(np.mean(np.abs(pred - meas) / meas)),
                "mean_ratio_measured_to_predicted": float(np.mean(meas / np.maximum(pred, 1e-9)))}

    pred = np.array([r["predicted_ms"] for r in records])
    additive = np.array([r["predicted_additive_ms"] for r in records])
    return {"space": model.space, "space_config": model.config, "input_size": model.input_size,
            "batch_size": batch_size, "n_archs": n_archs, "table": table.name, "table_meta": table.meta,
            "device": runtime_meta(), "statistic": statistic, "repeats": repeats, "rounds": rounds,
            "overhead_ms": overhead, "load": load.summary(), **scores(pred),
            "additive": {**scores(additive), "note": "plain table sum over every chosen op (the search's expected "
                                                     "latency at a one-hot distribution)"},
            "predicted_ms": {"min": float(pred.min()), "max": float(pred.max())},
            "measured_ms": {"min": float(meas.min()), "max": float(meas.max())},
            "archs": records}
