"""The latency term in the search: a tight target steers the derived architecture."""
from __future__ import annotations

import json

import numpy as np
import pytest

from dnas.cli import main
from dnas.latency.objective import genotype_indices, make_latency_objective
from dnas.latency.space_latency import FIXED_KEY, op_key
from dnas.latency.table import LatencyTable
from dnas.search import make_searcher
from dnas.supernet.genotype import NB201_OPS, load_genotype
from dnas.supernet.spaces import build_space

COST = {"none": 0.0, "skip_connect": 0.05, "avg_pool_3x3": 0.5, "nor_conv_1x1": 2.0, "nor_conv_3x3": 8.0}
TINY = ["--channels", "4", "--cells", "1", "--batch-size", "32", "--no-progress", "--seed", "0",
        "--epochs", "3", "--limit-examples", "512", "--log-every", "5", "--a-lr", "3e-3"]


@pytest.fixture(scope="module")
def op_table(tmp_path_factory):
    """An additive per-op table of the NB201 space (convolutions expensive, like any device)."""
    t = LatencyTable(meta={"space": "nb201", "granularity": "op", "method": "synthetic test table"})
    for op in NB201_OPS:
        t.add(op_key("cell", op), COST[op])
    t.add(FIXED_KEY, 1.0)
    return t.save(tmp_path_factory.mktemp("lat") / "nb201_ops.json")


def test_expected_latency_of_the_searcher_equals_table_for_one_hot(op_table):
    s = make_searcher("nb201", space_options={"channels": 4, "cells_per_stage": 1},
                      latency={"table_path": str(op_table), "loss": "hinge", "target": 5.0})
    onehot = np.zeros((6, 5), np.float32)
    onehot[np.arange(6), [4, 3, 2, 1, 0, 4]] = 1.0
    ops = [s.space.group_op_names("cell")[i] for i in [4, 3, 2, 1, 0, 4]]
    assert float(s.latency.expected({"cell": onehot})) == pytest.approx(1.0 + sum(COST[o] for o in ops), rel=1e-6)


def test_tight_target_lowers_the_derived_table_latency(op_table, tmp_path):
    assert main(["search", *TINY, "--out", str(tmp_path / "plain")]) == 0
    assert main(["search", *TINY, "--out", str(tmp_path / "tight"), "--latency-table", str(op_table),
                 "--latency-loss", "hinge", "--latency-target", "4", "--latency-weight", "2"]) == 0
    plain = json.loads((tmp_path / "plain" / "genotype.json").read_text())
    tight = json.loads((tmp_path / "tight" / "genotype.json").read_text())
    space = build_space("nb201", channels=4, cells_per_stage=1)
    obj = make_latency_objective(space, str(op_table), "hinge", target=4.0)
    lat_plain = obj.of_indices(genotype_indices(space, load_genotype(tmp_path / "plain" / "genotype.json")))
    assert tight["table_latency_ms"] < lat_plain, (tight["arch"], plain["arch"])
    rows = [json.loads(x) for x in (tmp_path / "tight" / "metrics.jsonl").read_text().splitlines()]
    lat = [r["expected_latency_ms"] for r in rows if r["kind"] == "step"]
    assert lat[-1] < lat[0]


def test_missing_table_key_is_a_clear_search_error(tmp_path, capsys):
    t = LatencyTable(meta={"space": "nb201", "granularity": "op"})
    t.add(op_key("cell", "none"), 0.0)
    t.add(FIXED_KEY, 1.0)
    path = t.save(tmp_path / "partial.json")
    rc = main(["search", *TINY, "--out", str(tmp_path / "o"), "--latency-table", str(path), "--latency-target", "3"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "op/cell/nor_conv_3x3" in err and "op/cell/skip_connect" in err
