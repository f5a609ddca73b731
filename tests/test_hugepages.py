"""The `dnas` command restarts itself once with glibc's huge-page tunable (dnas.hugepages)."""
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
    monkeypatch.setattr(hugepages.sys, "platform", "linux")
    assert hugepages.should_reexec({})
    assert not hugepages.should_reexec({"DNAS_HUGEPAGES": "0"})
    assert not hugepages.should_reexec({"DNAS_HUGEPAGES_REEXEC": "1"})           # already restarted once
    assert not hugepages.should_reexec({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})  # the user's choice
    monkeypatch.setattr(hugepages, "_thp_mode", lambda: "never")
    assert not hugepages.should_reexec({})
    monkeypatch.setattr(hugepages, "_thp_mode", lambda: "always")
    monkeypatch.setattr(hugepages, "_glibc_version", lambda: (2, 31))             # no hugetlb tunable yet
    assert not hugepages.should_reexec({})


@pytest.mark.skipif(not hugepages.should_reexec({}), reason="no glibc >= 2.35 with transparent huge pages here")
def test_dnas_command_runs_with_the_tunable():
    assert with_defaults()["glibc_tunables"] == "glibc.malloc.hugetlb=1"
    assert without_defaults()["glibc_tunables"] is None
