"""Each built-in space is one module whose supernet, stand-alone network and latency walk follow
from one description (dnas.supernet.nb201, .darts, .chain). These reference values were computed
by the code before that change (commit cc72bf6, where the three were written apart in spaces.py,
derived.py and space_latency.py): for fixed weights and α the supernets must give the same
logits, gradients and BatchNorm statistics, the derived networks the same logits and the latency
walks the same table keys.

All three have since been declared as Flax NNX models (``dnas.supernet.chain.ChainNet``,
``dnas.supernet.nb201.NB201Net``, ``dnas.supernet.darts.DartsNet``), whose weights are
initialised by Flax's initialisers: their numbers are checked on the weights the code before
that change initialised, stored with what that code computed from them
(``tests/chain_reference.py``, ``tests/nb201_reference.py``, ``tests/darts_reference.py``,
``tests/data/*_reference.npz``); their latency walks against the keys of cc72bf6.
"""
from __future__ import annotations

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dnas.latency.space_latency import describe_space
from dnas.relaxations.base import dense_mix
from dnas.supernet.derived import build_network
from dnas.supernet.genotype import DARTS_V2, ChainGenotype, parse_nb201
from dnas.supernet.stacked_leaves import WeightLayout
from dnas.supernet.context import Ctx
from dnas.supernet.spaces import build_space

CONFIGS = {"nb201": dict(channels=4, cells_per_stage=2, num_classes=5),
           "darts": dict(channels=4, layers=3, num_classes=5, impl="dense"),
           "chain": dict(width_mult=0.25, stage_depths=(2, 1, 1, 1, 1, 1), stem_stride=1, num_classes=5)}
NB201_CELL = "|nor_conv_3x3~0|+|none~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_1x1~1|nor_conv_3x3~2|"


def _norm(tree) -> float:
    return float(jnp.sqrt(sum(jnp.sum(jnp.square(a)) for a in jax.tree_util.tree_leaves(tree))))


#: the latency walks' table keys at cc72bf6 (input 8x8)
REFERENCE = {"chain": {"latency_keys": [46, "4b26df40a5da87a4"]},
             "darts": {"latency_keys": [54, "3fff4b43f99b49d2"]},
             "nb201": {"latency_keys": [22, "5751f5e0af79d333"]}}


@pytest.mark.parametrize("name", ["chain", "darts", "nb201"])
def test_latency_walk_keeps_the_table_keys(name):
    keys = describe_space(build_space(name, **CONFIGS[name]), input_size=8).keys()
    assert [len(keys), hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]] == REFERENCE[name]["latency_keys"]


def _unflatten(flat: dict, template):
    """``template`` (a pure dict of the model's layout) with every leaf taken from ``flat``
    (``"a/b/0/c"`` -> array)."""
    def leaf(path, old):
        key = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        new = flat[key]
        assert new.shape == old.shape, key
        return jnp.asarray(new)
    return jax.tree_util.tree_map_with_path(leaf, template)


def _supernet_step(space, params, stats, x, y, alpha):
    def loss(p, a):
        w = {g: jax.nn.softmax(v, -1) for g, v in a.items()}
        logits, st = space.apply(p, stats, x, w, dense_mix, Ctx(train=True))
        return jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), y]), (logits, st)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, alpha)


#: the NNX model's paths of the parts whose old names the NB201 reference keeps
NB201_RENAMES = (("stem/", "stem/conv/"), ("stem_bn/", "stem/bn/"), ("head_bn/", "head/bn/"),
                 ("classifier/", "head/linear/"))


def _renamed(key: str) -> str:
    for old, new in NB201_RENAMES:
        if key.startswith(old):
            return new + key[len(old):]
    return key


