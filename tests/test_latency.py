"""Latency tables, the space latency model, the expected-latency loss, profiling and fitting."""
from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dnas.latency import fit as F
from dnas.latency.loss import (LATENCY_LOSSES, UnknownLatencyLossError, expected_latency, latency_penalty)
from dnas.latency.published import fbnet_table_from_list, load_table
from dnas.latency.space_latency import architecture_latency, describe_space, latency_matrix
from dnas.latency.table import LatencyTable, LatencyTableError, MissingLatencyKeysError, parse_key, signature_key
from dnas.supernet.spaces import build_space

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
LATENCY_DIR = SHARED / "latency"
PIXEL1 = LATENCY_DIR / "proxylessnas_mobile_trim.yaml"
NB201_CSV = SHARED / "nb201" / "latency_per_arch_ms.csv"
NB201_ARCHS = SHARED / "nb201" / "nats_bench_200ep.csv"

TINY = {"nb201": dict(channels=4, cells_per_stage=1),
        "darts": dict(channels=4, layers=3),
        "chain": dict(width_mult=0.25, stage_depths=(1, 1, 1, 1, 1, 1), stem_stride=1)}
TINY_INPUT = {"nb201": 8, "darts": 8, "chain": 32}


def synthetic_table(model, seed=0) -> LatencyTable:
    rng = np.random.default_rng(seed)
    return LatencyTable({k: {"mean_ms": float(rng.uniform(0.1, 2.0)), "std_ms": 0.01, "count": 5}
                         for k in model.keys()}, {"space": model.space, "input_size": model.input_size})


def one_hot(arch, groups):
    return {g: jax.nn.one_hot(jnp.asarray(arch[g]), k) for g, (_, k) in groups.items()}


# ------------------------------------------------------------------------------ keys / table

def test_signature_key_matches_proxylessnas_and_parses():
    key = signature_key("expanded_conv", (56, 56, 24), (28, 28, 40),
                        {"expand": 6, "kernel": 5, "stride": 2, "idskip": False})
    assert key == "expanded_conv-input:56x56x24-output:28x28x40-expand:6-kernel:5-stride:2-idskip:0"
    op, fields = parse_key(key)
    assert op == "expanded_conv" and fields["input"] == "56x56x24" and fields["idskip"] == "0"
    assert signature_key("Logits", (7, 7, 1280), 1000) == "Logits-input:7x7x1280-output:1000"
    with pytest.raises(LatencyTableError):
        signature_key("bad-name", (1, 1, 1), (1, 1, 1))


def test_json_round_trip(tmp_path):
    t = LatencyTable({"a-input:1x1x1-output:1x1x1": {"mean_ms": 1.5, "std_ms": 0.1, "count": 3},
                      "b-input:2x2x2-output:2": {"mean_ms": 0.0, "std_ms": float("nan"), "count": 1}},
                     {"backend": "cpu", "batch_size": 4, "space_config": {"stage_depths": (1, 2)}})
    path = t.save(tmp_path / "t.json")
    raw = json.loads(path.read_text())
    assert raw["format"] == "dnas-latency-table" and raw["version"] == 1
    assert set(raw["meta"]) >= {"backend", "device_kind", "dtype", "batch_size", "input_size", "jax_version",
                                "jaxlib_version", "date", "method", "space", "space_config"}
    u = LatencyTable.load(path)
    assert u.keys() == sorted(t.keys())
    assert u.lookup("a-input:1x1x1-output:1x1x1") == 1.5 and u.meta["batch_size"] == 4
    assert math.isnan(u.entries["b-input:2x2x2-output:2"]["std_ms"])
    assert load_table(path).entries["a-input:1x1x1-output:1x1x1"] == u.entries["a-input:1x1x1-output:1x1x1"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "dnas-latency-table", "version": 99, "entries": {}}))
    with pytest.raises(LatencyTableError, match="version"):
        LatencyTable.load(bad)
    with pytest.raises(LatencyTableError, match="mean_ms"):
        LatencyTable({"k": {"mean_ms": -1.0}})


