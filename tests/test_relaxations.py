"""Relaxations: sampler statistics, estimators, equivalences, registry."""
from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dnas.relaxations import REGISTRY, UnknownRelaxationError, get_relaxation
from dnas.relaxations.gumbel import gumbel_noise, gumbel_softmax, straight_through
from dnas.supernet import context as C
from dnas.supernet.genotype import NB201_OPS
from dnas.supernet.mixed import MixedOp
from dnas.supernet.ops import candidate_ops

CTX = C.Ctx()
ALPHA = jnp.asarray([[1.0, -0.5, 0.3, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0, 0.0]])


def test_registry_and_unknown_name():
    assert {"darts", "gdas", "snas"} <= set(REGISTRY)
    with pytest.raises(UnknownRelaxationError, match="'magic'.*darts"):
        get_relaxation("magic")


def test_gumbel_noise_is_finite_at_the_extremes():
    g = gumbel_noise(jax.random.PRNGKey(0), (200_000,))
    assert bool(jnp.all(jnp.isfinite(g)))
    # Gumbel(0,1): mean = Euler-Mascheroni 0.5772, variance = pi^2/6
    assert float(jnp.mean(g)) == pytest.approx(0.5772, abs=0.01)
    assert float(jnp.var(g)) == pytest.approx(np.pi ** 2 / 6, rel=0.02)


def _chi_square(counts, probs):
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_gdas_one_hot_frequencies_match_softmax_alpha():
    """Argmax of Gumbel-perturbed log-probabilities samples op i with probability softmax(α)_i
    (the Gumbel-max trick); chi-square goodness of fit over 20,000 draws, 4 dof."""
    gdas = get_relaxation("gdas")
    arch = {"cell": ALPHA}
    sample = jax.jit(jax.vmap(lambda k: gdas.sample(arch, k, 0.3)["cell"]["index"]))
    idx = np.asarray(sample(jax.random.split(jax.random.PRNGKey(1), 20_000)))
    for row in range(2):
        counts = np.bincount(idx[:, row], minlength=5)
        probs = np.asarray(jax.nn.softmax(ALPHA[row]))
        assert _chi_square(counts, probs) < 18.47  # p = 0.001 critical value, 4 dof
    # the hard weights are exactly one-hot at the sampled index
    s = gdas.sample(arch, jax.random.PRNGKey(2), 0.5)["cell"]
    np.testing.assert_allclose(np.asarray(s["weights"]), np.asarray(jax.nn.one_hot(s["index"], 5)), atol=1e-6)


def test_straight_through_gradient_is_the_soft_gradient():
    """d/dα of a loss of the ST weights equals the soft sample's Jacobian applied to ∂L/∂w
    evaluated at the hard weights."""
    key = jax.random.PRNGKey(3)
    c = jnp.asarray([0.7, -1.2, 0.4, 2.0, -0.3])

    def loss_st(alpha):
        soft, logits = gumbel_softmax(alpha, key, 0.7)
        w = straight_through(soft, jnp.argmax(logits))
        return jnp.sum(c * w) + jnp.sum(w ** 2)

    a = ALPHA[0]
    soft, logits = gumbel_softmax(a, key, 0.7)
    hard = jax.nn.one_hot(jnp.argmax(logits), 5)
    dl_dw = c + 2 * hard
    expected = jax.vjp(lambda a: gumbel_softmax(a, key, 0.7)[0], a)[1](dl_dw)[0]
    np.testing.assert_allclose(np.asarray(jax.grad(loss_st)(a)), np.asarray(expected), rtol=1e-5, atol=1e-7)
    assert float(loss_st(a)) == pytest.approx(float(jnp.sum(c * hard) + 1.0), rel=1e-6)


@pytest.fixture(scope="module")
def nb201_edge():
    mixed = MixedOp(candidate_ops("nb201", NB201_OPS, 4, 1))
    params, state = mixed.init(jax.random.PRNGKey(0))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 6, 6, 4)), jnp.float32)
    return mixed, params, state, x


def test_gdas_forward_is_the_sampled_op_alone(nb201_edge):
    mixed, params, state, x = nb201_edge
    gdas = get_relaxation("gdas")
    for seed in range(6):
        s = jax.tree_util.tree_map(lambda a: a[0], gdas.sample({"cell": ALPHA}, jax.random.PRNGKey(seed), 0.2)["cell"])
        i = int(s["index"])
        alone, _ = mixed.layers[i].apply(params[i], state[i], x, CTX)
        y, _ = mixed.apply(params, state, x, s, gdas.mix, CTX)
        np.testing.assert_allclose(np.asarray(y), np.asarray(alone), rtol=1e-6, atol=1e-6)


