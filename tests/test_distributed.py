"""Multi-process search through jax.distributed: 2 processes on loopback (gloo on CPU)."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

from dnas.cli import main

ARGS = ["search", "--channels", "4", "--cells", "1", "--batch-size", "32", "--no-progress", "--seed", "5",
        "--epochs", "1", "--limit-examples", "256", "--max-steps", "3", "--log-every", "1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process_on_the_same_global_batch(tmp_path):
    """Two processes (one device each, each feeding half of every global batch) derive the
    same architecture with the same α as one process with two devices; only process 0 writes."""
    port = _free_port()
    # one device per process; the session's other XLA flags (conftest.py) kept
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    env = dict(os.environ, XLA_FLAGS=f"{flags.strip()} --xla_force_host_platform_device_count=1".strip())
    procs = [subprocess.Popen([sys.executable, "-m", "dnas.cli", *ARGS, "--out", str(tmp_path / f"mp{i}"),
                               "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-3000:]
    assert (tmp_path / "mp0" / "alphas.json").is_file()
    assert not (tmp_path / "mp1").exists()  # process 1 writes nothing
    cfg = json.loads((tmp_path / "mp0" / "config.json").read_text())
    assert cfg["resolved"]["processes"] == 2 and cfg["resolved"]["global_devices"] == 2

    assert main(ARGS + ["--devices", "2", "--out", str(tmp_path / "sp")]) == 0
    mp = json.loads((tmp_path / "mp0" / "alphas.json").read_text())
    sp = json.loads((tmp_path / "sp" / "alphas.json").read_text())
    np.testing.assert_allclose(np.asarray(mp["groups"]["cell"]["alpha"]), np.asarray(sp["groups"]["cell"]["alpha"]),
                               atol=1e-6, rtol=0)
    assert json.loads((tmp_path / "mp0" / "genotype.json").read_text())["arch"] == \
        json.loads((tmp_path / "sp" / "genotype.json").read_text())["arch"]
    # the metrics of every step agree too (losses are global-batch means in both)
    rows = [[json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("mp0", "sp")]
    for a, b in zip(*rows):
        assert a["step"] == b["step"]
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)


def test_partial_distributed_flags_are_an_error(capsys):
    assert main(ARGS + ["--coordinator", "127.0.0.1:1", "--num-processes", "2"]) == 2
    assert "needs all of --coordinator, --num-processes and --process-id" in capsys.readouterr().err
