"""Test-session setup: 8 simulated CPU devices for the data-parallel tests, and cheap compiles.

XLA reads ``XLA_FLAGS`` once, when JAX first initialises its backend, so this must run
before any test module imports JAX. Single-device code simply runs on the first device.

The default test run is compile-bound (small supernets, a few steps each), so the tests
compile with LLVM's optimisation level 0 (``--xla_backend_optimization_level=0``): the same
HLO, fusions and numerics rules, less machine-code optimisation, shorter compiles. A flag of the same name already in ``XLA_FLAGS``
wins (``XLA_FLAGS=--xla_backend_optimization_level=2 pytest`` tests the optimised code).
Subprocesses the tests start inherit the environment, hence the flags.

Tracing and compiling are single-threaded, so the suite runs in parallel worker processes
(pytest-xdist, ``-n auto`` in ``pyproject.toml``): one per core, at most
``MAX_TEST_WORKERS`` (each holds its own JAX runtime and compiled programs in memory).
``pytest -n 0`` runs in one process. ``docs/benchmarks.md``, "The test suite's run time", has
what each of these gains.
"""
import os

for _flag in ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0"):
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
# `dnas search` through main() and in subprocesses would otherwise use a compilation cache in the
# home directory: it uses the session's (pytest_configure below), unless the environment says otherwise
_USER_COMPILE_CACHE = os.environ.get("DNAS_COMPILE_CACHE")
os.environ.setdefault("DNAS_COMPILE_CACHE", "off")


import numpy as np  # noqa: E402
import pytest  # noqa: E402

MAX_TEST_WORKERS = 4
_SESSION_CACHE = "DNAS_TEST_SESSION_CACHE"


def pytest_configure(config):
    """One JAX persistent compilation cache for the whole test session: every worker, and the
    ``dnas`` commands the tests run in-process or as subprocesses. Tests that compile the same
    program (one tiny search configuration run by several tests, a run and its resume) then
    compile it once. The controlling process makes the directory before the workers start, so they inherit it
    through the environment; it is removed when the session ends.
    ``DNAS_TEST_SESSION_CACHE=off pytest`` compiles everything afresh."""
    import tempfile

    if hasattr(config, "workerinput"):
        _pin_worker(config.workerinput)
    if os.environ.get(_SESSION_CACHE) is None and not hasattr(config, "workerinput"):
        os.environ[_SESSION_CACHE] = tempfile.mkdtemp(prefix="dnas-test-cache-")
        config._dnas_cache_owner = True
    where = os.environ[_SESSION_CACHE]
    if where.lower() == "off":
        return
    if _USER_COMPILE_CACHE is None:
        os.environ["DNAS_COMPILE_CACHE"] = where
    import jax
    jax.config.update("jax_compilation_cache_dir", where)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)


def _pin_worker(workerinput) -> None:
    """Give each xdist worker a core of its own (worker ``gwI`` the I-th core it may use) when
    there are at least as many cores as workers. XLA:CPU sizes its thread pools by the cores a
    process may run on: unpinned, every worker (and every ``dnas`` subprocess a test starts)
    runs as many threads as the machine has cores, and on 2 cores the workers' threads fight
    over them. Subprocesses inherit the pin. Must run before JAX starts its backend.
    ``DNAS_TEST_PIN=off`` leaves the workers unpinned."""
    if os.environ.get("DNAS_TEST_PIN", "").lower() == "off" or not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    workers = int(workerinput.get("workercount", 0) or 0)
    index = int(workerinput["workerid"].lstrip("gw") or 0)
    if workers and len(cores) >= workers:
        os.sched_setaffinity(0, {cores[index % len(cores)]})


def pytest_unconfigure(config):
    if getattr(config, "_dnas_cache_owner", False):
        import shutil
        shutil.rmtree(os.environ.pop(_SESSION_CACHE), ignore_errors=True)


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker per core this process may use, at most ``MAX_TEST_WORKERS``."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, MAX_TEST_WORKERS))


@pytest.fixture(scope="session")
def digits():
    """The embedded digits dataset (scikit-learn), loaded once per session."""
    from dnas.data import load_dataset
    return load_dataset("digits")


@pytest.fixture(scope="session")
def digit_batches(digits):
    """``digit_batches(n, batch=32, seed=0)`` → ``n`` pairs of disjoint (train, val) batches."""
    def make(n, batch=32, seed=0):
        rng = np.random.default_rng(seed)
        out = []
        for _ in range(n):
            i = rng.choice(len(digits.train_y), 2 * batch, replace=False)
            x, y = digits.train_x[i], digits.train_y[i].astype(np.int32)
            out.append(((x[:batch], y[:batch]), (x[batch:], y[batch:])))
        return out
    return make
