"""Every relaxation: one search epoch on the embedded digits derives a valid genotype on every
space it supports (slow: one supernet compile per pair; run with ``pytest -m slow``)."""
from __future__ import annotations

import json

import pytest

from dnas.cli import main
from dnas.supernet.genotype import load_genotype

SPACES = {
    "nb201": ["--channels", "4", "--cells", "1"],
    "darts": ["--channels", "4", "--cells", "3"],
    "chain": ["--width-mult", "0.25", "--cells", "1"],
}
PAIRS = [(r, s) for r in ("darts", "gdas", "snas", "drnas") for s in SPACES] + \
        [("pc_darts", "nb201"), ("pc_darts", "darts"), ("proxyless", "chain")]


@pytest.mark.slow
@pytest.mark.parametrize("relaxation,space", PAIRS)
def test_one_epoch_derives_a_valid_genotype(relaxation, space, tmp_path):
    rc = main(["search", "--space", space, "--relaxation", relaxation, "--epochs", "1", "--limit-examples", "256",
               "--batch-size", "32", "--no-progress", "--out", str(tmp_path)] + SPACES[space])
    assert rc == 0
    g = load_genotype(tmp_path / "genotype.json")
    assert g.space == space
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["kind"] == "epoch" and records[-1]["step"] == 4