@pytest.mark.parametrize("unroll", [True, pytest.param("scan_cells", marks=pytest.mark.slow)])
def test_nb201_gives_the_numbers_of_its_searchspace_code(unroll):
    """The supernet on the old code's weights: logits, ∂loss/∂α, the weights' gradient norm and
    the BatchNorm statistics; the stand-alone network (:func:`dnas.fix` of the model with affine
    cells) on the old derived network's weights. ``scan_cells``: each stage's cells stacked and
    scanned (the weights stacked on a leading axis)."""
    from flax import nnx

    from dnas.nnx import fix
    from dnas.supernet.nb201 import NB201Config, NB201Net
    from tests.nb201_reference import CELL, OPTIONS, PATH

    ref = np.load(PATH)
    space = build_space("nb201", unroll=unroll, **OPTIONS)
    flat = {_renamed(k[len("param/"):]): ref[k] for k in ref.files if k.startswith("param/")}
    template_p, stats = space.unstacked(*space.init(jax.random.PRNGKey(0)))
    if unroll == "scan_cells":   # stages/i/c/... -> stages/i/... stacked over the cells c
        n = OPTIONS["cells_per_stage"]
        for key in [k for k in flat if k.startswith("stages/")]:
            i, c, rest = key.split("/", 3)[1:]
            if c == "0":
                flat[f"stages/{i}/{rest}"] = np.stack([flat.pop(f"stages/{i}/{j}/{rest}") for j in range(n)])
    params, stats = space.stacked(_unflatten(flat, template_p), stats)
    x, y = jnp.asarray(ref["x"]), jnp.asarray(ref["y"])
    assert space.groups == {"cell": (6, 5)}
    (_, (logits, new_stats)), (g_w, g_a) = _supernet_step(space, params, stats, x, y,
                                                          {"cell": jnp.asarray(ref["alpha"])})
    np.testing.assert_allclose(logits, ref["logits"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(g_a["cell"], ref["grad_alpha"], rtol=1e-3, atol=1e-6)
    assert _norm(g_w) == pytest.approx(float(ref["grad_w_norm"]), rel=1e-4)
    assert float(sum(jnp.sum(jnp.abs(a)) for a in jax.tree_util.tree_leaves(new_stats))) == pytest.approx(
        float(ref["bn_abs_sum"]), rel=1e-5)

    # GDAS: one sampled op per edge (the sampled branch's own backward pass)
    from dnas.relaxations import get_relaxation
    gdas = get_relaxation("gdas", space=space)

    def gdas_loss(a):
        logits, _ = space.apply(params, stats, x, gdas.sample({"cell": a}, jax.random.PRNGKey(7), 1.0), gdas.mix,
                                Ctx(train=True))
        return jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), y]), logits

    (_, logits), g_a = jax.jit(jax.value_and_grad(gdas_loss, has_aux=True))(jnp.asarray(ref["alpha"]))
    np.testing.assert_allclose(logits, ref["gdas_logits"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(g_a, ref["gdas_grad_alpha"], rtol=1e-3, atol=1e-5)
    assert float(jnp.abs(g_a).max()) > 0.1

    net = build_network(parse_nb201(CELL), **OPTIONS)
    dflat = {_renamed(k[len("derived/"):]): ref[k] for k in ref.files if k.startswith("derived/")}
    fixed = fix(NB201Net(nnx.Rngs(0), NB201Config(affine=True, **OPTIONS)), parse_nb201(CELL))
    fp, fs = (nnx.to_pure_dict(s) for s in nnx.state(fixed, nnx.Param, nnx.BatchStat))
    fp = _unflatten(dflat, fp)
    out = jax.jit(lambda p, s: net.apply(p, s, x, Ctx(train=True)))(*WeightLayout(fp, fs, True).stacked(fp, fs))
    np.testing.assert_allclose(out.logits, ref["derived_logits"], rtol=1e-4, atol=1e-5)


def test_nb201_pc_darts_gives_the_numbers_of_its_searchspace_code():
    """PC-DARTS (K=2: the candidates on half of each node's channels, the edges of a node
    weighed by β) on the old code's weights: logits and ∂loss/∂(α, β)."""
    from dnas.relaxations import get_relaxation
    from tests.nb201_reference import OPTIONS, PATH

    ref = np.load(PATH)
    space = build_space("nb201", partial_channels=2, **OPTIONS)
    flat = {_renamed(k[len("pc/"):]): ref[k] for k in ref.files if k.startswith("pc/")}
    template_p, stats = space.unstacked(*space.init(jax.random.PRNGKey(0)))
    params, stats = space.stacked(_unflatten(flat, template_p), stats)
    x, y = jnp.asarray(ref["x"]), jnp.asarray(ref["y"])
    pc = get_relaxation("pc_darts", space=space, k=2)

    def loss(a, b):
        samples = pc.sample({"alpha": {"cell": a}, "beta": {"cell": b}}, None, 0.0)
        logits, _ = space.apply(params, stats, x, samples, pc.mix, Ctx(train=True))
        return jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), y]), logits

    (_, logits), (g_a, g_b) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        jnp.asarray(ref["alpha"]), jnp.asarray(ref["beta"]))
    np.testing.assert_allclose(logits, ref["pc_logits"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(g_a, ref["pc_grad_alpha"], rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(g_b, ref["pc_grad_beta"], rtol=1e-3, atol=1e-6)


def test_chain_gives_the_numbers_of_its_searchspace_code():
    from flax import nnx

    from dnas.nnx import fix
    from tests.chain_reference import GENOTYPE, OPTIONS, PATH

    ref = np.load(PATH)
    space = build_space("chain", **OPTIONS)
    # the old code's classifier was one dense layer after the pooling: here PooledLinear's linear
    weights = {k[len("param/"):].replace("classifier/", "classifier/linear/"): ref[k]
               for k in ref.files if k.startswith("param/")}
    template_p, stats = space.unstacked(*space.init(jax.random.PRNGKey(0)))
    params, stats = space.stacked(_unflatten(weights, template_p), stats)
    x, y = jnp.asarray(ref["x"]), jnp.asarray(ref["y"])
    alpha = {g: jnp.asarray(ref[f"alpha/{g}"])[None] for g in space.groups}
    (_, (logits, new_stats)), (g_w, g_a) = _supernet_step(space, params, stats, x, y, alpha)
    np.testing.assert_allclose(logits, ref["logits"], rtol=1e-4, atol=1e-5)
    for g in space.groups:
        np.testing.assert_allclose(g_a[g][0], ref[f"grad_alpha/{g}"], rtol=1e-3, atol=1e-6)
    assert _norm(g_w) == pytest.approx(float(ref["grad_w_norm"]), rel=1e-4)
    assert float(sum(jnp.sum(jnp.abs(a)) for a in jax.tree_util.tree_leaves(new_stats))) == pytest.approx(
        float(ref["bn_abs_sum"]), rel=1e-5)

    # the derived network, holding the supernet's weights of the chosen ops
    net = build_network(ChainGenotype(GENOTYPE), **OPTIONS)
    fixed = fix(space.module(params, stats), ChainGenotype(GENOTYPE))
    fp, fs = (nnx.to_pure_dict(s) for s in nnx.state(fixed, nnx.Param, nnx.BatchStat))
    out = jax.jit(lambda p, s: net.apply(p, s, x, Ctx(train=True)))(*WeightLayout(fp, fs, True).stacked(fp, fs))
    np.testing.assert_allclose(out.logits, ref["derived_logits"], rtol=1e-4, atol=1e-5)


def _darts_space(ref_prefix: str, **options):
    """The ``darts`` space holding the old code's weights stored under ``ref_prefix``."""
    from tests.darts_reference import OPTIONS, PATH

    ref = np.load(PATH)
    space = build_space("darts", **OPTIONS, **options)
    flat = {k[len(ref_prefix):]: ref[k] for k in ref.files if k.startswith(ref_prefix)}
    template_p, stats = space.unstacked(*space.init(jax.random.PRNGKey(0)))
    return ref, space, space.stacked(_unflatten(flat, template_p), stats)


@pytest.mark.parametrize("unroll", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["loop", "unrolled"])
def test_darts_gives_the_numbers_of_its_searchspace_code(unroll):
    """The supernet (a normal cell, a reduction cell, a reduction cell after it) on the old code's
    weights: logits, ∂loss/∂α of both cells, the weights' gradient norm and the BatchNorm
    statistics, under DARTS's mixture and GDAS's sampled ops; with a cell's edges as loops
    (``edge_loop``, the short runs' and the native form) and unrolled (XLA:CPU's default)."""
    from dnas.relaxations import get_relaxation

    ref, space, (params, stats) = _darts_space("param/", unroll=unroll)
    assert space.loop_edges is not unroll and space.groups == {"normal": (14, 8), "reduce": (14, 8)}
    x, y = jnp.asarray(ref["x"]), jnp.asarray(ref["y"])
    alpha = {g: jnp.asarray(ref[f"alpha/{g}"]) for g in space.groups}
    (_, (logits, new_stats)), (g_w, g_a) = _supernet_step(space, params, stats, x, y, alpha)
    np.testing.assert_allclose(logits, ref["logits"], rtol=1e-4, atol=1e-5)
    for g in space.groups:
        np.testing.assert_allclose(g_a[g], ref[f"grad_alpha/{g}"], rtol=1e-3, atol=1e-6)
    assert _norm(g_w) == pytest.approx(float(ref["grad_w_norm"]), rel=1e-4)
    assert float(sum(jnp.sum(jnp.abs(a)) for a in jax.tree_util.tree_leaves(new_stats))) == pytest.approx(
        float(ref["bn_abs_sum"]), rel=1e-5)

    gdas = get_relaxation("gdas", space=space)

    def gdas_loss(a):
        logits, _ = space.apply(params, stats, x, gdas.sample(a, jax.random.PRNGKey(7), 1.0), gdas.mix,
                                Ctx(train=True))
        return jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), y]), logits

    (_, logits), g_a = jax.jit(jax.value_and_grad(gdas_loss, has_aux=True))(alpha)
    np.testing.assert_allclose(logits, ref["gdas_logits"], rtol=1e-4, atol=1e-5)
    for g in space.groups:
        np.testing.assert_allclose(g_a[g], ref[f"gdas_grad_alpha/{g}"], rtol=1e-3, atol=1e-5)
    assert max(float(jnp.abs(v).max()) for v in g_a.values()) > 0.01


