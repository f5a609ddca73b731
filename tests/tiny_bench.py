"""Run the `dnas` command's `bench` on a tiny NB201 supernet in fresh processes.

Two runs serve the tests of the command's process setup (``test_xla_flags.py``,
``test_hugepages.py``): one with the command's defaults, one with both of its process-level
defaults turned off (``DNAS_XLA_DEFAULTS=0``, ``DNAS_HUGEPAGES=0``). Each is made once per test
session: a run is ~20 s of starting JAX and compiling.
"""
import functools
import json
import os
import subprocess
import sys

# what the command itself sets or reads; removed so that each run starts from the same place
_CLEARED = ("XLA_FLAGS", "DNAS_XLA_DEFAULTS", "GLIBC_TUNABLES", "DNAS_HUGEPAGES", "DNAS_HUGEPAGES_REEXEC")
# the test session's cheap compiles (conftest.py), named explicitly: the runs' XLA_FLAGS is theirs
BASE_XLA_FLAGS = "--xla_backend_optimization_level=0"


def tiny_bench(env_extra: dict) -> dict:
    """The JSON `python -m dnas.cli bench` prints for C=2, one cell, B=4, 8×8 inputs, started
    with ``XLA_FLAGS=BASE_XLA_FLAGS``, the variables in ``_CLEARED`` otherwise unset, and
    ``env_extra`` added."""
    env = {k: v for k, v in os.environ.items() if k not in _CLEARED}
    env["XLA_FLAGS"] = BASE_XLA_FLAGS
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-m", "dnas.cli", "bench", "--channels", "2", "--cells", "1",
                          "--batch-size", "4", "--image-size", "8", "--steps", "1", "--warmup", "0"],
                         capture_output=True, text=True, env=env, check=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


@functools.lru_cache(maxsize=None)
def with_defaults() -> dict:
    """The command as a user starts it."""
    return tiny_bench({})


@functools.lru_cache(maxsize=None)
def without_defaults() -> dict:
    """The command with its XLA flag and its huge-page restart both turned off."""
    return tiny_bench({"DNAS_XLA_DEFAULTS": "0", "DNAS_HUGEPAGES": "0"})