def test_gdas_sampled_only_gradient_is_the_sampled_coordinate_of_the_full_st_gradient(nb201_edge):
    """Computing only the sampled op keeps the ST gradient's term of that op:
    ∂L/∂α = ∂L/∂w_i · ∂s_i/∂α; the dense variant (all ops) adds the other ops' terms."""
    mixed, params, state, x = nb201_edge
    sparse, dense = get_relaxation("gdas"), get_relaxation("gdas", sampled_only=False)
    key = jax.random.PRNGKey(4)
    alpha = ALPHA[:1]

    def loss(relax, a):
        s = jax.tree_util.tree_map(lambda t: t[0], relax.sample({"cell": a}, key, 0.1)["cell"])
        y, _ = mixed.apply(params, state, x, s, relax.mix, CTX)
        return jnp.sum(jnp.sin(y))

    assert float(loss(sparse, alpha)) == pytest.approx(float(loss(dense, alpha)), rel=1e-6)
    g_sparse = jax.grad(lambda a: loss(sparse, a))(alpha)
    s = jax.tree_util.tree_map(lambda t: t[0], sparse.sample({"cell": alpha}, key, 0.1)["cell"])
    i = int(s["index"])
    y_i, _ = mixed.layers[i].apply(params[i], state[i], x, CTX)
    dl_dwi = float(jnp.sum(jnp.cos(y_i) * y_i))
    ds_i = jax.grad(lambda a: gumbel_softmax(a, jax.random.split(key, 1)[0], 10.0 - 9.9 * 0.1)[0][0, i])(alpha)
    np.testing.assert_allclose(np.asarray(g_sparse), dl_dwi * np.asarray(ds_i), rtol=1e-4, atol=1e-7)
    assert not np.allclose(np.asarray(jax.grad(lambda a: loss(dense, a))(alpha)), np.asarray(g_sparse))


def test_gdas_temperature_anneals_linearly():
    from dnas.relaxations.gumbel import linear_tau
    tau = linear_tau(10.0, 0.1)
    assert tau(0.0) == pytest.approx(10.0) and tau(1.0) == pytest.approx(0.1) and tau(0.5) == pytest.approx(5.05)


