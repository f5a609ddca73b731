"""Architecture encodings (genotypes) of the search spaces, their validation, derivation
from architecture scores, and JSON I/O.

Four kinds of genotype are supported:

* ``darts`` — the DARTS CNN cell (Liu, Simonyan & Yang, ICLR 2019). Nodes 0 and 1 are the
  cell inputs (outputs of the previous-previous and previous cells), nodes 2..5 are the
  intermediate nodes; the supernet has the 14 edges :data:`DARTS_EDGES`. A genotype keeps two
  ``(op, input_index)`` pairs per intermediate node (:class:`DartsGenotype`, the paper's
  ``Genotype`` namedtuple) for the normal and the reduction cell.
* ``nb201`` — the NAS-Bench-201 cell (Dong & Yang, ICLR 2020): 4 nodes, the 6 edges
  :data:`NB201_EDGES`, one op each (``none`` allowed), written as the benchmark's arch string
  ``|op~0|+|op~0|op~1|+|op~0|op~1|op~2|`` (:class:`NB201Genotype`).
* ``chain`` — a ProxylessNAS-style chain of searchable blocks, one op name per block
  (:class:`ChainGenotype`).
* ``choices`` — any model with labelled choice points (:mod:`dnas.nnx`): label -> op name,
  or label -> chosen input indices (:class:`ChoiceGenotype`).

Everything that parses or validates raises :class:`GenotypeError` (a ``ValueError``) with a
message naming the offending token; nothing is silently repaired.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, ClassVar, Iterable, Mapping, Sequence, Union

import numpy as np

__all__ = [
    "DARTS_OPS", "NB201_OPS", "DARTS_EDGES", "NB201_EDGES", "DARTS_STEPS", "DARTS_CONCAT",
    "SPACES", "GenotypeError", "edge_label", "nb201_labels", "darts_labels",
    "DartsGenotype", "NB201Genotype", "ChainGenotype", "ChoiceGenotype", "Genotype",
    "DARTS_V2", "derive_darts", "derive_darts_cell", "derive_nb201", "derive_chain",
    "nb201_ops_to_string", "nb201_string_to_ops", "parse_nb201", "validate_chain_ops",
    "darts_genotype_repr", "parse_darts_genotype_repr", "genotype_to_json",
    "genotype_from_json", "save_genotype", "load_genotype",
]

# ----------------------------------------------------------------------------- constants

#: The DARTS paper's PRIMITIVES, in their order (columns of a DARTS score matrix).
DARTS_OPS: tuple[str, ...] = ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect",
                              "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5")
#: NAS-Bench-201's operations, in order (columns of a NAS-Bench-201 score matrix).
NB201_OPS: tuple[str, ...] = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")

#: Number of intermediate nodes of a DARTS cell.
DARTS_STEPS: int = 4
#: The DARTS cell's (src, dst) edges: for dst in 2..5, for src in 0..dst-1.
DARTS_EDGES: list[tuple[int, int]] = [(s, d) for d in range(2, 2 + DARTS_STEPS) for s in range(d)]
#: The default (and DARTS paper's) concat list: all intermediate nodes.
DARTS_CONCAT: tuple[int, ...] = tuple(range(2, 2 + DARTS_STEPS))
#: NAS-Bench-201's (src, dst) edges in arch-string order.
NB201_EDGES: list[tuple[int, int]] = [(s, d) for d in range(1, 4) for s in range(d)]

SPACES: tuple[str, ...] = ("darts", "nb201", "chain", "choices")

_DARTS_NONE = DARTS_OPS.index("none")
_DARTS_CELL_OPS = tuple(op for op in DARTS_OPS if op != "none")

assert DARTS_EDGES == [(0, 2), (1, 2), (0, 3), (1, 3), (2, 3), (0, 4), (1, 4), (2, 4), (3, 4),
                       (0, 5), (1, 5), (2, 5), (3, 5), (4, 5)]
assert NB201_EDGES == [(0, 1), (0, 2), (1, 2), (0, 3), (1, 3), (2, 3)]


class GenotypeError(ValueError):
    """A malformed or invalid genotype, arch string, score matrix or genotype file."""


def _valid_list(valid: Iterable[str]) -> str:
    return ", ".join(valid)


def _check_op(op: Any, valid: Sequence[str], where: str) -> str:
    if not isinstance(op, str):
        raise GenotypeError(f"{where}: operation must be a string, got {type(op).__name__} {op!r}")
    if op not in valid:
        raise GenotypeError(f"{where}: unknown operation {op!r}; valid operations are: {_valid_list(valid)}")
    return op


def _check_int(x: Any, where: str) -> int:
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)):
        raise GenotypeError(f"{where}: expected an integer, got {type(x).__name__} {x!r}")
    return int(x)


def _check_seq(x: Any, where: str) -> Sequence:
    if isinstance(x, (str, bytes)) or not isinstance(x, (list, tuple)):
        raise GenotypeError(f"{where}: expected a list, got {type(x).__name__} {x!r}")
    return x


# ----------------------------------------------------------------------------- genotypes

def _validate_darts_cell(pairs: Any, name: str) -> tuple[tuple[str, int], ...]:
    pairs = _check_seq(pairs, f"DARTS {name}")
    n_expected = 2 * DARTS_STEPS
    if len(pairs) != n_expected:
        raise GenotypeError(f"DARTS {name}: expected {n_expected} (op, input_index) pairs "
                            f"(two per intermediate node 2..{1 + DARTS_STEPS}), got {len(pairs)}")
    out = []
    for i, pair in enumerate(pairs):
        node = 2 + i // 2
        where = f"DARTS {name} pair {i} (node {node})"
        if isinstance(pair, (str, bytes)) or not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise GenotypeError(f"{where}: expected an (op, input_index) pair, got {pair!r}")
        op, idx = pair
        if op == "none":
            raise GenotypeError(f"{where}: operation 'none' is not allowed in a DARTS genotype "
                                f"(derived cells never select 'none'); valid operations are: "
                                f"{_valid_list(_DARTS_CELL_OPS)}")
        op = _check_op(op, _DARTS_CELL_OPS, where)
        idx = _check_int(idx, where + " input_index")
        if not 0 <= idx < node:
            raise GenotypeError(f"{where}: input index {idx} out of range for node {node} "
                                f"(must be in 0..{node - 1})")
        out.append((op, idx))
    return tuple(out)


def _validate_concat(concat: Any, name: str) -> tuple[int, ...]:
    concat = _check_seq(concat, f"DARTS {name}")
    vals = [_check_int(c, f"DARTS {name}") for c in concat]
    if not vals:
        raise GenotypeError(f"DARTS {name}: concat list is empty")
    for c in vals:
        if not 2 <= c < 2 + DARTS_STEPS:
            raise GenotypeError(f"DARTS {name}: node {c} is not an intermediate node "
                                f"(must be in {list(DARTS_CONCAT)})")
    if any(b <= a for a, b in zip(vals, vals[1:])):
        raise GenotypeError(f"DARTS {name}: concat list {vals} must be strictly increasing without duplicates")
    return tuple(vals)


class _ChoiceMapping:
    """What every genotype is: a mapping from choice-point label to what was chosen there.

    A space's choice points are labelled (:meth:`dnas.supernet.space_base.SearchSpace.choice_labels`):
    NAS-Bench-201's edges ``"0->1"`` .. ``"2->3"``, a DARTS cell's edges ``"normal/0->2"`` ..
    ``"reduce/4->5"``, a chain's blocks ``"block0"`` .., a user model's labels. ``g[label]``,
    ``iter(g)``, ``g.items()`` and :attr:`choices` read a genotype through those labels whatever
    its space, so code that walks an architecture needs no branch per space; the NB201 arch
    string and the DARTS ``Genotype`` are printers of the same mapping (``from_choices`` parses
    it back). Subclasses provide ``choices`` (a property, or ChoiceGenotype's field)."""

    choices: Any

    def __getitem__(self, label: str):
        choices = self.choices
        if label not in choices:
            raise KeyError(f"{type(self).__name__} has no choice point {label!r}; its labels: {', '.join(choices)}")
        return choices[label]

    def __iter__(self):
        return iter(self.choices)

    def __len__(self) -> int:
        return len(self.choices)

    def __contains__(self, label) -> bool:
        return label in self.choices

    def keys(self):
        return self.choices.keys()

    def items(self):
        return self.choices.items()


def _labels_check(choices: Any, expected: Sequence[str], what: str) -> None:
    """Refuse a mapping whose labels are not exactly ``expected``, naming the missing and unknown ones."""
    if not isinstance(choices, Mapping):
        raise GenotypeError(f"{what} choices: expected a mapping label -> op, got {type(choices).__name__}")
    missing = [k for k in expected if k not in choices]
    extra = [k for k in choices if k not in expected]
    problems = ([f"missing label(s) {missing}"] if missing else []) + ([f"unknown label(s) {extra}"] if extra else [])
    if problems:
        raise GenotypeError(f"{what} choices: {'; '.join(problems)} (labels: {', '.join(expected)})")


def edge_label(src: int, dst: int) -> str:
    """A cell edge's choice-point name, ``"src->dst"``: the spaces' row names and the genotypes' keys."""
    return f"{src}->{dst}"


def nb201_labels() -> list[str]:
    """The choice-point labels of a NAS-Bench-201 genotype, in :data:`NB201_EDGES` order."""
    return [edge_label(s, d) for s, d in NB201_EDGES]


def darts_labels() -> list[str]:
    """The choice-point labels of a DARTS genotype: ``"{normal|reduce}/{src}->{dst}"`` per edge
    of :data:`DARTS_EDGES`, normal cell first."""
    return [f"{kind}/{edge_label(s, d)}" for kind in ("normal", "reduce") for s, d in DARTS_EDGES]


@dataclasses.dataclass(frozen=True)
class DartsGenotype(_ChoiceMapping):
    """The DARTS paper's ``Genotype``: per intermediate node 2..5 two ``(op, input_index)``
    pairs (pairs ``2k, 2k+1`` feed node ``k+2``), and the nodes concatenated as the output.

    As a mapping (:class:`_ChoiceMapping`) it is the op on each of the supernet's 28 edges
    (``"normal/0->2"`` ..), ``none`` on the edges derivation dropped: the α rows it came from.
    Fields are stored as tuples; lists are accepted. Validated on construction.
    """

    normal: tuple[tuple[str, int], ...]
    normal_concat: tuple[int, ...]
    reduce: tuple[tuple[str, int], ...]
    reduce_concat: tuple[int, ...]
    space: ClassVar[str] = "darts"

    def __post_init__(self):
        object.__setattr__(self, "normal", _validate_darts_cell(self.normal, "normal"))
        object.__setattr__(self, "normal_concat", _validate_concat(self.normal_concat, "normal_concat"))
        object.__setattr__(self, "reduce", _validate_darts_cell(self.reduce, "reduce"))
        object.__setattr__(self, "reduce_concat", _validate_concat(self.reduce_concat, "reduce_concat"))

    def cell(self, kind: str) -> tuple[tuple[str, int], ...]:
        """The pairs of the ``"normal"`` or ``"reduce"`` cell."""
        if kind not in ("normal", "reduce"):
            raise GenotypeError(f"unknown DARTS cell kind {kind!r}; expected 'normal' or 'reduce'")
        return getattr(self, kind)

    def concat(self, kind: str) -> tuple[int, ...]:
        self.cell(kind)
        return getattr(self, f"{kind}_concat")

    def edges(self, kind: str) -> list[tuple[int, int, str]]:
        """``(src, dst, op)`` for the chosen edges of a cell, in genotype order."""
        return [(idx, 2 + i // 2, op) for i, (op, idx) in enumerate(self.cell(kind))]

    def to_repr(self) -> str:
        return darts_genotype_repr(self)

    @property
    def choices(self) -> dict[str, str]:
        out = dict.fromkeys(darts_labels(), "none")
        for kind in ("normal", "reduce"):
            for src, dst, op in self.edges(kind):
                label = f"{kind}/{edge_label(src, dst)}"
                if out[label] != "none":
                    raise GenotypeError(f"DARTS {kind} cell: edge {src}->{dst} carries two ops ({out[label]!r} "
                                        f"and {op!r}); a choice-point mapping holds one op per edge")
                out[label] = op
        return out

    @classmethod
    def from_choices(cls, choices: Mapping[str, str]) -> "DartsGenotype":
        """The genotype of an op per edge (:func:`darts_labels`; ``none`` for an edge not kept):
        every intermediate node must keep exactly two edges, as DARTS's derivation does. The
        concat lists are all intermediate nodes."""
        _labels_check(choices, darts_labels(), "DARTS")
        cells = {}
        for kind in ("normal", "reduce"):
            pairs = []
            for node in range(2, 2 + DARTS_STEPS):
                kept = [(choices[f"{kind}/{edge_label(s, node)}"], s) for s in range(node)
                        if choices[f"{kind}/{edge_label(s, node)}"] != "none"]
                if len(kept) != 2:
                    raise GenotypeError(f"DARTS {kind} cell: node {node} keeps {len(kept)} input edge(s) "
                                        f"{[f'{s}->{node}={op}' for op, s in kept]}; a DARTS cell keeps exactly 2")
                pairs += kept
            cells[kind] = pairs
        return cls(cells["normal"], DARTS_CONCAT, cells["reduce"], DARTS_CONCAT)


def _validate_nb201_ops(ops: Any) -> tuple[str, ...]:
    ops = _check_seq(ops, "NAS-Bench-201 ops")
    if len(ops) != len(NB201_EDGES):
        raise GenotypeError(f"NAS-Bench-201 ops: expected {len(NB201_EDGES)} operations "
                            f"(one per edge), got {len(ops)}")
    return tuple(_check_op(op, NB201_OPS, f"NAS-Bench-201 edge {s}->{d}")
                 for op, (s, d) in zip(ops, NB201_EDGES))


@dataclasses.dataclass(frozen=True)
class NB201Genotype(_ChoiceMapping):
    """A NAS-Bench-201 cell: one op per edge of :data:`NB201_EDGES` (``none`` allowed). As a
    mapping: edge label ``"0->1"`` .. ``"2->3"`` -> op; :attr:`arch` prints it as the
    benchmark's arch string."""

    ops: tuple[str, ...]
    space: ClassVar[str] = "nb201"

    def __post_init__(self):
        object.__setattr__(self, "ops", _validate_nb201_ops(self.ops))

    @property
    def arch(self) -> str:
        """The benchmark's arch string ``|op~0|+|op~0|op~1|+|op~0|op~1|op~2|``."""
        return nb201_ops_to_string(self.ops)

    @classmethod
    def from_arch(cls, s: str) -> "NB201Genotype":
        return cls(tuple(nb201_string_to_ops(s)))

    def edges(self) -> list[tuple[int, int, str]]:
        return [(s, d, op) for (s, d), op in zip(NB201_EDGES, self.ops)]

    @property
    def choices(self) -> dict[str, str]:
        return dict(zip(nb201_labels(), self.ops))

    @classmethod
    def from_choices(cls, choices: Mapping[str, str]) -> "NB201Genotype":
        labels = nb201_labels()
        _labels_check(choices, labels, "NAS-Bench-201")
        return cls(tuple(choices[k] for k in labels))

    def __str__(self) -> str:
        return self.arch


def validate_chain_ops(ops: Any, op_names: Sequence[str] | None = None) -> tuple[str, ...]:
    """Check a chain genotype's op list: a non-empty list of non-empty strings, and, when
    ``op_names`` is given, every op among them. Returns the ops as a tuple."""
    ops = _check_seq(ops, "chain ops")
    if not ops:
        raise GenotypeError("chain ops: the list is empty (need one op per searchable block)")
    out = []
    for i, op in enumerate(ops):
        where = f"chain block {i}"
        if not isinstance(op, str):
            raise GenotypeError(f"{where}: operation must be a string, got {type(op).__name__} {op!r}")
        if not op or op != op.strip():
            raise GenotypeError(f"{where}: invalid operation name {op!r}")
        if op_names is not None:
            _check_op(op, tuple(op_names), where)
        out.append(op)
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class ChainGenotype(_ChoiceMapping):
    """A chain of searchable blocks (ProxylessNAS-style): one op name per block, e.g.
    ``mb_k3_e3``, ``mb_k5_e6`` or ``zero``; as a mapping ``"block{i}"`` -> op. Op names are
    checked for form here; use :meth:`check` / :func:`validate_chain_ops` to check them against a
    space's op list."""

    ops: tuple[str, ...]
    space: ClassVar[str] = "chain"

    def __post_init__(self):
        object.__setattr__(self, "ops", validate_chain_ops(self.ops))

    def check(self, op_names: Sequence[str]) -> "ChainGenotype":
        """Raise :class:`GenotypeError` unless every op is in ``op_names``; returns self."""
        validate_chain_ops(self.ops, op_names)
        return self

    @property
    def choices(self) -> dict[str, str]:
        return {f"block{i}": op for i, op in enumerate(self.ops)}

    @classmethod
    def from_choices(cls, choices: Mapping[str, str]) -> "ChainGenotype":
        if not isinstance(choices, Mapping) or not choices:
            raise GenotypeError(f"chain choices: expected a non-empty mapping 'block<i>' -> op, got {choices!r}")
        _labels_check(choices, [f"block{i}" for i in range(len(choices))], "chain")
        return cls(tuple(choices[f"block{i}"] for i in range(len(choices))))


def natural_key(label: str):
    """Sort ``block2`` before ``block10``: digit runs compare as numbers."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", label)]


@dataclasses.dataclass(frozen=True)
class ChoiceGenotype(_ChoiceMapping):
    """The architecture of a model with labelled choice points (:mod:`dnas.nnx`): a mapping
    from each choice point's label to what was chosen there, an op name for a
    :class:`dnas.nnx.Choice`, a sorted tuple of input indices for a :class:`dnas.nnx.InputChoice`.
    ``model`` names the searched model (its class or the space's name), for the record."""

    choices: Mapping[str, Any]
    model: str = "model"
    space: ClassVar[str] = "choices"

    def __post_init__(self):
        if not isinstance(self.choices, Mapping) or not self.choices:
            raise GenotypeError(f"choice genotype: choices must be a non-empty mapping label -> choice, "
                                f"got {self.choices!r}")
        clean = {}
        for label, choice in self.choices.items():
            if not isinstance(label, str) or not label:
                raise GenotypeError(f"choice genotype: label {label!r} is not a non-empty string")
            if isinstance(choice, str):
                clean[label] = choice
            elif isinstance(choice, (list, tuple)) and choice and all(isinstance(i, (int, np.integer))
                                                                      and not isinstance(i, bool) for i in choice):
                clean[label] = tuple(sorted(int(i) for i in choice))
            else:
                raise GenotypeError(f"choice genotype: choice {choice!r} of {label!r} is neither an op name "
                                    "nor a non-empty list of input indices")
        # in natural order (block2 before block10), as the model's labels read
        object.__setattr__(self, "choices", dict(sorted(clean.items(), key=lambda item: natural_key(item[0]))))

    @classmethod
    def from_choices(cls, choices: Mapping[str, Any], model: str = "model") -> "ChoiceGenotype":
        return cls(choices, model)

    def __str__(self) -> str:
        return ", ".join(f"{k}={v if isinstance(v, str) else list(v)}" for k, v in self.choices.items())


Genotype = Union[DartsGenotype, NB201Genotype, ChainGenotype, ChoiceGenotype]

#: DARTS (second order) published cell, from the DARTS paper's genotypes.py.
DARTS_V2 = DartsGenotype(
    normal=(("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
            ("sep_conv_3x3", 1), ("skip_connect", 0), ("skip_connect", 0), ("dil_conv_3x3", 2)),
    normal_concat=(2, 3, 4, 5),
    reduce=(("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 1),
            ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("max_pool_3x3", 1)),
    reduce_concat=(2, 3, 4, 5),
)


# ----------------------------------------------------------------------------- NB201 strings

def nb201_ops_to_string(ops: Sequence[str]) -> str:
    """6 ops in :data:`NB201_EDGES` order -> ``|op~0|+|op~0|op~1|+|op~0|op~1|op~2|``."""
    if isinstance(ops, (str, bytes)):
        raise GenotypeError(f"NAS-Bench-201 ops: expected a sequence of 6 op names, got the string {ops!r}")
    try:
        ops = list(ops)
    except TypeError:
        raise GenotypeError(f"NAS-Bench-201 ops: expected a sequence of 6 op names, got {type(ops).__name__}") from None
    ops = _validate_nb201_ops(ops)
    groups, k = [], 0
    for d in range(1, 4):
        groups.append("|".join(f"{ops[k + s]}~{s}" for s in range(d)))
        k += d
    return "|" + "|+|".join(groups) + "|"


def nb201_string_to_ops(s: str) -> list[str]:
    """Parse a NAS-Bench-201 arch string into its 6 ops in :data:`NB201_EDGES` order.

    Strict: exactly 3 ``+``-separated node groups, node ``d`` lists ``op~0 .. op~{d-1}`` in
    that order, each op in :data:`NB201_OPS`, no whitespace or empty tokens."""
    if not isinstance(s, str):
        raise GenotypeError(f"NAS-Bench-201 arch string must be a str, got {type(s).__name__} {s!r}")
    groups = s.split("+")
    if len(groups) != 3:
        raise GenotypeError(f"malformed NAS-Bench-201 arch string {s!r}: expected 3 '+'-separated "
                            f"node groups (nodes 1, 2, 3), got {len(groups)} nodes")
    ops: list[str] = []
    for d, group in enumerate(groups, start=1):
        if len(group) < 2 or not group.startswith("|") or not group.endswith("|"):
            raise GenotypeError(f"malformed NAS-Bench-201 arch string {s!r}: node {d} group {group!r} "
                                f"must be enclosed in '|' like '|op~0|'")
        tokens = group[1:-1].split("|")
        if len(tokens) != d:
            raise GenotypeError(f"malformed NAS-Bench-201 arch string {s!r}: node {d} group {group!r} "
                                f"has {len(tokens)} edges, expected {d}")
        for src, tok in enumerate(tokens):
            if tok.count("~") != 1:
                raise GenotypeError(f"malformed NAS-Bench-201 arch string {s!r}: edge token {tok!r} "
                                    f"of node {d} must look like 'op~{src}'")
            op, idx = tok.split("~")
            if not (idx.isascii() and idx.isdigit()):
                raise GenotypeError(f"malformed NAS-Bench-201 arch string {s!r}: bad input index "
                                    f"'~{idx}' in token {tok!r} of node {d}")
            if idx != str(src):
                raise GenotypeError(f"malformed NAS-Bench-201 arch string {s!r}: wrong source index "
                                    f"'~{idx}' in token {tok!r}: edge {src} of node {d} must come "
                                    f"from node {src} (sources listed in order 0..{d - 1})")
            ops.append(_check_op(op, NB201_OPS, f"NAS-Bench-201 arch string {s!r}, edge {src}->{d}"))
    return ops


def parse_nb201(s: str) -> NB201Genotype:
    """Arch string -> :class:`NB201Genotype`."""
    return NB201Genotype(tuple(nb201_string_to_ops(s)))


# ----------------------------------------------------------------------------- derivation

def _scores(scores: Any, shape: tuple[int | None, int], what: str) -> np.ndarray:
    try:
        w = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise GenotypeError(f"{what}: scores are not a numeric array ({e})") from None
    rows, cols = shape
    if w.ndim != 2 or (rows is not None and w.shape[0] != rows) or w.shape[1] != cols:
        want = f"({rows if rows is not None else 'L'}, {cols})"
        raise GenotypeError(f"{what}: expected a score matrix of shape {want}, got shape {w.shape}")
    if not np.all(np.isfinite(w)):
        bad = np.argwhere(~np.isfinite(w))[0]
        raise GenotypeError(f"{what}: scores contain a non-finite value ({w[tuple(bad)]}) at {tuple(int(b) for b in bad)}")
    return w


def derive_darts_cell(scores: Any, name: str = "cell") -> tuple[tuple[str, int], ...]:
    """One DARTS cell from a (14, 8) score matrix (rows: :data:`DARTS_EDGES`, columns:
    :data:`DARTS_OPS`).

    For each intermediate node: edge strength = max score over ops other than ``none``; keep
    the 2 strongest incoming edges (ties -> lower edge index), each with its best non-``none``
    op (ties -> lower op index), listed by strength descending."""
    w = _scores(scores, (len(DARTS_EDGES), len(DARTS_OPS)), f"derive_darts {name}")
    keep_cols = [k for k in range(len(DARTS_OPS)) if k != _DARTS_NONE]
    sub = w[:, keep_cols]
    strength = sub.max(axis=1)
    best = [DARTS_OPS[keep_cols[int(j)]] for j in sub.argmax(axis=1)]  # argmax: first max
    pairs: list[tuple[str, int]] = []
    for dst in range(2, 2 + DARTS_STEPS):
        incoming = [e for e, (_, d) in enumerate(DARTS_EDGES) if d == dst]
        chosen = sorted(incoming, key=lambda e: (-strength[e], e))[:2]
        pairs.extend((best[e], DARTS_EDGES[e][0]) for e in chosen)
    return tuple(pairs)


def derive_darts(normal_scores: Any, reduce_scores: Any) -> DartsGenotype:
    """DARTS genotype from the normal and reduction cells' (14, 8) score matrices (e.g.
    softmax(alpha) per row, possibly times an edge-level score), as in DARTS's ``genotype()``."""
    return DartsGenotype(normal=derive_darts_cell(normal_scores, "normal"), normal_concat=DARTS_CONCAT,
                         reduce=derive_darts_cell(reduce_scores, "reduce"), reduce_concat=DARTS_CONCAT)


def derive_nb201(scores: Any) -> str:
    """NAS-Bench-201 arch string from a (6, 5) score matrix: argmax per edge over all ops,
    ``none`` included (ties -> lower op index)."""
    w = _scores(scores, (len(NB201_EDGES), len(NB201_OPS)), "derive_nb201")
    return nb201_ops_to_string([NB201_OPS[int(k)] for k in w.argmax(axis=1)])


def derive_chain(scores: Any, op_names: Sequence[str]) -> list[str]:
    """Chain genotype ops from an (L, K) score matrix: argmax per block (ties -> lower index)."""
    op_names = list(op_names)
    if not op_names:
        raise GenotypeError("derive_chain: op_names is empty")
    w = _scores(scores, (None, len(op_names)), "derive_chain")
    if w.shape[0] == 0:
        raise GenotypeError("derive_chain: score matrix has no rows (no searchable blocks)")
    ops = [op_names[int(k)] for k in w.argmax(axis=1)]
    return list(validate_chain_ops(ops))


# ----------------------------------------------------------------------------- DARTS repr

def darts_genotype_repr(g: DartsGenotype) -> str:
    """The DARTS paper's Python repr of a genotype, ``Genotype(normal=[('sep_conv_3x3', 0), ...],
    normal_concat=[2, 3, 4, 5], reduce=[...], reduce_concat=[2, 3, 4, 5])``."""
    if not isinstance(g, DartsGenotype):
        raise GenotypeError(f"darts_genotype_repr: expected a DartsGenotype, got {type(g).__name__}")

    def cell(pairs):
        return "[" + ", ".join(f"({op!r}, {idx})" for op, idx in pairs) + "]"

    return (f"Genotype(normal={cell(g.normal)}, normal_concat={list(g.normal_concat)}, "
            f"reduce={cell(g.reduce)}, reduce_concat={list(g.reduce_concat)})")


_REPR_FIELDS = ("normal", "normal_concat", "reduce", "reduce_concat")


def _repr_value(node: ast.AST, field: str) -> Any:
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("range", "list")
            and not node.keywords):
        if node.func.id == "list":
            if len(node.args) != 1:
                raise GenotypeError(f"DARTS genotype repr: {field}: list(...) takes one argument")
            return _repr_value(node.args[0], field)
        if not 1 <= len(node.args) <= 3:
            raise GenotypeError(f"DARTS genotype repr: {field}: range(...) takes 1 to 3 arguments")
        args = []
        for a in node.args:
            try:
                v = ast.literal_eval(a)
            except (ValueError, SyntaxError, TypeError):
                v = None
            if isinstance(v, bool) or not isinstance(v, int):
                raise GenotypeError(f"DARTS genotype repr: {field}: range() arguments must be integer literals, "
                                    f"got {ast.unparse(a)!r}")
            args.append(v)
        return list(range(*args))
    try:
        return ast.literal_eval(node)
    except (ValueError, SyntaxError, TypeError):
        raise GenotypeError(f"DARTS genotype repr: {field}: not a literal: {ast.unparse(node)!r}") from None


def parse_darts_genotype_repr(s: str) -> DartsGenotype:
    """Parse the DARTS paper's repr ``Genotype(normal=[...], normal_concat=[2, 3, 4, 5], ...)``
    (``range(2, 6)`` accepted for the concat lists; an optional leading ``NAME = `` too).
    Parsed with :mod:`ast` (literals only), never evaluated."""
    if not isinstance(s, str):
        raise GenotypeError(f"DARTS genotype repr must be a str, got {type(s).__name__}")
    text = s.strip()
    try:
        tree = ast.parse(text, mode="eval")
        call = tree.body
    except SyntaxError:
        try:
            mod = ast.parse(text, mode="exec")
        except SyntaxError as e:
            raise GenotypeError(f"DARTS genotype repr is not valid Python syntax: {e.msg} "
                                f"(line {e.lineno}, column {e.offset}): {text[:80]!r}") from None
        if len(mod.body) != 1 or not isinstance(mod.body[0], ast.Assign):
            raise GenotypeError(f"DARTS genotype repr: expected 'Genotype(...)' or 'NAME = Genotype(...)', "
                                f"got {text[:80]!r}")
        call = mod.body[0].value
    if not isinstance(call, ast.Call):
        raise GenotypeError(f"DARTS genotype repr: expected a call 'Genotype(...)', got {text[:80]!r}")
    fname = (call.func.id if isinstance(call.func, ast.Name)
             else call.func.attr if isinstance(call.func, ast.Attribute) else None)
    if fname != "Genotype":
        raise GenotypeError(f"DARTS genotype repr: expected 'Genotype(...)', got a call to "
                            f"{ast.unparse(call.func)!r}")
    if len(call.args) > len(_REPR_FIELDS):
        raise GenotypeError(f"DARTS genotype repr: too many positional arguments ({len(call.args)})")
    values: dict[str, Any] = {}
    for field, node in zip(_REPR_FIELDS, call.args):
        if isinstance(node, ast.Starred):
            raise GenotypeError("DARTS genotype repr: starred arguments are not allowed")
        values[field] = _repr_value(node, field)
    for kw in call.keywords:
        if kw.arg is None:
            raise GenotypeError("DARTS genotype repr: '**' arguments are not allowed")
        if kw.arg not in _REPR_FIELDS:
            raise GenotypeError(f"DARTS genotype repr: unknown field {kw.arg!r}; "
                                f"expected {', '.join(_REPR_FIELDS)}")
        if kw.arg in values:
            raise GenotypeError(f"DARTS genotype repr: field {kw.arg!r} given twice")
        values[kw.arg] = _repr_value(kw.value, kw.arg)
    missing = [f for f in _REPR_FIELDS if f not in values]
    if missing:
        raise GenotypeError(f"DARTS genotype repr: missing field(s) {', '.join(repr(m) for m in missing)}")
    return DartsGenotype(**values)


# ----------------------------------------------------------------------------- JSON

def genotype_to_json(g: Genotype) -> dict:
    """A JSON-ready dict: ``{"space": "nb201", "arch": ..., "ops": [...]}``,
    ``{"space": "darts", "normal": [[op, idx], ...], "normal_concat": [...], "reduce": ...,
    "reduce_concat": ...}`` or ``{"space": "chain", "ops": [...]}``; each also with
    ``"choices"``, the label -> op mapping (read back by nothing: the printed form is
    authoritative)."""
    if isinstance(g, NB201Genotype):
        return {"space": "nb201", "arch": g.arch, "ops": list(g.ops), "choices": g.choices}
    if isinstance(g, DartsGenotype):
        out = {"space": "darts",
               "normal": [[op, idx] for op, idx in g.normal], "normal_concat": list(g.normal_concat),
               "reduce": [[op, idx] for op, idx in g.reduce], "reduce_concat": list(g.reduce_concat)}
        try:
            out["choices"] = g.choices
        except GenotypeError:   # a hand-written cell with two ops on one edge has no per-edge mapping
            pass
        return out
    if isinstance(g, ChainGenotype):
        return {"space": "chain", "ops": list(g.ops), "choices": g.choices}
    if isinstance(g, ChoiceGenotype):
        return {"space": "choices", "model": g.model,
                "choices": {k: v if isinstance(v, str) else list(v) for k, v in g.choices.items()}}
    raise GenotypeError(f"genotype_to_json: not a genotype: {type(g).__name__} {g!r}")


def _require(d: Mapping, keys: Sequence[str], space: str) -> None:
    missing = [k for k in keys if k not in d]
    if missing:
        raise GenotypeError(f"{space} genotype JSON is missing required key(s) "
                            f"{', '.join(repr(k) for k in missing)}")


def genotype_from_json(d: Mapping, chain_op_names: Sequence[str] | None = None) -> Genotype:
    """Validated genotype from its JSON dict (see :func:`genotype_to_json`). Keys other than
    the required ones are ignored (for NB201, ``"arch"`` is authoritative). For chain
    genotypes, ``chain_op_names`` (if given) restricts the allowed op names."""
    if not isinstance(d, Mapping):
        raise GenotypeError(f"genotype JSON must be an object/dict, got {type(d).__name__}")
    if "space" not in d:
        raise GenotypeError(f"genotype JSON is missing required key 'space' (one of {', '.join(SPACES)}); "
                            f"keys present: {sorted(map(str, d))}")
    space = d["space"]
    if not isinstance(space, str) or space not in SPACES:
        raise GenotypeError(f"genotype JSON: unknown space {space!r}; valid spaces are: {', '.join(SPACES)}")
    if space == "nb201":
        _require(d, ["arch"], space)
        return parse_nb201(d["arch"])
    if space == "darts":
        _require(d, list(_REPR_FIELDS), space)
        return DartsGenotype(**{k: d[k] for k in _REPR_FIELDS})
    if space == "choices":
        _require(d, ["choices"], space)
        return ChoiceGenotype(d["choices"], str(d.get("model", "model")))
    _require(d, ["ops"], space)
    g = ChainGenotype(d["ops"])
    if chain_op_names is not None:
        g.check(chain_op_names)
    return g


def _json_default(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, (set, frozenset, tuple)):
        return list(x)
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "__array__"):  # jax arrays
        return np.asarray(x).tolist()
    raise TypeError(f"object of type {type(x).__name__} is not JSON serializable")


def save_genotype(g: Genotype, path: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``genotype_to_json(g)`` (plus the ``extra`` keys, e.g. scores or the epoch) as
    indented JSON to ``path`` (written atomically; parent folders created). An ``extra`` key
    that would change one of the genotype's own keys raises :class:`GenotypeError`."""
    path = Path(path)
    data = genotype_to_json(g)
    if extra is not None:
        if not isinstance(extra, Mapping):
            raise GenotypeError(f"save_genotype: extra must be a dict, got {type(extra).__name__}")
        for k, v in extra.items():
            if not isinstance(k, str):
                raise GenotypeError(f"save_genotype: extra key {k!r} is not a string")
            if k in data and json.loads(json.dumps(v, default=_json_default)) != data[k]:
                raise GenotypeError(f"save_genotype: extra key {k!r} conflicts with the genotype's own {k!r}")
            data.setdefault(k, v)
    try:
        text = json.dumps(data, indent=2, default=_json_default, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise GenotypeError(f"save_genotype: cannot serialise to JSON for {path}: {e}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def load_genotype(path: str | os.PathLike, chain_op_names: Sequence[str] | None = None) -> Genotype:
    """Read and validate a genotype JSON file written by :func:`save_genotype` (or by hand).
    Missing file, invalid JSON or invalid content -> :class:`GenotypeError` naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GenotypeError(f"genotype file {str(path)!r} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise GenotypeError(f"cannot read genotype file {str(path)!r}: {e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise GenotypeError(f"genotype file {str(path)!r} is not valid JSON: {e.msg} "
                            f"(line {e.lineno}, column {e.colno})") from None
    try:
        return genotype_from_json(data, chain_op_names=chain_op_names)
    except GenotypeError as e:
        raise GenotypeError(f"genotype file {str(path)!r}: {e}") from None
