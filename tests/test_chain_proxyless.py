"""The ProxylessNAS chain space and the binary-gate relaxation."""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dnas.relaxations import get_relaxation
from dnas.supernet import layers as L
from dnas.supernet import context as C
from flax import nnx

from dnas.supernet.chain import KEEP_OPS, MB_OPS, ChainSpace, ChainConfig, chain_op
from dnas.supernet.genotype import ChainGenotype
from dnas.supernet.mixed import MixedOp
from dnas.supernet.nnx_space import module_layer
from dnas.supernet.ops import UnknownOpError
from dnas.supernet.spaces import build_space

TABLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "latency" / "proxylessnas_mobile_trim.yaml"
CTX = C.Ctx()


def test_default_chain_is_the_proxylessnas_mobile_supernet():
    space = ChainSpace(ChainConfig())
    # one choice point per block: 6 that change the shape (6 options), 15 that keep it (7: zero too)
    assert space.groups == {f"block{b}": (1, 7 if g == "keep" else 6) for b, (g, *_r) in enumerate(space.blocks)}
    assert sum(g == "keep" for g, *_r in space.blocks) == 15 and len(space.groups) == 21
    widths = [(ci, co, s) for _, _, ci, co, s in space.blocks]
    assert widths[:5] == [(16, 24, 2), (24, 24, 1), (24, 24, 1), (24, 24, 1), (24, 40, 2)]
    assert widths[-1] == (192, 320, 1) and len(widths) == 21


@pytest.mark.skipif(not TABLE.exists(), reason="../shared/data/latency not present")
def test_published_pixel1_table_covers_every_choice_of_the_default_chain():
    import yaml
    keys = set(yaml.safe_load(TABLE.read_text()))
    space = ChainSpace(ChainConfig())
    size = 112  # after the stride-2 stem; the first fixed MBConv keeps it
    missing = []
    for group, _, c_in, c_out, stride in space.blocks:
        out = size // stride
        for op in KEEP_OPS if group == "keep" else MB_OPS:
            if op == "zero":
                continue
            _, k, e = op.split("_")
            key = (f"expanded_conv-input:{size}x{size}x{c_in}-output:{out}x{out}x{c_out}-expand:{e[1:]}-"
                   f"kernel:{k[1:]}-stride:{stride}-idskip:{int(group == 'keep')}")
            if key not in keys:
                missing.append(key)
        size = out
    assert not missing, missing[:3]
    assert "Conv_1-input:7x7x320-output:7x7x1280" in keys and size == 7


def test_scaled_down_chain_runs_on_small_images_and_derives():
    space = build_space("chain", width_mult=0.25, stage_depths=(2, 1, 1, 1, 1, 1), stem_stride=1,
                        num_classes=10, in_channels=1)
    # at width 0.25 stage 4 (96 -> 24 channels) keeps the shape of stage 3, so its block may be skipped
    assert [g for g, *_ in space.blocks] == ["reshape", "keep", "reshape", "reshape", "keep", "reshape", "reshape"]
    assert space.groups == {f"block{b}": (1, 7 if b in (1, 4) else 6) for b in range(7)}
    darts = get_relaxation("darts")
    params, state = space.init(jax.random.PRNGKey(0))
    arch = darts.init(jax.random.PRNGKey(1), space.groups)
    logits, _ = jax.jit(lambda p, a: space.apply(p, state, jnp.ones((2, 8, 8, 1)), darts.sample(a, None, 0.0),
                                                 darts.mix, CTX))(params, arch)
    assert logits.shape == (2, 10) and bool(jnp.all(jnp.isfinite(logits)))
    best = [0, 6, 1, 2, 1, 3, 4]   # per block; block1 keeps its shape: 6 is zero
    scores = {f"block{b}": jax.nn.one_hot(jnp.asarray([i]), space.groups[f"block{b}"][1]) for b, i in enumerate(best)}
    g = space.derive(scores)
    assert isinstance(g, ChainGenotype)
    assert g.ops == ("mb_k3_e3", "zero", "mb_k3_e6", "mb_k5_e3", "mb_k3_e6", "mb_k5_e6", "mb_k7_e3")


def test_zero_keeps_the_residual_and_unknown_op_is_an_error():
    y = chain_op("zero", 8, 8, 1, nnx.Rngs(0))(jnp.ones((1, 4, 4, 8)))
    assert float(jnp.abs(y).max()) == 0.0
    with pytest.raises(UnknownOpError, match="mb_k9_e3"):
        chain_op("mb_k9_e3", 8, 8, 1, nnx.Rngs(0))