def test_missing_keys_error_names_every_key():
    model = describe_space(build_space("chain", **TINY["chain"]), TINY_INPUT["chain"])
    table = synthetic_table(model)
    gone = [model.keys()[0], model.keys()[5], model.keys()[-1]]
    for k in gone:
        del table.entries[k]
    with pytest.raises(MissingLatencyKeysError) as err:
        latency_matrix(model, table)
    assert err.value.missing == gone
    for k in gone:
        assert k in str(err.value)
    with pytest.raises(KeyError):
        table.lookup(gone[0])
    assert table.lookup(None) == 0.0


# ------------------------------------------------------------------------------ shared tables

@pytest.mark.skipif(not LATENCY_DIR.exists(), reason="../shared/data/latency absent")
def test_every_shared_table_loads():
    files = sorted(LATENCY_DIR.iterdir())
    assert files
    for f in files:
        t = load_table(f)
        assert len(t) > 0
        assert all(e["mean_ms"] >= 0 for e in t.entries.values())
        assert t.meta["method"] == "published"
        if f.suffix == ".yaml":
            assert any(k.startswith("Conv-input:") for k in t.keys())
            assert any(k.startswith("Logits-input:") for k in t.keys())
            assert t.meta["input_size"] == int(f.stem.split("_")[-1]) if "ofa" in f.name else 224
    ofa = load_table(LATENCY_DIR / "ofa_note10_224.yaml")
    assert any("-se:1-hs:1" in k for k in ofa.keys()) and "AvgPool2D-input:7x7x1152-output:1x1x1152" in ofa
    fb = load_table(LATENCY_DIR / "fbnet_cifar_raspi4.json")
    layers = fb.meta["layers"]
    assert len(layers) == 28 and layers[0] is None and len([x for x in layers if x]) == 22
    assert fb.lookup(layers[2][0]) == pytest.approx(10.430441020034777)     # us -> ms
    assert layers[2][-1].startswith("fbnet/skip-input:16x16x16") and len(layers[3]) == 8


def _space_of(table):
    """The space configuration a table was measured for (``meta.space_config``)."""
    import dataclasses
    from dnas.supernet.spaces import SPACES
    fields = {f.name for f in dataclasses.fields(SPACES[table.meta["space"]][1])}
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in table.meta["space_config"].items() if k in fields}
    return build_space(table.meta["space"], **cfg)


def test_shipped_tables_load_by_name_and_cover_their_space():
    from dnas.latency.published import shipped_tables
    shipped = shipped_tables()
    assert {"cpu-2core-nb201", "cpu-2core-darts", "cpu-2core-chain"} <= set(shipped)
    want = {"nb201": {"channels": 16, "cells_per_stage": 5}, "darts": {"channels": 16, "layers": 8},
            "chain": {"width_mult": 1.0, "stem_stride": 2}}
    for name in shipped:
        t = load_table(name)
        assert t.meta["method"] == "profile" and t.meta["backend"] == "cpu" and t.meta["batch_size"] == 1
        assert t.meta["cpu_model"] and t.meta["cpu_cores"] == 2 and "2 cores" in t.meta["device_kind"]
        assert t.meta["validation"]["spearman"] >= 0.9                  # as measured (docs/latency.md)
        space = _space_of(t)
        for k, v in want[t.meta["space"]].items():
            assert t.meta["space_config"][k] == v
        mats, fixed = latency_matrix(space, t)                          # every key the space needs is there
        assert fixed > 0 and all(np.all(m >= 0) and m.max() > 0 for m in mats.values())
        assert load_table(f"{name}.json").entries == t.entries
    with pytest.raises(LatencyTableError, match="cpu-2core-nb201"):   # an unknown name lists the shipped ones
        load_table("cpu-64core-nb201")


def test_fbnet_list_generic_names():
    t = fbnet_table_from_list([None, [1000.0, 2000.0], None], op_names=["a", "b"])
    assert t.lookup("fbnet/b-layer:1") == pytest.approx(2.0)
    with pytest.raises(LatencyTableError, match="op names"):
        fbnet_table_from_list([[1.0, 2.0, 3.0]], op_names=["a"])


