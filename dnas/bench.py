"""``dnas bench``: time one compiled search step and report XLA's own cost figures.

Prints one JSON object: median step time after warm-up, compile time (``compile_s``, split into
JAX's tracing, the lowering to StableHLO and XLA's compilation in ``compile_split_s``; with the
persistent compile cache on, the XLA part is a cache read), XLA's FLOP estimate
and temporary-memory size of the compiled step (``Compiled.cost_analysis()`` /
``memory_analysis()``), device kind and count, jax version, and the configuration. Every
later figure of the project (relaxations, hypergradients, latency, scaling) is measured with
it, so its output is the machine-readable record.
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Any

import jax
import numpy as np

from dnas.hugepages import trim_heap
from dnas.searcher import Hyper, make_searcher


def median_ms(f, *args, n: int = 5, digits: int = 3) -> float:
    """Median wall time in ms of ``n`` calls of ``f(*args)`` after one warm-up call (the
    micro-benchmarks in ``benchmarks/`` use it)."""
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t0)
    return round(float(np.median(times)) * 1e3, digits)


def _first(x):
    if isinstance(x, (list, tuple)):
        return x[0] if x else {}
    return x or {}


def compiled_costs(compiled) -> dict[str, Any]:
    """FLOPs and memory sizes XLA reports for a compiled computation (None if unavailable)."""
    out: dict[str, Any] = {"flops": None, "bytes_accessed": None, "temp_bytes": None,
                           "argument_bytes": None, "output_bytes": None}
    try:
        cost = _first(compiled.cost_analysis())
        out["flops"] = float(cost.get("flops")) if cost.get("flops") is not None else None
        if cost.get("bytes accessed") is not None:
            out["bytes_accessed"] = float(cost["bytes accessed"])
    except Exception:  # noqa: BLE001 - backends may not implement it
        pass
    try:
        mem = compiled.memory_analysis()
        if mem is not None:
            out["temp_bytes"] = int(mem.temp_size_in_bytes)
            out["argument_bytes"] = int(mem.argument_size_in_bytes)
            out["output_bytes"] = int(mem.output_size_in_bytes)
    except Exception:  # noqa: BLE001
        pass
    return out


def run_bench(space: str = "nb201", relaxation: str = "darts", *, batch_size: int = 64,
              image_size: int = 32, in_channels: int = 3, num_classes: int = 10,
              space_options: dict | None = None, relaxation_options: dict | None = None,
              steps: int = 10, warmup: int = 2, num_devices: int = 1, seed: int = 0,
              hyper: Hyper = Hyper(), hypergrad: str = "first", hypergrad_options: dict | None = None,
              tune=(), precision: str = "float32", kernels: str = "auto") -> dict[str, Any]:
    """Compile and time the search step on random data of the given shape."""
    opts = {"in_channels": in_channels, "num_classes": num_classes, **(space_options or {})}
    searcher = make_searcher(space, relaxation, space_options=opts, relaxation_options=relaxation_options,
                             hyper=hyper, total_steps=1000, num_devices=num_devices, hypergrad=hypergrad,
                             hypergrad_options=hypergrad_options, tune=tune, precision=precision, kernels=kernels)
    rng = np.random.default_rng(seed)

    def batch():
        x = rng.standard_normal((batch_size, image_size, image_size, in_channels)).astype(np.float32)
        y = rng.integers(0, num_classes, batch_size).astype(np.int32)
        return searcher.shard((x, y))

    state = searcher.replicate(searcher.init(jax.random.PRNGKey(seed)))
    step = searcher.compiled_step(donate=True)
    tb, vb = batch(), batch()
    t0 = time.perf_counter()
    traced = step.trace(state, tb, vb)  # one jitted program, also over N devices
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    compiled = lowered.compile()
    t3 = time.perf_counter()
    compile_s = t3 - t0
    split = {"trace": t1 - t0, "lower": t2 - t1, "xla": t3 - t2}
    trim_heap()  # the compiler's freed memory back to the kernel
    costs = compiled_costs(compiled)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, tb, vb)
        jax.block_until_ready((state, metrics))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    dev = jax.devices()[0]
    return {
        "space": space, "relaxation": relaxation, "hypergrad": hypergrad,
        "hypergrad_options": dict(hypergrad_options or {}), "tune": list(tune),
        "batch_size": batch_size, "image_size": image_size, "precision": precision,
        "space_config": searcher.space.describe(),
        "num_devices": num_devices, "median_step_ms": 1e3 * statistics.median(times),
        "min_step_ms": 1e3 * min(times), "steps_timed": len(times), "compile_s": compile_s,
        "compile_split_s": split, **costs,
        "device_kind": dev.device_kind, "platform": dev.platform, "jax_version": jax.__version__,
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"), "xla_flags": os.environ.get("XLA_FLAGS"),
        "final_train_loss": float(metrics["train_loss"]),
    }