def test_darts_pc_darts_gives_the_numbers_of_its_searchspace_code():
    """PC-DARTS (K=2: the candidates on half of each node's channels, stride 2 included; the
    edges of a node weighed by β) on the old code's weights: logits and ∂loss/∂(α, β)."""
    from dnas.relaxations import get_relaxation

    ref, space, (params, stats) = _darts_space("pc/", partial_channels=2, unroll=False)
    x, y = jnp.asarray(ref["x"]), jnp.asarray(ref["y"])
    pc = get_relaxation("pc_darts", space=space, k=2)

    def loss(a, b):
        logits, _ = space.apply(params, stats, x, pc.sample({"alpha": a, "beta": b}, None, 0.0), pc.mix,
                                Ctx(train=True))
        return jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), y]), logits

    alpha = {g: jnp.asarray(ref[f"alpha/{g}"]) for g in space.groups}
    beta = {g: jnp.asarray(ref[f"beta/{g}"]) for g in space.groups}
    (_, logits), (g_a, g_b) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(alpha, beta)
    np.testing.assert_allclose(logits, ref["pc_logits"], rtol=1e-4, atol=1e-5)
    for g in space.groups:
        np.testing.assert_allclose(g_a[g], ref[f"pc_grad_alpha/{g}"], rtol=1e-3, atol=1e-6)
        np.testing.assert_allclose(g_b[g], ref[f"pc_grad_beta/{g}"], rtol=1e-3, atol=1e-6)