@pytest.mark.skipif(not PIXEL1.exists(), reason="../shared/data/latency absent")
def test_chain_default_is_covered_by_the_proxylessnas_table():
    table = load_table(PIXEL1)
    space = build_space("chain")
    model = describe_space(space)
    assert model.input_size == 224
    table.require(model.keys())                        # every key present
    mats, fixed = latency_matrix(space, table)
    want_fixed = sum(table.lookup(k) for k in [
        "Conv-input:224x224x3-output:112x112x32",
        "expanded_conv-input:112x112x32-output:112x112x16-expand:1-kernel:3-stride:1-idskip:0",
        "Conv_1-input:7x7x320-output:7x7x1280", "Logits-input:7x7x1280-output:1000"])
    assert fixed == pytest.approx(want_fixed)
    keep = [f"block{b}" for b, (g, *_r) in enumerate(space.blocks) if g == "keep"]
    assert len(mats) == 21 and len(keep) == 15 and all(mats[k].shape == (1, 7) for k in keep)
    assert all(mats[k][0, -1] == 0 for k in keep)      # zero costs nothing
    assert mats["block0"][0, space.group_op_names("block0").index("mb_k5_e6")] == pytest.approx(
        table.lookup("expanded_conv-input:112x112x16-output:56x56x24-expand:6-kernel:5-stride:2-idskip:0"))
    assert mats["block1"][0, 0] == pytest.approx(
        table.lookup("expanded_conv-input:56x56x24-output:56x56x24-expand:3-kernel:3-stride:1-idskip:1"))
    # a scaled-down chain is not in the Pixel-1 table: a clear error naming the keys
    with pytest.raises(MissingLatencyKeysError, match="Conv-input:224x224x3-output:112x112x16"):
        latency_matrix(build_space("chain", width_mult=0.5), table)


# ------------------------------------------------------------------------------ space models

@pytest.mark.parametrize("name", ["nb201", "darts", "chain"])
def test_describe_space_covers_every_choice_point(name):
    space = build_space(name, **TINY[name])
    model = describe_space(space, TINY_INPUT[name])
    assert model.groups == space.groups
    for cp in model.choice_points:
        assert [c.op for c in cp.candidates] == list(space.group_op_names(cp.group))
        assert len({c.output_shape for c in cp.candidates}) == 1
    free = [c for cp in model.choice_points for c in cp.candidates if c.key is None]
    assert {c.op for c in free} <= {"none", "zero"}
    assert model.fixed and all(s.key for s in model.fixed)
    if name == "darts":   # edges leaving the inputs of a reduction cell have stride 2
        red = [cp for cp in model.choice_points if cp.group == "reduce" and cp.where.endswith(("0->2", "1->2"))]
        assert red and all(c.key is None or "stride:2" in c.key for cp in red for c in cp.candidates)
    if name == "nb201":
        assert len(model.choice_points) == 3 * 1 * 6


@pytest.mark.parametrize("name", ["nb201", "darts", "chain"])
def test_one_hot_expected_latency_is_the_table_sum(name):
    model = describe_space(build_space(name, **TINY[name]), TINY_INPUT[name])
    table = synthetic_table(model)
    mats, fixed = latency_matrix(model, table)
    rng = np.random.default_rng(1)
    for _ in range(3):
        arch = {g: rng.integers(0, k, size=n) for g, (n, k) in model.groups.items()}
        by_hand = sum(table.lookup(s.key) for s in model.fixed) + sum(
            table.lookup(cp.candidates[arch[cp.group][cp.row]].key) for cp in model.choice_points)
        e = expected_latency(one_hot(arch, model.groups), mats, fixed)
        assert float(e) == pytest.approx(by_hand, rel=1e-5)
        assert architecture_latency(arch, mats, fixed) == pytest.approx(by_hand, rel=1e-9)


