"""Transparent huge pages for XLA:CPU's buffers, by restarting the process with a glibc tunable.

Why: XLA:CPU allocates the temporary buffers of a compiled step afresh on every execution
(through ``malloc``). Buffers this large are ``mmap``-ed by glibc and returned on ``free``, so
every step touches its whole working set anew: one page fault per 4 KiB page, a large part of
a step's time spent in the kernel. With ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (glibc >=
2.35) glibc marks its ``mmap``-ed chunks ``MADV_HUGEPAGE``, the kernel backs them with 2 MiB
pages where transparent huge pages are in ``madvise`` or ``always`` mode, and a step takes a
small fraction of the faults and runs faster (``docs/benchmarks.md``, "Page faults", has the
figures). Nothing else changes: same values, same memory.

Tunables are read when the process starts, so :func:`reexec_with_hugepages` restarts the
current command line once with the tunable added (before JAX is imported). It does nothing
where it cannot help (not Linux/glibc, glibc older than 2.35, transparent huge pages
``never``), when the tunable is already set, or when ``DNAS_HUGEPAGES=0``.

:func:`trim_heap` is the other half of the process's glibc memory: it returns what the
compiler freed to the kernel once a step is compiled.
"""
from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
_GUARD = "DNAS_HUGEPAGES_REEXEC"


def _glibc_version() -> tuple[int, int] | None:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (AttributeError, OSError, ValueError):
        return None


def _thp_mode() -> str | None:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def _accelerator_installed() -> bool:
    """Whether a JAX plugin for a GPU or TPU is installed (then JAX's default backend is that
    accelerator, whose memory is not the process heap)."""
    import importlib.util
    names = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin", "libtpu")
    return any(importlib.util.find_spec(n) is not None for n in names)


def jax_runs_on_cpu(environ=os.environ) -> bool:
    """Whether JAX will run on the CPU backend, decided before JAX starts: ``JAX_PLATFORMS``'
    first platform when set, else whether no accelerator plugin is installed."""
    platforms = environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip().lower() == "cpu"
    return not _accelerator_installed()


def should_reexec(environ=os.environ) -> bool:
    """Whether :func:`reexec_with_hugepages` would restart this process: on Linux with a glibc
    that has the tunable and transparent huge pages available, and only when JAX runs on the
    CPU (the huge pages are for XLA:CPU's buffers on the process heap)."""
    if environ.get("DNAS_HUGEPAGES", "1") == "0" or environ.get(_GUARD):
        return False
    if not jax_runs_on_cpu(environ):
        return False
    if "glibc.malloc.hugetlb" in environ.get("GLIBC_TUNABLES", ""):
        return False
    if not sys.platform.startswith("linux") or (_glibc_version() or (0, 0)) < (2, 35):
        return False
    return _thp_mode() in ("madvise", "always")


def tunables_with_hugepages(current: str | None) -> str:
    """``GLIBC_TUNABLES`` with :data:`TUNABLE` added (entries are ``:``-separated)."""
    return f"{current}:{TUNABLE}" if current else TUNABLE


def reexec_with_hugepages() -> None:
    """Restart the current command (``sys.orig_argv``) with :data:`TUNABLE` in
    ``GLIBC_TUNABLES``, if :func:`should_reexec`. Call it first thing in a ``main``."""
    if not should_reexec():
        return
    env = dict(os.environ)
    env["GLIBC_TUNABLES"] = tunables_with_hugepages(env.get("GLIBC_TUNABLES"))
    env[_GUARD] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, list(sys.orig_argv), env)
    except OSError:   # cannot restart: carry on without huge pages
        return


def trim_heap() -> bool:
    """Give the memory glibc's ``malloc`` holds free back to the kernel (``malloc_trim(0)``);
    False where there is no glibc.

    Call it once a step is compiled. XLA's compiler frees most of what it allocated, but glibc
    keeps freed heap memory mapped, so the process would carry the compiler's leftovers into
    every step and peak higher (``docs/benchmarks.md``, "Page faults", has the figures). It
    costs milliseconds and changes nothing else.
    """
    import ctypes

    if _glibc_version() is None:
        return False
    try:
        ctypes.CDLL(None).malloc_trim(0)   # the process's own symbols: glibc's malloc_trim
    except (OSError, AttributeError):
        return False
    return True