def test_darts_evaluation_network_gives_the_numbers_of_the_old_one():
    """The evaluation network of DARTS-V2 (``dnas.fix`` of the model built for evaluation) on the
    old network's weights: training logits and auxiliary logits (drop path off), inference
    logits; the auxiliary head's weights kept apart (``params["aux"]``)."""
    from flax import nnx

    from dnas.nnx import fix
    from dnas.supernet.darts import DartsConfig, DartsNet, Evaluation
    from dnas.supernet.nnx_space import NetworkLayout
    from tests.darts_reference import OPTIONS, PATH, aux_conv2_kernel

    ref = np.load(PATH)
    net = build_network(DARTS_V2, auxiliary=True, **OPTIONS)
    params, stats = net.init(jax.random.PRNGKey(0))
    assert "aux" in params
    flat = {k[len("derived/"):]: ref[k] for k in ref.files if k.startswith("derived/")}
    flat["aux/conv2/kernel"] = np.asarray(aux_conv2_kernel())
    model = fix(DartsNet(nnx.Rngs(0), DartsConfig(affine=True, **OPTIONS), evaluation=Evaluation(auxiliary=True)),
                DARTS_V2)
    fp, fs = (nnx.to_pure_dict(s) for s in nnx.state(model, nnx.Param, nnx.BatchStat))
    fp = _unflatten(flat, fp)
    p, s = NetworkLayout(fp, fs).stacked(fp, fs)
    x32 = jnp.asarray(ref["x32"])
    out = jax.jit(lambda p, s: net.apply(p, s, x32, Ctx(train=True)))(p, s)
    np.testing.assert_allclose(out.logits, ref["derived_logits"], rtol=1e-4, atol=1e-5)
    # the head's second BatchNorm normalises 2 values per channel (2 examples of 1x1 maps), which
    # magnifies float reassociation: 5e-5 here, where another op or weight moves logits by > 1e-2
    np.testing.assert_allclose(out.aux_logits, ref["derived_aux_logits"], rtol=1e-3, atol=2e-4)
    out = jax.jit(lambda p, s: net.apply(p, s, x32, Ctx(train=False)))(p, s)
    np.testing.assert_allclose(out.logits, ref["derived_eval_logits"], rtol=1e-4, atol=1e-5)
    assert out.aux_logits is None