def test_expected_latency_gradient_matches_finite_differences():
    model = describe_space(build_space("chain", **TINY["chain"]), TINY_INPUT["chain"])
    mats, fixed = latency_matrix(model, synthetic_table(model))
    alpha = {g: 0.5 * jax.random.normal(jax.random.PRNGKey(i), shape) for i, (g, shape) in enumerate(model.groups.items())}

    @jax.jit
    def f(a):
        return expected_latency({g: jax.nn.softmax(v, axis=-1) for g, v in a.items()}, mats, fixed)

    grads = jax.grad(f)(alpha)
    eps = 1e-2
    for g in alpha:
        for i, j in [(0, 0), (0, 2), (alpha[g].shape[0] - 1, alpha[g].shape[1] - 1)]:
            up = {**alpha, g: alpha[g].at[i, j].add(eps)}
            dn = {**alpha, g: alpha[g].at[i, j].add(-eps)}
            fd = (float(f(up)) - float(f(dn))) / (2 * eps)
            assert float(grads[g][i, j]) == pytest.approx(fd, rel=2e-2, abs=2e-4)
    # the closed form: dE/dα_ij = p_ij (L_ij - Σ_k p_ik L_ik)
    g0 = next(iter(alpha))
    p = jax.nn.softmax(alpha[g0], axis=-1)
    closed = p * (mats[g0] - jnp.sum(p * mats[g0], axis=-1, keepdims=True))
    np.testing.assert_allclose(grads[g0], closed, rtol=1e-4, atol=1e-6)


def test_expected_latency_checks_groups_and_shapes():
    with pytest.raises(ValueError, match="groups"):
        expected_latency({"a": jnp.ones((1, 2))}, {"b": np.ones((1, 2))})
    with pytest.raises(ValueError, match="shape"):
        expected_latency({"a": jnp.ones((1, 3))}, {"a": np.ones((1, 2))})


# ------------------------------------------------------------------------------ penalties

def test_penalty_forms_by_hand():
    ce, lat = 2.0, 30.0
    assert float(latency_penalty("fbnet", weight=0.2, exponent=0.6)(ce, lat)) == pytest.approx(
        2.0 * 0.2 * math.log(30.0) ** 0.6, rel=1e-6)
    assert float(latency_penalty("fbnet", unit_ms=1e-3)(ce, lat)) == pytest.approx(
        2.0 * 0.2 * math.log(30000.0) ** 0.6, rel=1e-6)
    assert float(latency_penalty("additive", weight=0.01)(ce, lat)) == pytest.approx(2.3)
    assert float(latency_penalty("additive_relative", target=20.0, weight=0.1)(ce, lat)) == pytest.approx(2.05)
    assert float(latency_penalty("multiplicative", target=20.0, weight=0.07)(ce, lat)) == pytest.approx(
        2.0 * 1.5 ** 0.07, rel=1e-6)
    asym = latency_penalty("multiplicative", target=20.0, weight=0.07, weight_above=0.5)
    assert float(asym(ce, lat)) == pytest.approx(2.0 * 1.5 ** 0.5, rel=1e-6)
    assert float(asym(ce, 10.0)) == pytest.approx(2.0 * 0.5 ** 0.07, rel=1e-6)
    assert float(latency_penalty("mul_log", target=20.0, weight=1.0, exponent=0.6)(ce, lat)) == pytest.approx(
        2.0 * (math.log(30.0) / math.log(20.0)) ** 0.6, rel=1e-6)
    hinge = latency_penalty("hinge", target=20.0, weight=3.0)
    assert float(hinge(ce, lat)) == pytest.approx(2.0 + 3.0 * 0.5)
    assert float(hinge(ce, 15.0)) == pytest.approx(2.0)
    # differentiable in the latency
    assert float(jax.grad(lambda l: hinge(ce, l))(30.0)) == pytest.approx(3.0 / 20.0)
    assert np.isfinite(float(jax.grad(lambda l: latency_penalty("fbnet")(ce, l))(0.5)))


