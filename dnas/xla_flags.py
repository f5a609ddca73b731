"""XLA:CPU compiler flags the ``dnas`` command sets, each one measured, none guessed.

XLA reads ``XLA_FLAGS`` once, when JAX starts its first backend, so :func:`apply_cpu_defaults`
runs at the start of the ``dnas`` command (and of ``benchmarks/bench_vs_pytorch.py``), before
JAX is imported. A flag already named in ``XLA_FLAGS`` is left as the user set it;
``DNAS_XLA_DEFAULTS=0`` turns the defaults off. A program that imports :mod:`dnas` as a
library gets them by calling :func:`apply_cpu_defaults` before its first JAX call.

``--xla_cpu_use_fusion_emitters=false``: XLA:CPU emits its loop fusions with the older LLVM
IR emitters instead of the MLIR fusion emitters. Most of a supernet step's time on the CPU
is elementwise, reduction and pooling fusions (BatchNorm, ReLU, the mixed op's weighted
sums, their backward passes), and the older emitters' code runs them faster. The price is a
longer compile, paid once per configuration with the persistent compilation cache that
``dnas search`` keeps; the compiler's own memory shrinks. ``docs/benchmarks.md``, "XLA:CPU
flags, measured", has the figures (``dnas bench``). The flag only concerns the CPU backend; on
GPU/TPU it changes nothing.
"""
from __future__ import annotations

import os

CPU_DEFAULTS: dict[str, str] = {"xla_cpu_use_fusion_emitters": "false"}


# XLA aborts the process on a flag it does not know, and newer XLA dropped this one (jaxlib
# 0.11.2 on an H100 machine: "Unknown flag in XLA_FLAGS: --xla_cpu_use_fusion_emitters=false").
# The defaults were measured with jaxlib 0.10 and are set only up to that version.
LAST_JAXLIB_WITH_DEFAULTS = (0, 10)


def _jaxlib_version() -> tuple[int, ...] | None:
    from importlib import metadata
    try:
        return tuple(int(p) for p in metadata.version("jaxlib").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return None


def defaults_apply(version: tuple[int, ...] | None = None) -> bool:
    """Whether the installed jaxlib (or ``version``, ``(major, minor)``) takes :data:`CPU_DEFAULTS`."""
    version = _jaxlib_version() if version is None else version
    return version is not None and version <= LAST_JAXLIB_WITH_DEFAULTS


def with_cpu_defaults(flags: str) -> str:
    """``flags`` (an ``XLA_FLAGS`` value) with every :data:`CPU_DEFAULTS` flag it does not
    already name appended."""
    named = {f.lstrip("-").split("=", 1)[0] for f in flags.split()}
    extra = [f"--{k}={v}" for k, v in CPU_DEFAULTS.items() if k not in named]
    return " ".join([flags.strip(), *extra]).strip()


def apply_cpu_defaults(environ=os.environ) -> str:
    """Add :data:`CPU_DEFAULTS` to ``environ["XLA_FLAGS"]`` (unless ``DNAS_XLA_DEFAULTS=0`` or the
    installed jaxlib is newer than :data:`LAST_JAXLIB_WITH_DEFAULTS`); returns the resulting
    value. Has an effect only before JAX starts a backend."""
    if environ.get("DNAS_XLA_DEFAULTS", "1") != "0" and defaults_apply():
        environ["XLA_FLAGS"] = with_cpu_defaults(environ.get("XLA_FLAGS", ""))
    return environ.get("XLA_FLAGS", "")