def test_snas_weights_sum_to_one_and_harden_as_tau_falls():
    snas = get_relaxation("snas")
    keys = jax.random.split(jax.random.PRNGKey(5), 500)
    draw = jax.jit(jax.vmap(lambda k, p: snas.sample({"cell": ALPHA}, k, p)["cell"], in_axes=(0, None)))
    early, late = np.asarray(draw(keys, 0.0)), np.asarray(draw(keys, 1.0))
    np.testing.assert_allclose(early.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(late.sum(-1), 1.0, rtol=1e-5)
    assert early.max(-1).mean() < 0.8
    assert late.max(-1).mean() > 0.98  # τ = 0.03: nearly one-hot


# ------------------------------------------------------------------------------ PC-DARTS

def test_channel_shuffle_permutation():
    from dnas.relaxations.pc_darts import channel_shuffle
    x = jnp.arange(8.0).reshape(1, 1, 1, 8)
    np.testing.assert_array_equal(np.asarray(channel_shuffle(x, 4)).ravel(), [0, 2, 4, 6, 1, 3, 5, 7])
    np.testing.assert_array_equal(np.asarray(channel_shuffle(x, 1)), np.asarray(x))


@pytest.mark.parametrize("stride", [1, 2])
def test_pc_darts_bypassed_channels_pass_through_unchanged(stride):
    from dnas.relaxations.pc_darts import channel_shuffle, partial_mix
    k, c = 4, 8
    mixed = MixedOp(candidate_ops("darts", __import__("dnas.supernet.genotype", fromlist=["DARTS_OPS"]).DARTS_OPS,
                                  c // k, stride))
    params, state = mixed.init(jax.random.PRNGKey(0))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 8, 8, c)), jnp.float32)
    w = jax.nn.softmax(jnp.arange(8.0))
    y, _ = mixed.apply(params, state, x, w, partial_mix(k), CTX)
    assert y.shape == (2, 8 // stride, 8 // stride, c)
    # undo the shuffle: the last (K-1)C/K channels are the input's (max-pooled at stride 2)
    unshuffled = channel_shuffle(y, c // k)  # the inverse of a shuffle with K groups
    rest = x[..., c // k:]
    if stride == 2:
        rest = jnp.max(rest.reshape(2, 4, 2, 4, 2, c - c // k), axis=(2, 4))
    np.testing.assert_allclose(np.asarray(unshuffled[..., c // k:]), np.asarray(rest), rtol=1e-6)
    # and the first C/K are the softmax-weighted ops on the first C/K channels
    dense, _ = mixed.apply(params, state, x[..., : c // k], w, REGISTRY["darts"]().mix, CTX)
    np.testing.assert_allclose(np.asarray(unshuffled[..., : c // k]), np.asarray(dense), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("space_name,opts", [
    ("nb201", dict(channels=4, cells_per_stage=1, in_channels=1)),
    pytest.param("darts", dict(channels=4, layers=3, in_channels=1), marks=pytest.mark.slow),  # ~20 s; nb201 covers it
])
def test_pc_darts_with_k1_reduces_to_darts(space_name, opts):
    """K=1 without edge normalisation is DARTS exactly; K=1 with uniform β is DARTS with each
    edge scaled by 1/(number of edges into its node)."""
    from dnas.searcher import make_searcher
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 1)), jnp.float32)
    ref = make_searcher(space_name, "darts", space_options=opts)
    params, stats = ref.space.init(jax.random.PRNGKey(0))
    alpha = ref.relax.init(jax.random.PRNGKey(1), ref.space.groups)
    alpha = jax.tree_util.tree_map(lambda a: a * 500, alpha)
    want, _ = ref._forward(params, stats, alpha, x, None, 0.0)

    pc = make_searcher(space_name, "pc_darts", space_options=opts, relaxation_options=dict(k=1, edge_norm=False))
    arch = {"alpha": alpha, "beta": {g: jnp.zeros(n) for g, (n, _) in ref.space.groups.items()}}
    got, _ = pc._forward(params, stats, arch, x, None, 0.0)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)

    pc_norm = make_searcher(space_name, "pc_darts", space_options=opts, relaxation_options=dict(k=1))
    got, _ = pc_norm._forward(params, stats, arch, x, None, 0.0)
    nodes = {g: ref.space.choice_point_nodes(g) for g in ref.space.groups}
    edges_into = collections.Counter(node for n in nodes.values() for node in n)
    fan_in = {g: np.asarray([edges_into[d] for d in n], np.float32) for g, n in nodes.items()}
    samples = {g: jax.nn.softmax(alpha[g], -1) / fan_in[g][:, None] for g in alpha}
    want_scaled, _ = ref.space.apply(params, stats, x, samples, ref.relax.mix, CTX)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want_scaled), rtol=1e-5, atol=1e-5)


def test_pc_darts_edge_weights_and_scores():
    from dnas.supernet.spaces import build_space
    space = build_space("nb201", channels=4, cells_per_stage=1)
    pc = get_relaxation("pc_darts", space=space)
    arch = pc.init(jax.random.PRNGKey(0), space.groups)
    arch["beta"]["cell"] = jnp.asarray([0.0, 1.0, 2.0, 0.5, -0.5, 1.5])
    w = pc.derive_scores(arch)["cell"]
    p = jax.nn.softmax(arch["alpha"]["cell"], -1)
    e = np.asarray(w / p)[:, 0]
    # node 1 has one incoming edge (weight 1); node 2: edges 1,2; node 3: edges 3,4,5
    np.testing.assert_allclose(e[0], 1.0, rtol=1e-6)
    np.testing.assert_allclose(e[1:3], np.asarray(jax.nn.softmax(jnp.asarray([1.0, 2.0]))), rtol=1e-6)
    np.testing.assert_allclose(e[3:], np.asarray(jax.nn.softmax(jnp.asarray([0.5, -0.5, 1.5]))), rtol=1e-6)
    with pytest.raises(ValueError, match="needs the search space"):
        get_relaxation("pc_darts")
    with pytest.raises(ValueError, match="partial_channels=3"):
        build_space("nb201", channels=4, partial_channels=3)


def test_pc_darts_take_channels_values_and_gradients_equal_slicing():
    """``take_channels`` (a gather, so XLA keeps only the 1/K slice for the backward pass) is
    ``x[..., :n]`` in values and gradients, and the PC mix built on it equals the reference
    formulation with a plain slice."""
    from dnas.relaxations.pc_darts import _bypass, channel_shuffle, partial_mix, take_channels
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 6, 6, 8)), jnp.float32)
    g = jnp.asarray(np.random.default_rng(3).standard_normal((2, 6, 6, 2)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(take_channels(x, 2)), np.asarray(x[..., :2]))
    np.testing.assert_array_equal(np.asarray(jax.grad(lambda a: jnp.sum(take_channels(a, 2) * g))(x)),
                                  np.asarray(jax.grad(lambda a: jnp.sum(a[..., :2] * g))(x)))
    mixed = MixedOp(candidate_ops("nb201", NB201_OPS, 2, 1))
    params, state = mixed.init(jax.random.PRNGKey(0))
    w = jax.nn.softmax(jnp.arange(5.0) / 3)

    def reference(params, w, x):
        outs, _ = MixedOp(mixed.layers).apply(params, state, x[..., :2], w, REGISTRY["darts"]().mix, CTX)
        return channel_shuffle(jnp.concatenate([outs, _bypass(x[..., 2:], outs.shape[1:3])], -1), 4)

    def ours(params, w, x):
        return mixed.apply(params, state, x, w, partial_mix(4), CTX)[0]

    h = jnp.asarray(np.random.default_rng(4).standard_normal((2, 6, 6, 8)), jnp.float32)
    np.testing.assert_allclose(np.asarray(ours(params, w, x)), np.asarray(reference(params, w, x)), rtol=1e-6, atol=1e-6)
    g1 = jax.grad(lambda *a: jnp.sum(jnp.sin(ours(*a)) * h), (0, 1, 2))(params, w, x)
    g2 = jax.grad(lambda *a: jnp.sum(jnp.sin(reference(*a)) * h), (0, 1, 2))(params, w, x)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("i", range(len(NB201_OPS)))
def test_gdas_sampled_op_in_switch_matches_direct_op_values_and_gradients(nb201_edge, i):
    """Inside ``lax.switch`` (ctx.branch: branch convolutions, BatchNorm's output-form
    derivative) every NB201 op gives the values and gradients of the op applied directly."""
    from dnas.supernet.mixed import Candidates
    mixed, params, state, x = nb201_edge
    h = jnp.asarray(np.random.default_rng(5).standard_normal(x.shape), jnp.float32)

    def switched(params, x):
        return Candidates(mixed.layers, params, state, CTX).one(jnp.int32(i), x)[0]

    def direct(params, x):
        return mixed.layers[i].apply(params[i], state[i], x, CTX)[0]

    np.testing.assert_allclose(np.asarray(switched(params, x)), np.asarray(direct(params, x)), rtol=1e-5, atol=1e-6)
    g_s = jax.grad(lambda p, x: jnp.sum(jnp.sin(switched(p, x)) * h), (0, 1))(params, x)
    g_d = jax.grad(lambda p, x: jnp.sum(jnp.sin(direct(p, x)) * h), (0, 1))(params, x)
    np.testing.assert_allclose(np.asarray(g_s[1]), np.asarray(g_d[1]), rtol=1e-4, atol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(g_s[0][i]), jax.tree_util.tree_leaves(g_d[0][i])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["darts", "gdas", "snas", "pc_darts", "proxyless", "drnas", "fair_darts"])
def test_alphas_are_the_group_matrices(name):
    """``Relaxation.alphas`` (what alphas.json writes as α) gives one (choice point x op) matrix per
    group whatever the relaxation's pytree (PC-DARTS adds edge parameters β); for the
    softmax relaxations softmax of it is the architecture distribution."""
    from dnas.supernet.spaces import build_space

    space = build_space("nb201", channels=4, cells_per_stage=1)
    relax = get_relaxation(name, space=space)
    arch = relax.init(jax.random.PRNGKey(0), space.groups)
    arch = jax.tree_util.tree_map(lambda a: a + jax.random.normal(jax.random.PRNGKey(1), a.shape), arch)
    alphas = relax.alphas(arch)
    assert {g: a.shape for g, a in alphas.items()} == {"cell": (6, 5)}
    if name in ("darts", "gdas", "snas", "pc_darts", "proxyless"):
        np.testing.assert_allclose(jax.nn.softmax(alphas["cell"], -1), relax.probs(arch)["cell"], rtol=1e-6)