def test_penalty_registry_errors():
    assert set(LATENCY_LOSSES) == {"fbnet", "additive", "additive_relative", "multiplicative", "mul_log", "hinge"}
    with pytest.raises(UnknownLatencyLossError, match="available: additive"):
        latency_penalty("nope")
    with pytest.raises(ValueError, match="target"):
        latency_penalty("hinge")
    with pytest.raises(ValueError, match="no parameter"):
        latency_penalty("additive", weight=1.0, gamma=2.0)
    with pytest.raises(ValueError, match="> 0"):
        latency_penalty("hinge", target=0.0)
    assert latency_penalty("additive", weight=1.0, target=None)(1.0, 2.0) == 3.0   # None = unset flag


# ------------------------------------------------------------------------------ profile / validate

@pytest.fixture(scope="module")
def tiny_nb201_profile():
    from dnas.latency.profile import profile_space
    space = build_space("nb201", **TINY["nb201"])
    return space, profile_space(space, batch_size=2, input_size=TINY_INPUT["nb201"], repeats=2, warmup=0,
                                progress=False, number=2, method="isolated")


def test_profile_tiny_space_gives_a_complete_table(tiny_nb201_profile, tmp_path):
    space, table = tiny_nb201_profile
    model = describe_space(space, TINY_INPUT["nb201"])
    assert set(table.keys()) == set(model.keys())
    assert all(e["mean_ms"] >= 0 and e["count"] == 4 for e in table.entries.values())
    for field in ("backend", "device_kind", "jax_version", "jaxlib_version", "date"):
        assert table.meta[field]
    assert table.meta["batch_size"] == 2 and table.meta["input_size"] == 8 and table.meta["space"] == "nb201"
    assert table.meta["method"] == "profile" and table.meta["space_config"]["channels"] == 4
    assert table.meta["profile_method"] == "isolated" and table.meta["cpu_cores"] >= 1
    assert set(table.meta["load"]) >= {"loadavg_start", "loadavg_end", "wall_s"}
    if table.meta["backend"] == "cpu":   # the processor and its cores, not just "cpu"
        assert table.meta["cpu_model"] in table.meta["device_kind"] and "cores" in table.meta["device_kind"]
    mats, fixed = latency_matrix(space, LatencyTable.load(table.save(tmp_path / "p.json")))
    assert fixed > 0 and mats["cell"].shape == (6, 5) and np.all(mats["cell"][:, 0] == 0)


def test_validate_reports_rank_correlation_and_mape(tiny_nb201_profile):
    from dnas.latency.profile import validate
    space, table = tiny_nb201_profile
    out = validate(table, space, n_archs=3, repeats=2, warmup=0, progress=False, rounds=2)
    assert out["n_archs"] == 3 and len(out["archs"]) == 3
    assert -1.0 <= out["spearman"] <= 1.0 and out["mape"] >= 0
    assert -1.0 <= out["additive"]["spearman"] <= 1.0 and "loadavg_start" in out["load"]
    for r in out["archs"]:
        assert r["measured_ms"] > 0 and r["predicted_ms"] > 0 and len(r["arch"]["cell"]) == 6
        assert r["predicted_ms"] <= r["predicted_additive_ms"] + 1e-9     # dead edges only ever drop
    json.dumps(out)


def test_context_profiling_measures_the_marginal_cost_in_a_chain():
    from dnas.latency.profile import _op_fn, profile_signatures
    model = describe_space(build_space("nb201", **TINY["nb201"]), TINY_INPUT["nb201"])
    all_sigs = model.signatures()
    sigs = {k: all_sigs[k] for k in [next(k for k in all_sigs if op in k) for op in ("nor_conv_3x3", "node_sum")]}
    # the chain really runs every copy: 3 copies of a 3x3 conv are 3 convolutions after compilation
    conv = next(v for k, v in sigs.items() if "nor_conv_3x3" in k)
    fn, args = _op_fn(conv, 1, jnp.float32, 0, copies=3)
    assert fn.lower(*args).compile().as_text().count("convolution(") >= 3
    entries, _ = profile_signatures(sigs, repeats=4, warmup=0, progress=False, number=1, chain=3, rounds=2,
                                    statistic="min")
    assert set(entries) == set(sigs)
    assert all(e["mean_ms"] >= 0 and e["count"] == 8 for e in entries.values())
    with pytest.raises(ValueError, match="chain"):
        profile_signatures(sigs, chain=1, progress=False)
    with pytest.raises(ValueError, match="statistic"):
        profile_signatures(sigs, statistic="mean", progress=False)


