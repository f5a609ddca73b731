"""The latency term in the search: a tight target steers the derived architecture."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dnas.cli import main
from dnas.latency.objective import make_latency_objective
from dnas.latency.space_latency import FIXED_KEY, op_key
from dnas.latency.table import LatencyTable
from dnas.searcher import make_searcher
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
    lat_plain = obj.of_indices(space.genotype_indices(load_genotype(tmp_path / "plain" / "genotype.json")))
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


SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
PIXEL1 = SHARED / "latency" / "proxylessnas_mobile_trim.yaml"
DEPLOYED = {"width_mult": 1.0, "stem_stride": 2, "in_channels": 3, "num_classes": 1000}


@pytest.mark.skipif(not PIXEL1.exists(), reason="../shared/data/latency absent")
def test_latency_of_the_deployed_network_differs_from_the_searched_one():
    """A width-0.5 chain searched on 8x8 grey images, its latency that of the full ProxylessNAS
    network at 224 px (the Pixel-1 table's network): same choice points, the deployed keys."""
    from dnas.latency.published import load_table
    from dnas.latency.space_latency import latency_matrix

    searched = {"width_mult": 0.5, "stem_stride": 1, "in_channels": 1, "num_classes": 10}
    s = make_searcher("chain", "darts", space_options=searched,
                      latency={"table_path": str(PIXEL1), "loss": "hinge", "target": 80.0, "input_size": 224,
                               "space_options": DEPLOYED})
    assert s.space.config.width_mult == 0.5                          # the supernet searched is the small one
    mats, fixed = latency_matrix(build_space("chain", **DEPLOYED), load_table(PIXEL1), input_size=224)
    d = s.latency.describe()
    assert d["fixed_ms"] == pytest.approx(fixed, rel=1e-6)
    assert d["min_ms"] == pytest.approx(fixed + sum(float(m.min(1).sum()) for m in mats.values()), rel=1e-5)
    assert d["max_ms"] == pytest.approx(fixed + sum(float(m.max(1).sum()) for m in mats.values()), rel=1e-5)
    for g in mats:
        np.testing.assert_allclose(s.latency.matrix[g], mats[g], rtol=1e-5)
    # the entries are the full network's: block 0 (16 -> 24 channels, 112 -> 56 px) choosing mb_k5_e6
    table = load_table(PIXEL1)
    j = s.space.group_op_names("block0").index("mb_k5_e6")
    assert s.latency.matrix["block0"][0, j] == pytest.approx(
        table.lookup("expanded_conv-input:112x112x16-output:56x56x24-expand:6-kernel:5-stride:2-idskip:0"), rel=1e-6)
    # without the deployed options the width-0.5 network is not in the table: the error names its keys
    with pytest.raises(KeyError, match="Conv-input:8x8x1-output:8x8x16"):
        make_searcher("chain", "darts", space_options=searched,
                      latency={"table_path": str(PIXEL1), "loss": "hinge", "target": 80.0, "input_size": 8})
    # at width 0.25 one stage's first block keeps its shape (an extra `zero` choice): refused
    with pytest.raises(ValueError, match="choice points"):
        make_searcher("chain", "darts", space_options={**searched, "width_mult": 0.25},
                      latency={"table_path": str(PIXEL1), "loss": "hinge", "target": 80.0, "input_size": 224,
                               "space_options": DEPLOYED})
