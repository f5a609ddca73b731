"""`dnas reproduce nb201`: the protocol, bad input refused before anything is written, and the
smoke budget end to end on a CIFAR-10 JPEG subset (skipped without ../shared/data)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dnas.nb201_table import NB201Table, NB201TableError
from dnas.reproduce import (BUDGETS, NB201_PROTOCOL, PAPER_ALPHA_TRAVEL, ReproduceConfig, num_param_free,
                            random_baseline, run_reproduce, search_config)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CIFAR_TAR = SHARED / "cifar10-jpeg.tar.gz"
NB201_CSV = SHARED / "nb201" / "nats_bench_200ep.csv"
needs_data = pytest.mark.skipif(not (CIFAR_TAR.is_file() and NB201_CSV.is_file()),
                                reason="../shared/data (CIFAR-10 JPEG tree, NAS-Bench-201 table) not present")


def _cfg(tmp_path, **kw):
    base = dict(dataset="digits", nb201_table=str(NB201_CSV), out=str(tmp_path / "out"))
    return ReproduceConfig(**{**base, **kw})


def test_paper_budget_pins_the_nb201_protocol(tmp_path):
    """The paper budget's search configuration is xautodl's NAS-Bench-201 protocol."""
    cfg = _cfg(tmp_path, budget="paper")
    d = search_config(cfg, BUDGETS["paper"], "darts", steps_per_epoch=390)
    g = search_config(cfg, BUDGETS["paper"], "gdas", steps_per_epoch=390)
    assert d.space_options == {"channels": 16, "cells_per_stage": 5, "affine": False}
    assert (d.epochs, g.epochs, d.batch_size) == (50, 250, 64)
    h = d.hyper
    assert (h.w_lr, h.w_lr_min, h.w_momentum, h.w_nesterov, h.w_weight_decay, h.w_grad_clip) == \
        (0.025, 0.001, 0.9, True, 5e-4, 5.0)
    assert (h.a_lr, h.a_beta1, h.a_beta2, h.a_weight_decay) == (3e-4, 0.5, 0.999, 1e-3)
    assert g.relaxation_options == {"tau_max": 10.0, "tau_min": 0.1}
    assert d.limit_examples is None and d.seeds == (777, 888, 999)


def test_proxy_budget_keeps_the_alpha_travel(tmp_path):
    """A proxy budget scales α's learning rate so that lr × steps equals the paper's."""
    c = search_config(_cfg(tmp_path), BUDGETS["cpu"], "snas", steps_per_epoch=78)
    assert c.hyper.a_lr * c.epochs * 78 == pytest.approx(PAPER_ALPHA_TRAVEL)
    assert PAPER_ALPHA_TRAVEL == pytest.approx(NB201_PROTOCOL["a_lr"] * 50 * 390)


def test_param_free_count():
    assert num_param_free("|skip_connect~0|+|skip_connect~0|skip_connect~1|+|skip_connect~0|skip_connect~1|"
                          "skip_connect~2|") == 6
    assert num_param_free("|nor_conv_3x3~0|+|none~0|nor_conv_1x1~1|+|avg_pool_3x3~0|nor_conv_3x3~1|"
                          "skip_connect~2|") == 3


@pytest.mark.parametrize("kw, match", [
    ({"methods": ("darts", "proxyless")}, "not reproducible on NAS-Bench-201"),
    ({"methods": ("darts", "darts")}, "distinct"),
    ({"budget": "huge"}, "unknown budget"),
    ({"seeds": (1, 1)}, "distinct seeds"),
])
def test_bad_input_is_refused_before_anything_is_written(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        run_reproduce(_cfg(tmp_path, **kw))
    assert not (tmp_path / "out").exists()


def test_missing_table_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(NB201TableError, match="cannot read"):
        run_reproduce(_cfg(tmp_path, nb201_table=str(tmp_path / "no.csv")))
    assert not (tmp_path / "out").exists()


@needs_data
def test_used_out_dir_is_refused(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "report.md").write_text("an earlier run\n")
    with pytest.raises(ValueError, match="not empty"):
        run_reproduce(_cfg(tmp_path))
    assert (tmp_path / "out" / "report.md").read_text() == "an earlier run\n"


@needs_data
def test_random_baseline_from_the_table():
    """The random cell's statistics over the whole table (the issue's 87.06 / 90.75 / 92.93)."""
    b = random_baseline(NB201Table.load(NB201_CSV))
    assert b["cifar10"]["mean"] == pytest.approx(87.06, abs=0.01)
    assert b["cifar10"]["median"] == pytest.approx(90.75, abs=0.01)
    assert b["cifar10"]["p90"] == pytest.approx(92.93, abs=0.01)


@needs_data
@pytest.mark.parametrize("methods", [("darts",), pytest.param(("darts", "gdas"), marks=pytest.mark.slow)],
                         ids=["darts", "darts-gdas"])
def test_smoke_budget_end_to_end(tmp_path, methods):
    """Two seeds (vmapped) on a 160-image CIFAR-10 subset: the report's cells are the searches'
    final derived cells, its accuracies the table's, its statistics theirs."""
    from dnas.data import extract_image_subset

    data = extract_image_subset(CIFAR_TAR, tmp_path / "cifar", {"train": 16, "test": 1})
    out = tmp_path / "out"
    report = run_reproduce(ReproduceConfig(dataset=str(data), nb201_table=str(NB201_CSV), out=str(out),
                                           methods=methods, seeds=(777, 888), budget="smoke",
                                           progress=False))
    for name in ("report.json", "report.md", "accuracy.png", "param_free.png", "protocol.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    table = NB201Table.load(NB201_CSV)
    assert list(report["methods"]) == list(methods)
    for m in methods:
        r = report["methods"][m]
        assert r["row"] == {"darts": "DARTS-V1", "gdas": "GDAS"}[m]
        assert set(r["seeds"]) == {"777", "888"}
        for s, v in r["seeds"].items():
            genotype = json.loads((out / m / f"seed-{s}" / "genotype.json").read_text())
            assert v["arch"] == genotype["arch"]
            looked_up = table.lookup(v["arch"])
            assert v["cifar10"] == looked_up["cifar10"] and v["imagenet16_120"] == looked_up["imagenet16_120"]
            epochs = [json.loads(line) for line in (out / m / f"seed-{s}" / "metrics.jsonl").read_text().splitlines()]
            assert len([e for e in epochs if e["kind"] == "epoch"]) == BUDGETS["smoke"].epochs
        accs = [v["cifar10"] for v in r["seeds"].values()]
        assert r["accuracy"]["cifar10"]["mean"] == pytest.approx(np.mean(accs))
        assert r["accuracy"]["cifar10"]["std"] == pytest.approx(np.std(accs))
    md = (out / "report.md").read_text()
    assert "54.30 ± 0.00" in md and "random cell" in md   # DARTS-V1's published row


@needs_data
@pytest.mark.slow   # ~3.5 min on 2 cores: two searches and two DARTS-PT selections
def test_smoke_budget_remedies_and_darts_pt(tmp_path):
    """A remedy is DARTS with its option set; DARTS-PT selects on DARTS's own search (no second
    search) and reports the cells its selection wrote."""
    from dnas.data import extract_image_subset

    data = extract_image_subset(CIFAR_TAR, tmp_path / "cifar", {"train": 16, "test": 1})
    out = tmp_path / "out"
    report = run_reproduce(ReproduceConfig(dataset=str(data), nb201_table=str(NB201_CSV), out=str(out),
                                           methods=("darts_pt", "darts", "darts_minus"), seeds=(777, 888),
                                           budget="smoke", progress=False))
    assert list(report["methods"]) == ["darts_pt", "darts", "darts_minus"]
    assert report["methods"]["darts_pt"]["search"] == "darts" and not (out / "darts_pt" / "metrics.jsonl").exists()
    assert json.loads((out / "darts_minus" / "config.json").read_text())["remedies"] == {"darts_minus": {}}
    table = NB201Table.load(NB201_CSV)
    for s, v in report["methods"]["darts_pt"]["seeds"].items():
        sel = json.loads((out / "darts_pt" / f"seed-{s}" / "selection.json").read_text())
        assert v["arch"] == sel["genotype"]["arch"] and v["cifar10"] == table.lookup(v["arch"])["cifar10"]
    assert "DARTS-PT" in (out / "report.md").read_text()
