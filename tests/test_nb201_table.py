"""NAS-Bench-201's accuracy table: published figures, lookups and errors that name the problem."""
from itertools import product
from pathlib import Path

import pytest

from dnas.nb201_table import COLUMNS, NB201Table, NB201TableError
from dnas.supernet.genotype import NB201_OPS, GenotypeError, nb201_ops_to_string, parse_nb201

TABLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "nb201" / "nats_bench_200ep.csv"
ALL_SKIP = "|skip_connect~0|+|skip_connect~0|skip_connect~1|+|skip_connect~0|skip_connect~1|skip_connect~2|"


def write_synthetic_table(path: Path) -> Path:
    """Every cell of the space, accuracies a function of the row (no benchmark data needed)."""
    lines = ["ArchitectureString," + ",".join(COLUMNS.values())]
    for i, ops in enumerate(product(NB201_OPS, repeat=6)):
        lines.append(f"{nb201_ops_to_string(ops)},{i / 1000:.3f},{i / 2000:.4f},{i / 4000:.5f}")
    path.write_text("\n".join(lines) + "\n")
    return path


def synthetic_accuracy(arch: str) -> dict:
    ops = parse_nb201(arch).ops
    i = 0
    for op in ops:
        i = i * len(NB201_OPS) + NB201_OPS.index(op)
    return {"index": i, "cifar10": round(i / 1000, 3), "cifar100": round(i / 2000, 4),
            "imagenet16_120": round(i / 4000, 5)}


@pytest.mark.skipif(not TABLE.is_file(), reason="the NAS-Bench-201 table in ../shared/data is absent")
def test_published_figures():
    table = NB201Table.load(TABLE)
    assert len(table) == 15_625
    skip = table.lookup(ALL_SKIP)   # DARTS's collapse on NAS-Bench-201
    assert (round(skip["cifar10"], 2), round(skip["cifar100"], 2), round(skip["imagenet16_120"], 2)) == \
        (54.30, 15.61, 16.32)
    best = max(table.rows, key=lambda a: table.rows[a][1]["cifar10"])
    assert round(table.lookup(parse_nb201(best))["cifar10"], 2) == 94.37


def test_lookup_and_errors(tmp_path):
    table = NB201Table.load(write_synthetic_table(tmp_path / "t.csv"))
    arch = "|nor_conv_3x3~0|+|none~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_1x1~1|nor_conv_3x3~2|"
    assert table.lookup(arch) == pytest.approx(synthetic_accuracy(arch))
    assert table.lookup(parse_nb201(arch)) == table.lookup(arch)
    with pytest.raises(GenotypeError, match="conv_7x7"):
        table.lookup("|conv_7x7~0|+|none~0|none~1|+|none~0|none~1|none~2|")
    small = tmp_path / "small.csv"
    small.write_text("\n".join((tmp_path / "t.csv").read_text().splitlines()[:3]) + "\n")
    with pytest.raises(NB201TableError, match="lacks 15623 of the 15,625 cells"):
        NB201Table.load(small)   # checked whole when loaded, not when a missing cell is looked up
    stray = tmp_path / "stray.csv"
    stray.write_text((tmp_path / "t.csv").read_text() + "|conv_7x7~0|+|none~0|none~1|+|none~0|none~1|none~2|,1,1,1\n")
    with pytest.raises(NB201TableError, match="no NAS-Bench-201 cell"):
        NB201Table.load(stray)
    (tmp_path / "cols.csv").write_text("ArchitectureString,CIFAR10TestAccuracy200Epochs\n|a~0|,1\n")
    with pytest.raises(NB201TableError, match="CIFAR100TestAccuracy200Epochs"):
        NB201Table.load(tmp_path / "cols.csv")
    with pytest.raises(NB201TableError, match="cannot read"):
        NB201Table.load(tmp_path / "missing.csv")
