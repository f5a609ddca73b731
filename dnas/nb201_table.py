"""NAS-Bench-201's accuracy table: what the benchmark says a derived cell reaches.

NAS-Bench-201 (Dong & Yang, ICLR 2020) trained every one of the 15,625 cells of its space
(C=16, N=5, 200 epochs, the protocol of :mod:`dnas.train`) on CIFAR-10, CIFAR-100 and
ImageNet16-120, so a search on the ``nb201`` space is evaluated by looking its derived cell up
instead of retraining it. ``dnas search --nb201-table PATH`` adds the looked-up test accuracies
of the current derived cell to every epoch record of ``metrics.jsonl`` (how the search's
choice evolves; a collapse to skip connections shows as a fall towards 54 %) and to
``genotype.json``/``summary.json``.

The table is a CSV with one row per architecture and the columns
``ArchitectureString`` (``|op~0|+|op~0|op~1|+|op~0|op~1|op~2|``) and
``CIFAR10TestAccuracy200Epochs``, ``CIFAR100TestAccuracy200Epochs``,
``ImageNetTestAccuracy200Epochs`` (percent, mean over the benchmark's seeds), as in the
NATS-Bench topology export; the row number is the benchmark's architecture index.
"""
from __future__ import annotations

import csv
from pathlib import Path

from dnas.supernet.genotype import GenotypeError, parse_nb201

#: Output key -> the table's column.
COLUMNS = {"cifar10": "CIFAR10TestAccuracy200Epochs", "cifar100": "CIFAR100TestAccuracy200Epochs",
           "imagenet16_120": "ImageNetTestAccuracy200Epochs"}
ARCH_COLUMN = "ArchitectureString"


class NB201TableError(ValueError):
    """A missing or malformed table, or an architecture the table does not hold."""


def _check_whole(rows: dict, path: Path) -> None:
    """Every one of the space's 15,625 cells is in the table once, and nothing else: a table
    that lacks rows would otherwise fail only when a search derives a missing cell (after
    epochs of compute)."""
    from itertools import product

    from dnas.supernet.genotype import NB201_OPS, nb201_ops_to_string

    expected = {nb201_ops_to_string(ops) for ops in product(NB201_OPS, repeat=6)}
    missing, extra = expected - set(rows), set(rows) - expected
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"lacks {len(missing)} of the {len(expected):,} cells (e.g. {min(missing)})")
        if extra:
            parts.append(f"has {len(extra)} row(s) that are no NAS-Bench-201 cell (e.g. {min(extra)!r})")
        raise NB201TableError(f"NAS-Bench-201 table {str(path)!r} " + " and ".join(parts))


class NB201Table:
    """The accuracy table, indexed by arch string (:meth:`load`, :meth:`lookup`)."""

    def __init__(self, rows: dict[str, tuple[int, dict[str, float]]], path: str):
        self.rows, self.path = rows, path

    @classmethod
    def load(cls, path: str | Path) -> "NB201Table":
        path = Path(path)
        try:
            f = open(path, newline="", encoding="utf-8")
        except OSError as e:
            raise NB201TableError(f"cannot read the NAS-Bench-201 table {str(path)!r}: {e.strerror}") from None
        with f:
            reader = csv.DictReader(f)
            missing = [c for c in (ARCH_COLUMN, *COLUMNS.values()) if c not in (reader.fieldnames or [])]
            if missing:
                raise NB201TableError(f"NAS-Bench-201 table {str(path)!r} lacks the column(s) {missing}; "
                                      f"it has {reader.fieldnames}")
            rows = {}
            for i, row in enumerate(reader):
                try:
                    rows[row[ARCH_COLUMN]] = (i, {k: float(row[c]) for k, c in COLUMNS.items()})
                except (TypeError, ValueError):
                    raise NB201TableError(f"NAS-Bench-201 table {str(path)!r}, row {i}: an accuracy is not a "
                                          f"number: {row}") from None
        if not rows:
            raise NB201TableError(f"NAS-Bench-201 table {str(path)!r} has no rows")
        _check_whole(rows, path)
        return cls(rows, str(path))

    def __len__(self) -> int:
        return len(self.rows)

    def lookup(self, arch) -> dict:
        """``{"index", "cifar10", "cifar100", "imagenet16_120"}`` (test accuracy in percent after
        200 epochs) for a genotype or arch string; an arch string the space does not allow is a
        :class:`~dnas.supernet.genotype.GenotypeError`, one the table lacks an
        :class:`NB201TableError`."""
        s = arch if isinstance(arch, str) else getattr(arch, "arch", None)
        if s is None:
            raise GenotypeError(f"not a NAS-Bench-201 genotype: {arch!r}")
        s = parse_nb201(s).arch   # validates and normalises
        if s not in self.rows:
            raise NB201TableError(f"the NAS-Bench-201 table {self.path!r} has no row for {s}")
        index, acc = self.rows[s]
        return {"index": index, **acc}


__all__ = ["NB201Table", "NB201TableError", "COLUMNS"]
