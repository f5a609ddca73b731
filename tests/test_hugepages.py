"""The `dnas` command restarts itself once with glibc's huge-page tunable (dnas.hugepages)."""
import os
import subprocess
import sys

import pytest
from tiny_bench import with_defaults, without_defaults

from dnas import hugepages


def test_tunables_are_appended():
    assert hugepages.tunables_with_hugepages(None) == "glibc.malloc.hugetlb=1"
    assert hugepages.tunables_with_hugepages("glibc.malloc.arena_max=2") == \
        "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


def test_no_restart_when_disabled_done_or_set(monkeypatch):
    monkeypatch.setattr(hugepages, "_glibc_version", lambda: (2, 36))
    monkeypatch.setattr(hugepages, "_thp_mode", lambda: "madvise")
    monkeypatch.setattr(hugepages, "_accelerator_installed", lambda: False)
    monkeypatch.setattr(hugepages.sys, "platform", "linux")
    assert hugepages.should_reexec({})
    assert not hugepages.should_reexec({"DNAS_HUGEPAGES": "0"})
    assert not hugepages.should_reexec({"DNAS_HUGEPAGES_REEXEC": "1"})           # already restarted once
    assert not hugepages.should_reexec({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})  # the user's choice
    monkeypatch.setattr(hugepages, "_accelerator_installed", lambda: True)   # a GPU/TPU plugin: not XLA:CPU
    assert not hugepages.should_reexec({})
    assert hugepages.should_reexec({"JAX_PLATFORMS": "cpu"})
    assert not hugepages.should_reexec({"JAX_PLATFORMS": "cuda,cpu"})
    monkeypatch.setattr(hugepages, "_accelerator_installed", lambda: False)
    monkeypatch.setattr(hugepages, "_thp_mode", lambda: "never")
    assert not hugepages.should_reexec({})
    monkeypatch.setattr(hugepages, "_thp_mode", lambda: "always")
    monkeypatch.setattr(hugepages, "_glibc_version", lambda: (2, 31))             # no hugetlb tunable yet
    assert not hugepages.should_reexec({})


@pytest.mark.slow  # two `dnas` commands (~30 s on 2 cores); when to restart is tested above
@pytest.mark.skipif(not hugepages.should_reexec({}), reason="no glibc >= 2.35 with transparent huge pages here")
@pytest.mark.xdist_group("tiny_bench")  # with --dist loadgroup, one worker runs both tiny_bench commands once
def test_dnas_command_runs_with_the_tunable():
    assert with_defaults()["glibc_tunables"] == "glibc.malloc.hugetlb=1"
    assert without_defaults()["glibc_tunables"] is None


# In a fresh interpreter without JAX (a process that has imported jaxlib hands such chunks
# back on free already, so the case cannot be set up inside the test session).
_FRAGMENTED_HEAP = """
import ctypes, ctypes.util
from dnas import hugepages

def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size, n = 64 * 1024, 3000              # below glibc's mmap threshold: from the heap
chunks, pins = [], []
for _ in range(n):
    p = libc.malloc(size)
    ctypes.memset(p, 1, size)          # touched: resident
    chunks.append(p)
    pins.append(libc.malloc(64))       # a live neighbour: a freed chunk cannot merge into the top
for p in chunks:
    libc.free(p)
before = rss_mb()
ok = hugepages.trim_heap()
print(ok, before - rss_mb(), size * n / 2**20)
"""


@pytest.mark.skipif(hugepages._glibc_version() is None or not os.path.exists("/proc/self/status"),
                    reason="needs glibc and /proc")
def test_trim_heap_returns_freed_heap_memory_to_the_kernel():
    """Freed heap chunks between live ones stay resident (glibc trims only the heap's top);
    trim_heap releases them, as it releases what the compiler leaves behind after a step is
    compiled."""
    out = subprocess.run([sys.executable, "-c", _FRAGMENTED_HEAP], capture_output=True, text=True, check=True)
    ok, released, freed = out.stdout.split()
    assert ok == "True"
    assert float(released) > 0.5 * float(freed), f"only {float(released):.0f} MB of {float(freed):.0f} MB released"