def test_compiled_network_drops_dead_nb201_edges_and_shared_poolings():
    from dnas.latency.space_latency import deployed_latency, running_parts
    from dnas.supernet.nb201 import nb201_running_edges
    # node 2 feeds nothing (2->3 is none): its two edges are dead code
    runs, connected, nodes = nb201_running_edges(
        ["avg_pool_3x3", "nor_conv_3x3", "nor_conv_1x1", "skip_connect", "skip_connect", "none"])
    assert runs == [True, False, False, True, True, False] and connected and nodes == {0, 1, 3}
    # node 1 is zeros (0->1 none): pooling it is constant-folded, convolving it is not
    runs, connected, _ = nb201_running_edges(["none", "nor_conv_3x3", "avg_pool_3x3", "none", "nor_conv_1x1",
                                              "nor_conv_3x3"])
    assert runs == [False, True, False, False, True, True] and connected
    # the output does not depend on the input: only the last cell (and the head) runs
    model = describe_space(build_space("nb201", **TINY["nb201"]), TINY_INPUT["nb201"])
    table = synthetic_table(model)
    names = model.op_names["cell"]
    arch = {"cell": np.array([names.index(o) for o in ["none", "none", "none", "none", "nor_conv_1x1", "none"]])}
    runs, fixed = running_parts(model, arch)
    assert sum(runs) == 1 and runs[-2] and [s.op for s, f in zip(model.fixed, fixed) if f] == ["nb201/node_sum",
                                                                                               "nb201/head"]
    last = model.choice_points[-2].candidates[names.index("nor_conv_1x1")].key
    node3 = next(s.key for s, f in zip(model.fixed, fixed) if f and s.op == "nb201/node_sum")
    assert deployed_latency(model, table, arch) == pytest.approx(
        table.lookup(last) + table.lookup(node3) + table.lookup(model.fixed[-1].key))
    # DARTS: two edges pooling the same node the same way are one computation
    dm = describe_space(build_space("darts", **TINY["darts"]), TINY_INPUT["darts"])
    dnames = dm.op_names["normal"]
    idx = np.full(14, dnames.index("none"))
    idx[[0, 1]] = dnames.index("sep_conv_3x3")                        # node 2 <- inputs 0, 1
    idx[[2, 3]] = [dnames.index("max_pool_3x3"), dnames.index("sep_conv_3x3")]   # node 3 <- 0, 1
    idx[[5, 6]] = [dnames.index("max_pool_3x3"), dnames.index("skip_connect")]   # node 4 <- 0 (again), 1
    idx[[9, 10]] = dnames.index("sep_conv_5x5")                       # node 5 <- 0, 1
    darch = {"normal": idx, "reduce": idx.copy()}
    runs, _ = running_parts(dm, darch)
    pooled = [r for r, cp in zip(runs, dm.choice_points)
              if cp.candidates[darch[cp.group][cp.row]].op == "max_pool_3x3"]
    assert len(pooled) == 2 * len(dm.choice_points) // 14 and sum(pooled) == len(pooled) // 2


def test_random_darts_architectures_look_derived():
    """DARTS's sampler keeps two edges per node, each with an op other than ``none``, and every
    such architecture is a genotype the space derives (its indices read back unchanged)."""
    from dnas.supernet.genotype import DARTS_EDGES
    space = build_space("darts", **TINY["darts"])
    rng = np.random.default_rng(0)
    for _ in range(5):
        arch = space.random_indices(rng)
        none = space.group_op_names("normal").index("none")
        for g in ("normal", "reduce"):
            for d in range(2, 6):
                kept = [e for e, (_, dd) in enumerate(DARTS_EDGES) if dd == d and arch[g][e] != none]
                assert len(kept) == 2
        scores = {g: np.eye(8)[arch[g]] for g in arch}
        derived = space.derive(scores)
        for g in arch:
            np.testing.assert_array_equal(space.genotype_indices(derived)[g], arch[g])
    nb201 = build_space("nb201", **TINY["nb201"]).random_indices(np.random.default_rng(0))
    assert nb201["cell"].shape == (6,) and set(nb201["cell"]) <= set(range(5))