@pytest.fixture(scope="module")
def edge():
    mixed = MixedOp([module_layer(lambda rngs, o=o: chain_op(o, 8, 8, 1, rngs)) for o in KEEP_OPS])
    params, state = mixed.init(jax.random.PRNGKey(0))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 6, 6, 8)), jnp.float32)
    return mixed, params, state, x


def test_proxyless_samples_two_distinct_paths_with_binary_gates():
    px = get_relaxation("proxyless")
    alpha = {"keep": jnp.asarray(np.random.default_rng(0).standard_normal((50, 7)), jnp.float32)}
    s = px.sample(alpha, jax.random.PRNGKey(0), 0.0)["keep"]
    paths, gates = np.asarray(s["paths"]), np.asarray(s["gates"])
    assert paths.shape == (50, 2) and np.all(paths[:, 0] != paths[:, 1])
    assert np.all(np.sort(gates, -1) == [0.0, 1.0])


def test_proxyless_first_path_frequencies_follow_softmax():
    """The first path of the Gumbel top-2 is a draw from softmax(α) (chi-square, 6 dof)."""
    px = get_relaxation("proxyless")
    alpha = jnp.asarray([[1.0, 0.2, -0.5, 0.0, 0.7, -1.0, 0.3]])
    draws = jax.jit(jax.vmap(lambda k: px.sample({"keep": alpha}, k, 0.0)["keep"]["paths"][0, 0]))(
        jax.random.split(jax.random.PRNGKey(1), 20_000))
    counts = np.bincount(np.asarray(draws), minlength=7)
    expected = np.asarray(jax.nn.softmax(alpha[0])) * 20_000
    assert float(((counts - expected) ** 2 / expected).sum()) < 22.46  # p = 0.001


def test_proxyless_alpha_gradient_is_the_papers_formula(edge):
    """∂L/∂α_k = Σ_m ∂L/∂g_m p'_m(δ_km − p'_k) over the two sampled paths, 0 elsewhere."""
    mixed, params, state, x = edge
    px = get_relaxation("proxyless")
    alpha = jnp.asarray([[0.3, -0.2, 0.5, 0.1, -0.4, 0.0, 0.2]])
    key = jax.random.PRNGKey(3)

    def loss(a):
        s = jax.tree_util.tree_map(lambda t: t[0], px.sample({"keep": a}, key, 0.0)["keep"])
        y, _ = mixed.apply(params, state, x, s, px.mix, CTX)
        return jnp.sum(jnp.tanh(y))

    grad = np.asarray(jax.grad(loss)(alpha))[0]
    s = jax.tree_util.tree_map(lambda t: t[0], px.sample({"keep": alpha}, key, 0.0)["keep"])
    i, j = (int(v) for v in s["paths"])
    g = np.asarray(s["gates"])
    outs = [mixed.layers[m].apply(params[m], state[m], x, CTX)[0] for m in (i, j)]
    y = g[0] * outs[0] + g[1] * outs[1]
    dl_dg = np.asarray([float(jnp.sum((1 - jnp.tanh(y) ** 2) * o)) for o in outs])
    p2 = np.asarray(jax.nn.softmax(jnp.asarray([alpha[0, i], alpha[0, j]])))
    expected = np.zeros(7)
    for a, k in enumerate((i, j)):
        expected[k] = sum(dl_dg[m] * p2[m] * ((a == m) - p2[a]) for m in range(2))
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-6)
    # a sum of 576 terms of either sign (|Σ| ~ 0.1): float32 rounding of the two formulations, ~1e-5
    assert float(loss(alpha)) == pytest.approx(float(jnp.sum(jnp.tanh(y))), rel=1e-4, abs=1e-4)


def test_proxyless_evaluates_only_the_two_sampled_paths(edge):
    """Count, at run time, which candidate ops execute: exactly the two sampled ones."""
    mixed, params, state, x = edge
    calls = []
    layers = []
    for m, layer in enumerate(mixed.layers):
        def apply(p, s, x, ctx, layer=layer, m=m):
            jax.debug.callback(lambda: calls.append(m))
            return layer.apply(p, s, x, ctx)
        layers.append(L.Layer(layer.init, apply))
    counted = MixedOp(layers)
    px = get_relaxation("proxyless")
    alpha = {"keep": jnp.zeros((1, 7))}
    for seed in range(3):
        calls.clear()
        s = jax.tree_util.tree_map(lambda t: t[0], px.sample(alpha, jax.random.PRNGKey(seed), 0.0)["keep"])
        y, _ = jax.jit(lambda p, s: counted.apply(p, state, x, s, px.mix, CTX))(params, s)
        jax.block_until_ready(y)
        jax.effects_barrier()
        assert sorted(calls) == sorted(int(v) for v in s["paths"])
