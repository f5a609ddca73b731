"""Genotypes: NB201 strings, DARTS/NB201/chain derivation, validation, JSON I/O, pictures."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from dnas.supernet.genotype import (DARTS_EDGES, DARTS_OPS, DARTS_V2, NB201_EDGES, NB201_OPS,
                                    ChainGenotype, DartsGenotype, GenotypeError, NB201Genotype,
                                    darts_genotype_repr, derive_chain, derive_darts, derive_nb201,
                                    genotype_from_json, genotype_to_json, load_genotype,
                                    nb201_ops_to_string, nb201_string_to_ops,
                                    parse_darts_genotype_repr, parse_nb201, save_genotype)

NB201_CSV = Path(__file__).resolve().parents[2] / "shared" / "data" / "nb201" / "nats_bench_200ep.csv"

EXAMPLE_ARCH = ("|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+"
                "|skip_connect~0|nor_conv_3x3~1|skip_connect~2|")
EXAMPLE_OPS = ["nor_conv_3x3", "nor_conv_3x3", "avg_pool_3x3", "skip_connect", "nor_conv_3x3", "skip_connect"]

# The DARTS paper's genotypes.py text for DARTS_V2 (concat written as range(2, 6) there).
DARTS_V2_PAPER = (
    "Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), "
    "('sep_conv_3x3', 1), ('sep_conv_3x3', 1), ('skip_connect', 0), ('skip_connect', 0), "
    "('dil_conv_3x3', 2)], normal_concat=[2, 3, 4, 5], reduce=[('max_pool_3x3', 0), "
    "('max_pool_3x3', 1), ('skip_connect', 2), ('max_pool_3x3', 1), ('max_pool_3x3', 0), "
    "('skip_connect', 2), ('skip_connect', 2), ('max_pool_3x3', 1)], reduce_concat=[2, 3, 4, 5])")


def _op(name: str) -> int:
    return DARTS_OPS.index(name)


# ----------------------------------------------------------------------------- constants

def test_constants():
    assert DARTS_OPS == ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect",
                         "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5")
    assert NB201_OPS == ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")
    assert DARTS_EDGES == [(0, 2), (1, 2), (0, 3), (1, 3), (2, 3), (0, 4), (1, 4), (2, 4), (3, 4),
                           (0, 5), (1, 5), (2, 5), (3, 5), (4, 5)]
    assert NB201_EDGES == [(0, 1), (0, 2), (1, 2), (0, 3), (1, 3), (2, 3)]
    assert (DartsGenotype.space, NB201Genotype.space, ChainGenotype.space) == ("darts", "nb201", "chain")
    assert DARTS_V2.space == "darts"


# ----------------------------------------------------------------------------- NAS-Bench-201 strings

def test_nb201_example_string():
    assert nb201_string_to_ops(EXAMPLE_ARCH) == EXAMPLE_OPS
    assert nb201_ops_to_string(EXAMPLE_OPS) == EXAMPLE_ARCH
    g = parse_nb201(EXAMPLE_ARCH)
    assert g.ops == tuple(EXAMPLE_OPS) and g.arch == EXAMPLE_ARCH and str(g) == EXAMPLE_ARCH
    assert NB201Genotype.from_arch(EXAMPLE_ARCH) == g
    assert g.edges()[2] == (1, 2, "avg_pool_3x3")


def test_nb201_all_benchmark_strings_round_trip():
    if not NB201_CSV.is_file():
        pytest.skip(f"NAS-Bench-201 table not available ({NB201_CSV.name})")
    with NB201_CSV.open(newline="") as f:
        reader = csv.DictReader(f)
        assert "ArchitectureString" in reader.fieldnames
        archs = [row["ArchitectureString"] for row in reader]
    assert len(archs) == 15625
    seen = set()
    for arch in archs:
        ops = nb201_string_to_ops(arch)
        assert len(ops) == 6
        assert nb201_ops_to_string(ops) == arch
        seen.add(tuple(ops))
    assert len(seen) == 5 ** 6 == 15625


@pytest.mark.parametrize("bad, token", [
    ("|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|", "got 2 nodes"),
    (EXAMPLE_ARCH + "+|none~0|none~1|none~2|none~3|", "got 4 nodes"),
    ("|nor_conv_3x3~0|+|nor_conv_3x3~0|+|skip_connect~0|nor_conv_3x3~1|skip_connect~2|", "has 1 edges, expected 2"),
    ("|nor_conv_3x3~0|none~1|+|nor_conv_3x3~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_3x3~1|skip_connect~2|",
     "has 2 edges, expected 1"),
    ("|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~x|+|skip_connect~0|nor_conv_3x3~1|skip_connect~2|", "~x"),
    ("|nor_conv_3x3~0|+|nor_conv_3x3~1|avg_pool_3x3~0|+|skip_connect~0|nor_conv_3x3~1|skip_connect~2|",
     "wrong source index '~1'"),
    ("|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_3x3~1|skip_connect~3|", "'~3'"),
    ("|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~01|+|skip_connect~0|nor_conv_3x3~1|skip_connect~2|", "'~01'"),
    ("|nor_conv_3x3|+|nor_conv_3x3~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_3x3~1|skip_connect~2|",
     "'nor_conv_3x3'"),
    ("|conv_7x7~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_3x3~1|skip_connect~2|", "'conv_7x7'"),
    ("nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_3x3~1|skip_connect~2|",
     "'nor_conv_3x3~0|'"),
    (" " + EXAMPLE_ARCH, "must be enclosed"),
    (EXAMPLE_ARCH.replace("avg_pool_3x3", "avg_pool_3x3 "), "'avg_pool_3x3 '"),
    ("", "got 1 nodes"),
])
def test_nb201_malformed_strings(bad, token):
    with pytest.raises(GenotypeError) as exc:
        nb201_string_to_ops(bad)
    assert token in str(exc.value)


def test_nb201_unknown_op_lists_valid_ops():
    with pytest.raises(GenotypeError, match="conv_7x7") as exc:
        nb201_string_to_ops(EXAMPLE_ARCH.replace("avg_pool_3x3", "conv_7x7"))
    assert all(op in str(exc.value) for op in NB201_OPS)


def test_nb201_bad_ops_lists():
    with pytest.raises(GenotypeError, match="got 5"):
        nb201_ops_to_string(EXAMPLE_OPS[:5])
    with pytest.raises(GenotypeError, match="'max_pool_3x3'"):
        nb201_ops_to_string(EXAMPLE_OPS[:5] + ["max_pool_3x3"])
    with pytest.raises(GenotypeError, match="string"):
        nb201_ops_to_string("nor_conv_3x3")
    with pytest.raises(GenotypeError, match="must be a str"):
        nb201_string_to_ops(None)
    with pytest.raises(GenotypeError, match="expected a list"):
        NB201Genotype("nor_conv_3x3")


# ----------------------------------------------------------------------------- derivation

def test_derive_nb201_hand_set():
    w = np.zeros((6, 5))
    expected = ["nor_conv_3x3", "none", "avg_pool_3x3", "skip_connect", "nor_conv_1x1", "none"]
    for e, op in enumerate(expected):
        w[e, NB201_OPS.index(op)] = 1.0 + e
    w[1, :] = [0.9, 0.5, 0.5, 0.5, 0.5]        # `none` counts in NB201 derivation
    w[5, :] = 0.2                               # a tie goes to the lower op index (none)
    assert derive_nb201(w) == nb201_ops_to_string(expected)
    assert derive_nb201(w).startswith("|nor_conv_3x3~0|+|none~0|avg_pool_3x3~1|+")


def test_derive_darts_hand_set():
    n = np.zeros((14, 8))
    # node 2 (edges 0: 0->2, 1: 1->2): `none` is largest on edge 0 and must be ignored
    n[0, _op("none")] = 0.95
    n[0, _op("sep_conv_3x3")] = 0.30
    n[1, _op("max_pool_3x3")] = 0.50
    # node 3 (edges 2..4, srcs 0,1,2): all zero -> ties: edges 0->3, 1->3, op = lowest non-none
    # node 4 (edges 5..8, srcs 0..3): strongest 3->4 (dil_conv_5x5), then 0->4 (skip_connect)
    n[5, _op("skip_connect")] = 0.40
    n[6, _op("none")] = 0.99
    n[6, _op("avg_pool_3x3")] = 0.10
    n[7, _op("sep_conv_5x5")] = 0.20
    n[8, _op("dil_conv_5x5")] = 0.80
    # node 5 (edges 9..13, srcs 0..4): strengths 0.1, 0.7, 0.2, 0.9, 0.4 -> keep 3->5 then 1->5
    for e, (val, op) in zip(range(9, 14), [(0.1, "sep_conv_3x3"), (0.7, "dil_conv_3x3"),
                                            (0.2, "max_pool_3x3"), (0.9, "sep_conv_5x5"),
                                            (0.4, "skip_connect")]):
        n[e, _op(op)] = val
    n[9, _op("none")] = 5.0                      # a huge `none` does not make 0->5 strong
    n[11, _op("avg_pool_3x3")] = 0.2             # op tie on 2->5: lower op index wins (not kept anyway)

    r = np.full((14, 8), 0.1)
    r[:, _op("none")] = 0.9                      # `none` everywhere is ignored
    r[4, _op("dil_conv_3x3")] = 0.3              # 2->3
    r[3, _op("avg_pool_3x3")] = 0.2              # 1->3
    r[3, _op("sep_conv_3x3")] = 0.2              # op tie -> avg_pool_3x3 (lower index)

    g = derive_darts(n, r)
    assert g == DartsGenotype(
        normal=[("max_pool_3x3", 1), ("sep_conv_3x3", 0),
                ("max_pool_3x3", 0), ("max_pool_3x3", 1),
                ("dil_conv_5x5", 3), ("skip_connect", 0),
                ("sep_conv_5x5", 3), ("dil_conv_3x3", 1)],
        normal_concat=[2, 3, 4, 5],
        reduce=[("max_pool_3x3", 0), ("max_pool_3x3", 1),
                ("dil_conv_3x3", 2), ("avg_pool_3x3", 1),
                ("max_pool_3x3", 0), ("max_pool_3x3", 1),
                ("max_pool_3x3", 0), ("max_pool_3x3", 1)],
        reduce_concat=[2, 3, 4, 5])
    assert all(op != "none" for op, _ in g.normal + g.reduce)
    assert g.normal_concat == (2, 3, 4, 5)


def test_derive_darts_reproduces_darts_v2_from_scores():
    scores = {}
    for kind in ("normal", "reduce"):
        w = np.random.default_rng(0).uniform(0.0, 0.05, (14, 8))
        for i, (op, src) in enumerate(DARTS_V2.cell(kind)):
            dst = 2 + i // 2
            w[DARTS_EDGES.index((src, dst)), _op(op)] = 1.0 - 0.1 * (i % 2)
        scores[kind] = w
    assert derive_darts(scores["normal"], scores["reduce"]) == DARTS_V2


def test_derive_accepts_jax_arrays():
    jnp = pytest.importorskip("jax.numpy")
    w = jnp.zeros((6, 5)).at[:, 3].set(1.0)
    assert derive_nb201(w) == nb201_ops_to_string(["nor_conv_3x3"] * 6)


def test_derive_rejects_bad_scores():
    with pytest.raises(GenotypeError, match=r"\(6, 5\).*\(6, 4\)"):
        derive_nb201(np.zeros((6, 4)))
    with pytest.raises(GenotypeError, match=r"\(14, 8\)"):
        derive_darts(np.zeros((14, 7)), np.zeros((14, 8)))
    w = np.zeros((14, 8))
    w[3, 2] = np.nan
    with pytest.raises(GenotypeError, match="non-finite"):
        derive_darts(np.zeros((14, 8)), w)
    with pytest.raises(GenotypeError, match="not a numeric array"):
        derive_nb201([["a"] * 5] * 6)


def test_derive_chain():
    names = ["mb_k3_e3", "mb_k5_e6", "zero"]
    w = np.array([[0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.5, 0.5, 0.0], [0.9, 0.0, 0.1]])
    assert derive_chain(w, names) == ["mb_k5_e6", "zero", "mb_k3_e3", "mb_k3_e3"]
    assert ChainGenotype(derive_chain(w, names)).check(names).ops[1] == "zero"
    with pytest.raises(GenotypeError, match=r"\(L, 3\)"):
        derive_chain(np.zeros((4, 2)), names)


# ----------------------------------------------------------------------------- DARTS validation

def _cell(**over):
    pairs = list(DARTS_V2.normal)
    for i, p in over.items():
        pairs[int(i[1:])] = p
    return pairs


@pytest.mark.parametrize("kwargs, token", [
    (dict(normal=DARTS_V2.normal[:7]), "got 7"),
    (dict(normal=DARTS_V2.normal + (("skip_connect", 0),)), "got 9"),
    (dict(normal=_cell(p0=("conv_9x9", 0))), "'conv_9x9'"),
    (dict(normal=_cell(p2=("none", 1))), "'none'"),
    (dict(normal=_cell(p1=("sep_conv_3x3", 2))), "input index 2 out of range for node 2"),
    (dict(normal=_cell(p7=("sep_conv_3x3", 5))), "input index 5 out of range for node 5"),
    (dict(reduce=_cell(p3=("sep_conv_3x3", -1))), "input index -1"),
    (dict(normal=_cell(p4=("sep_conv_3x3", 1.0))), "1.0"),
    (dict(normal=_cell(p4=("sep_conv_3x3", True))), "True"),
    (dict(normal=_cell(p4=("sep_conv_3x3",))), "('sep_conv_3x3',)"),
    (dict(normal=_cell(p4="sep_conv_3x3")), "'sep_conv_3x3'"),
    (dict(normal="sep_conv_3x3"), "expected a list"),
    (dict(normal_concat=[2, 3, 4, 6]), "node 6"),
    (dict(normal_concat=[1, 2, 3]), "node 1"),
    (dict(reduce_concat=[]), "empty"),
    (dict(reduce_concat=[2, 2, 3]), "strictly increasing"),
    (dict(reduce_concat=[3, 2]), "strictly increasing"),
    (dict(reduce_concat=5), "expected a list"),
])
def test_darts_invalid_genotypes(kwargs, token):
    fields = dict(normal=DARTS_V2.normal, normal_concat=[2, 3, 4, 5],
                  reduce=DARTS_V2.reduce, reduce_concat=[2, 3, 4, 5])
    fields.update(kwargs)
    with pytest.raises(GenotypeError) as exc:
        DartsGenotype(**fields)
    assert token in str(exc.value)


def test_darts_unknown_op_lists_valid_ops():
    with pytest.raises(GenotypeError) as exc:
        DartsGenotype(_cell(p0=("conv_9x9", 0)), [2, 3, 4, 5], DARTS_V2.reduce, [2, 3, 4, 5])
    assert all(op in str(exc.value) for op in DARTS_OPS if op != "none")


def test_darts_genotype_normalises_to_tuples_and_is_hashable():
    g = DartsGenotype([list(p) for p in DARTS_V2.normal], [2, 3, 4, 5],
                      [list(p) for p in DARTS_V2.reduce], (2, 3, 4, 5))
    assert g == DARTS_V2 and hash(g) == hash(DARTS_V2)
    assert g.edges("normal")[-1] == (2, 5, "dil_conv_3x3")
    with pytest.raises(GenotypeError, match="'middle'"):
        g.cell("middle")


# ----------------------------------------------------------------------------- DARTS repr

def test_darts_v2_repr_round_trip():
    assert darts_genotype_repr(DARTS_V2) == DARTS_V2_PAPER
    assert parse_darts_genotype_repr(DARTS_V2_PAPER) == DARTS_V2
    paper_range = DARTS_V2_PAPER.replace("[2, 3, 4, 5]", "range(2, 6)")
    assert "range(2, 6)" in paper_range
    assert parse_darts_genotype_repr(paper_range) == DARTS_V2
    assert parse_darts_genotype_repr("DARTS_V2 = " + paper_range + "\n") == DARTS_V2
    assert parse_darts_genotype_repr(DARTS_V2.to_repr()) == DARTS_V2


@pytest.mark.parametrize("text, token", [
    ("__import__('os').system('echo hacked')", "system"),
    ("Genotype(normal=[], normal_concat=[2], reduce=[], reduce_concat=[2], extra=1)", "'extra'"),
    ("Genotype(normal=[('sep_conv_3x3', 0)] * 8, normal_concat=[2, 3, 4, 5], reduce=[], reduce_concat=[2])",
     "not a literal"),
    (DARTS_V2_PAPER.replace(", reduce_concat=[2, 3, 4, 5]", ""), "'reduce_concat'"),
    (DARTS_V2_PAPER.replace("range", "rang").replace("[2, 3, 4, 5]", "rang(2, 6)"), "rang(2, 6)"),
    (DARTS_V2_PAPER.replace("'dil_conv_3x3', 2", "'dil_conv_3x3', 7"), "input index 7"),
    (DARTS_V2_PAPER[:-1], "not valid Python syntax"),
    ("Genotype(normal=[], normal=[])", "given twice"),
])
def test_darts_repr_rejects(text, token):
    with pytest.raises(GenotypeError) as exc:
        parse_darts_genotype_repr(text)
    assert token in str(exc.value)


# ----------------------------------------------------------------------------- JSON

CHAIN_OPS = ["mb_k3_e3", "mb_k3_e6", "mb_k5_e3", "mb_k5_e6", "mb_k7_e3", "mb_k7_e6", "zero"]


@pytest.mark.parametrize("g", [
    DARTS_V2,
    parse_nb201(EXAMPLE_ARCH),
    ChainGenotype(["mb_k3_e3", "zero", "mb_k7_e6", "mb_k5_e6"]),
], ids=["darts", "nb201", "chain"])
def test_json_round_trip(g, tmp_path):
    d = genotype_to_json(g)
    assert d["space"] == g.space
    assert json.loads(json.dumps(d)) == d
    assert genotype_from_json(json.loads(json.dumps(d))) == g
    path = save_genotype(g, tmp_path / "sub" / "genotype.json", extra={"epoch": 3, "probs": np.eye(2)})
    assert path.is_file()
    on_disk = json.loads(path.read_text())
    assert on_disk["epoch"] == 3 and on_disk["probs"] == [[1.0, 0.0], [0.0, 1.0]]
    assert load_genotype(path) == g
    assert load_genotype(str(path)) == g


def test_json_formats():
    assert genotype_to_json(parse_nb201(EXAMPLE_ARCH))["arch"] == EXAMPLE_ARCH
    d = genotype_to_json(DARTS_V2)
    assert d["normal"][0] == ["sep_conv_3x3", 0] and d["reduce_concat"] == [2, 3, 4, 5]
    assert genotype_to_json(ChainGenotype(["zero"])) == {"space": "chain", "ops": ["zero"],
                                                        "choices": {"block0": "zero"}}
    # extra keys are ignored on read; "arch" is what counts for NB201
    assert genotype_from_json({"space": "nb201", "arch": EXAMPLE_ARCH, "ops": ["x"], "note": 1}).arch == EXAMPLE_ARCH


@pytest.mark.parametrize("d, token", [
    ({"arch": EXAMPLE_ARCH}, "'space'"),
    ({"space": "resnet", "arch": EXAMPLE_ARCH}, "'resnet'"),
    ({"space": 3}, "unknown space 3"),
    ({"space": "nb201"}, "'arch'"),
    ({"space": "nb201", "arch": ["nor_conv_3x3"] * 6}, "must be a str"),
    ({"space": "nb201", "arch": EXAMPLE_ARCH.replace("skip_connect~2", "skip_connect~5")}, "'~5'"),
    ({"space": "darts", "normal": [], "normal_concat": [2, 3, 4, 5], "reduce": []}, "'reduce_concat'"),
    ({**genotype_to_json(DARTS_V2), "normal": "sep_conv_3x3"}, "expected a list"),
    ({**genotype_to_json(DARTS_V2), "normal_concat": "2345"}, "'2345'"),
    ({"space": "chain"}, "'ops'"),
    ({"space": "chain", "ops": "mb_k3_e3"}, "expected a list"),
    ({"space": "chain", "ops": []}, "empty"),
    ({"space": "chain", "ops": ["mb_k3_e3", 7]}, "7"),
    ({"space": "chain", "ops": ["mb_k3_e3", "mb_k9_e3"]}, "'mb_k9_e3'"),
    (["space", "nb201"], "must be an object"),
])
def test_json_invalid(d, token):
    with pytest.raises(GenotypeError) as exc:
        genotype_from_json(d, chain_op_names=CHAIN_OPS)
    assert token in str(exc.value)


def test_chain_op_names_are_optional_on_read():
    g = genotype_from_json({"space": "chain", "ops": ["mb_k9_e3"]})
    assert g.ops == ("mb_k9_e3",)
    with pytest.raises(GenotypeError, match="mb_k9_e3.*mb_k3_e3"):
        g.check(CHAIN_OPS)


def test_save_rejects_conflicting_extra(tmp_path):
    g = parse_nb201(EXAMPLE_ARCH)
    with pytest.raises(GenotypeError, match="'space'"):
        save_genotype(g, tmp_path / "g.json", extra={"space": "darts"})
    assert not (tmp_path / "g.json").exists()
    # an agreeing value is fine
    save_genotype(g, tmp_path / "g.json", extra={"ops": list(g.ops)})
    assert load_genotype(tmp_path / "g.json") == g


def test_load_errors_name_file_and_problem(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(GenotypeError, match=r"nope\.json.*not found"):
        load_genotype(missing)
    bad = tmp_path / "broken.json"
    bad.write_text('{"space": "nb201", "arch": ')
    with pytest.raises(GenotypeError, match=r"broken\.json.*not valid JSON"):
        load_genotype(bad)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"space": "darts", "normal": []}))
    with pytest.raises(GenotypeError, match=r"wrong\.json.*'normal_concat'"):
        load_genotype(wrong)
    unknown_op = tmp_path / "op.json"
    unknown_op.write_text(json.dumps({"space": "chain", "ops": ["mb_k3_e3", "conv_11x11"]}))
    with pytest.raises(GenotypeError, match=r"op\.json.*'conv_11x11'"):
        load_genotype(unknown_op, chain_op_names=CHAIN_OPS)


# ----------------------------------------------------------------------------- pictures

def _check_png(path: Path, min_w: int = 300, min_h: int = 150):
    from PIL import Image
    assert path.is_file() and path.stat().st_size > 2000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        assert im.format == "PNG"
        w, h = im.size
        arr = np.asarray(im.convert("RGB"), dtype=np.float64)
    assert min_w <= w <= 6000 and min_h <= h <= 6000
    assert arr.var() > 0
    # not mostly blank: a visible share of non-white pixels
    assert (arr.min(axis=2) < 200).mean() > 0.005


def test_plot_genotypes(tmp_path):
    from dnas.supernet.plot import plot_genotype
    p = plot_genotype(DARTS_V2, tmp_path / "darts.png", title="DARTS V2")
    assert Path(p) == tmp_path / "darts.png"
    _check_png(Path(p), 600, 600)
    _check_png(Path(plot_genotype(parse_nb201(EXAMPLE_ARCH), tmp_path / "nb201.png")), 500, 250)
    arch_with_none = "|none~0|+|nor_conv_1x1~0|none~1|+|skip_connect~0|none~1|nor_conv_3x3~2|"
    _check_png(Path(plot_genotype(arch_with_none, tmp_path / "nested" / "nb201_none.png")), 500, 250)
    chain = ChainGenotype(["mb_k3_e3", "mb_k5_e6", "zero", "mb_k7_e6"] * 5)
    _check_png(Path(plot_genotype(genotype_to_json(chain), tmp_path / "chain.png")), 600, 200)


def test_plot_alphas(tmp_path):
    from dnas.supernet.plot import plot_alphas
    rng = np.random.default_rng(0)
    a = rng.normal(size=(14, 8))
    probs = {"normal": np.exp(a) / np.exp(a).sum(1, keepdims=True),
             "reduce": np.full((14, 8), 1 / 8)}
    p = plot_alphas(probs, {"normal": DARTS_OPS, "reduce": DARTS_OPS}, tmp_path / "alphas.png")
    _check_png(Path(p), 800, 400)
    _check_png(Path(plot_alphas({"cell": rng.dirichlet(np.ones(5), 6)}, {"cell": NB201_OPS},
                                tmp_path / "nb.png")), 300, 200)
    with pytest.raises(ValueError, match="5 columns"):
        plot_alphas({"cell": np.zeros((6, 4))}, {"cell": NB201_OPS}, tmp_path / "x.png")



def test_user_model_alphas_share_a_heatmap_and_wrap(tmp_path):
    """A user model's choice points are one-row groups each: those offering the same ops are
    rows of one heatmap (in natural label order, the values kept), the others panels of their
    own, and the panels wrap instead of growing into a strip."""
    from PIL import Image

    from dnas.supernet.plot import _alpha_panels, plot_alphas
    rng = np.random.default_rng(1)
    ops_a, ops_b = ["conv3", "conv5", "skip"], ["max", "conv_s2"]
    probs = {f"block{i}": rng.dirichlet(np.ones(3))[None] for i in (10, 2, 1)}
    probs["down"] = rng.dirichlet(np.ones(2))[None]
    ops = {k: ops_b if k == "down" else ops_a for k in probs}
    mats = {k: (np.asarray(v), ops[k]) for k, v in probs.items()}
    panels = _alpha_panels(mats, {k: [k] for k in probs})
    assert [(t, rows) for t, _, _, rows in panels] == [("3 choice points", ["block1", "block2", "block10"]),
                                                       ("down", [""])]
    np.testing.assert_array_equal(panels[0][1], np.concatenate([probs[k] for k in ("block1", "block2", "block10")]))
    # the built-in cells keep their own panels and edge names
    (t, m, _, rows), = _alpha_panels({"cell": (np.full((6, 5), 0.2), list(NB201_OPS))}, None)
    assert t == "cell" and m.shape == (6, 5) and rows[0] == "0 → 1"
    # 24 choice points with 24 different op sets: a grid, not a strip
    many = {f"c{i}": rng.dirichlet(np.ones(3))[None] for i in range(24)}
    p = plot_alphas(many, {k: [f"{k}_op{j}" for j in range(3)] for k in many}, tmp_path / "many.png", dpi=50)
    _check_png(Path(p), 300, 300)
    with Image.open(p) as im:
        assert 1.0 < im.size[0] / im.size[1] <= 3.0, im.size


def test_edge_labelled_choice_points_draw_as_cells(tmp_path):
    """Labels ``src->dst`` (optionally ``group/src->dst``) read as a cell's edges: nodes in layers
    by their deepest input; anything else, a cycle or an input choice falls back to boxes."""
    from dnas.supernet.genotype import ChoiceGenotype
    from dnas.supernet.plot import _cell_edges, _edge_layers, plot_genotype
    nb201 = ChoiceGenotype({"0->1": "nor_conv_3x3", "0->2": "none", "1->2": "skip_connect",
                            "0->3": "nor_conv_1x1", "1->3": "avg_pool_3x3", "2->3": "nor_conv_3x3"}, "NB201")
    cells = _cell_edges(nb201)
    assert list(cells) == [None] and len(cells[None]) == 6
    assert _edge_layers(cells[None]) == {"0": 0, "1": 1, "2": 2, "3": 3}
    two = ChoiceGenotype({"normal/in0->a": "conv3", "normal/a->out": "sep", "reduce/x->y": "pool"})
    assert {g: sorted(e) for g, e in _cell_edges(two).items()} == {
        "normal": [("a", "out", "sep"), ("in0", "a", "conv3")], "reduce": [("x", "y", "pool")]}
    for choices in ({"a->b": "c", "b->a": "c"}, {"a->b": "c", "head": "d"}, {"a->b": [0, 1]}):
        assert _cell_edges(ChoiceGenotype(choices)) is None
    _check_png(Path(plot_genotype(nb201, tmp_path / "cell.png")), 600, 200)
    _check_png(Path(plot_genotype(two, tmp_path / "two.png")), 400, 300)
    boxes = ChoiceGenotype({"block1": "conv3", "readout": [0, 2]})
    _check_png(Path(plot_genotype(boxes, tmp_path / "b.png")), 300, 100)


# ----------------------------------------------------------------------------- label -> choice

def test_genotypes_are_label_to_choice_mappings():
    nb = parse_nb201(EXAMPLE_ARCH)
    assert list(nb) == ["0->1", "0->2", "1->2", "0->3", "1->3", "2->3"]
    assert nb["1->2"] == "avg_pool_3x3" and nb["2->3"] == "skip_connect"
    assert NB201Genotype.from_choices(dict(nb.items())).arch == EXAMPLE_ARCH
    # DARTS: one op per supernet edge, `none` where derivation dropped the edge
    d = DARTS_V2
    assert len(d) == 28 and sum(op != "none" for op in d.choices.values()) == 16
    assert d["normal/2->5"] == "dil_conv_3x3" and d["normal/3->5"] == "none" and d["reduce/2->3"] == "skip_connect"
    back = DartsGenotype.from_choices(d.choices)
    assert back.choices == d.choices
    for kind in ("normal", "reduce"):   # the same edges, in source order within a node
        assert sorted(back.edges(kind)) == sorted(d.edges(kind))
    ch = ChainGenotype(["mb_k3_e3", "zero"])
    assert dict(ch.items()) == {"block0": "mb_k3_e3", "block1": "zero"}
    assert ChainGenotype.from_choices({"block1": "zero", "block0": "mb_k3_e3"}) == ch


def test_from_choices_refusals():
    with pytest.raises(GenotypeError, match=r"missing label\(s\) \['2->3'\]"):
        NB201Genotype.from_choices({k: "none" for k in ["0->1", "0->2", "1->2", "0->3", "1->3"]})
    with pytest.raises(GenotypeError, match="unknown label"):
        NB201Genotype.from_choices({**parse_nb201(EXAMPLE_ARCH).choices, "3->4": "none"})
    choices = dict(DARTS_V2.choices)
    choices["normal/2->3"] = "sep_conv_3x3"          # node 3 now keeps three edges
    with pytest.raises(GenotypeError, match="node 3 keeps 3 input edge"):
        DartsGenotype.from_choices(choices)
    with pytest.raises(GenotypeError, match="missing label"):
        ChainGenotype.from_choices({"block1": "zero"})
    twice = DartsGenotype([("sep_conv_3x3", 0), ("skip_connect", 0)] + list(DARTS_V2.normal[2:]), [2, 3, 4, 5],
                          DARTS_V2.reduce, [2, 3, 4, 5])
    with pytest.raises(GenotypeError, match="edge 0->2 carries two ops"):
        twice.choices
    assert "choices" not in genotype_to_json(twice)   # still printable as the DARTS Genotype


@pytest.mark.parametrize("space_name", ["nb201", "darts", "chain"])
def test_space_labels_read_derived_genotypes(space_name):
    """A space's choice labels are exactly its genotypes' keys, and the columns read through them
    are what derivation picked from the scores: the row's argmax (DARTS: the argmax over the ops
    other than none on a kept edge, none elsewhere)."""
    from dnas.supernet.spaces import build_space

    space = build_space(space_name)
    rng = np.random.default_rng(3)
    scores = {g: rng.normal(size=(n, k)) for g, (n, k) in space.groups.items()}
    g = space.derive(scores)
    labels = [lab for grp in space.groups for lab in space.choice_labels(grp)]
    assert sorted(labels) == sorted(g)
    idx = space.genotype_indices(g)
    for grp, s in scores.items():
        if space_name == "darts":
            none = DARTS_OPS.index("none")
            kept = idx[grp] != none
            assert kept.sum() == 8
            masked = s.copy()
            masked[:, none] = -np.inf
            np.testing.assert_array_equal(idx[grp][kept], masked.argmax(1)[kept])
        else:
            np.testing.assert_array_equal(idx[grp], s.argmax(1))
    other = {"nb201": DARTS_V2, "darts": parse_nb201(EXAMPLE_ARCH), "chain": parse_nb201(EXAMPLE_ARCH)}[space_name]
    with pytest.raises(GenotypeError, match="is not in the genotype"):
        space.genotype_indices(other)