# ------------------------------------------------------------------------------ fit

def test_fit_recovers_a_synthetic_additive_table():
    rng = np.random.default_rng(0)
    n_points, n_ops = 6, 5
    truth = rng.uniform(0.5, 3.0, (n_points, n_ops))
    truth[:, 0] = 0.0                                      # reference op (none) costs 0
    idx = rng.integers(0, n_ops, (400, n_points))
    y = 4.0 + truth[np.arange(n_points), idx].sum(axis=1)
    fit = F.fit_additive(idx, y + rng.normal(0, 1e-3, len(y)), n_ops, "choice_point", reference=0)
    np.testing.assert_allclose(fit.costs, truth, atol=5e-3)
    assert fit.intercept == pytest.approx(4.0, abs=5e-3)
    # the per-op model recovers per-op costs when every choice point shares them
    per_op = np.array([0.0, 0.3, 1.0, 2.5, 0.7])
    y2 = 1.5 + per_op[idx].sum(axis=1)
    fit2 = F.fit_additive(idx, y2, n_ops, "op", reference=0)
    np.testing.assert_allclose(fit2.costs, per_op, atol=1e-8)
    assert F.evaluate_fit(fit2, idx, y2)["spearman"] == pytest.approx(1.0, abs=1e-3)
    # as a table the space reads; predictions unchanged by the non-negative shift
    fit3 = F.AdditiveFit("choice_point", truth - 1.0, 6.0, 0, n_points)
    from dnas.supernet.genotype import NB201_OPS
    table = F.table_from_fit(fit3, "cell", NB201_OPS, space="nb201")
    assert all(e["mean_ms"] >= 0 for e in table.entries.values())
    mats, fixed = latency_matrix(build_space("nb201", **TINY["nb201"]), table)
    arch = {"cell": idx[0]}
    assert architecture_latency(arch, mats, fixed) == pytest.approx(float(fit3.predict(idx[:1])[0]))


def test_rankdata_and_spearman():
    np.testing.assert_allclose(F.rankdata([3, 1, 2, 2]), [4, 1, 2.5, 2.5])
    assert F.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert F.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)


@pytest.mark.skipif(not (NB201_CSV.exists() and NB201_ARCHS.exists()), reason="../shared/data/nb201 absent")
def test_fit_on_the_real_nb201_latencies():
    gpus = ["1080ti_1", "2080ti_32", "titan_rtx_256", "titanxp_1"]
    report, tables = F.fit_nb201(NB201_CSV, NB201_ARCHS, train_frac=0.2, seed=0,
                                 devices=gpus + ["pixel3"], table_model="choice_point")
    assert report["n_train"] == 3125 and report["n_test"] == 12500
    for d in gpus:
        for m in ("choice_point", "op"):
            assert report["devices"][d][m]["spearman"] > 0.95, (d, m, report["devices"][d][m])
    assert report["devices"]["pixel3"]["choice_point"]["spearman"] > 0.85
    mats, fixed = latency_matrix(build_space("nb201"), tables["1080ti_1"])
    assert fixed > 0 and mats["cell"].shape == (6, 5)
    json.dumps(report)


# ------------------------------------------------------------------------------ CLI

def test_cli_parses_and_reports_errors(tmp_path, capsys):
    from dnas.latency.cli import main
    missing = tmp_path / "t.json"
    LatencyTable({"x-input:1x1x1-output:1x1x1": {"mean_ms": 1.0}}).save(missing)
    assert main(["show", "--space", "nb201", "--channels", "4", "--cells", "1", "--table", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "lacks" in err and "nb201/stem-input:32x32x3-output:32x32x4-kernel:3" in err
    assert main(["profile", "--space", "nope", "--out", str(tmp_path / "o.json")]) == 2
    assert "unknown search space 'nope'; available: chain, darts, nb201" in capsys.readouterr().err
    assert not (tmp_path / "o.json").exists()
