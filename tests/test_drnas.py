"""DrNAS (Chen et al., ICLR 2021): Dirichlet sampling statistics, pathwise gradients, registry
and one jitted search step on a tiny NAS-Bench-201 supernet."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dnas.relaxations import REGISTRY, get_relaxation
from dnas.relaxations.drnas import anchor_penalty, concentration, dirichlet_mean, sample_dirichlet

# mixed signs (both branches of elu + 1) and one α exactly 0 (the kink of elu)
ALPHA = jnp.asarray([[0.5, -0.7, 1.5, 0.0, -0.2], [2.0, 0.3, -1.0, 0.8, 0.1]])
C = jnp.asarray([0.7, -1.2, 0.4, 2.0, -0.3])


def _closed_form_mean(alpha):
    beta = np.where(alpha > 0, alpha + 1.0, np.exp(alpha))
    return beta / beta.sum(-1, keepdims=True), beta.sum(-1, keepdims=True)


N = 20_000  # draws; the mean test's tolerance scales as 1/sqrt(N)


@pytest.fixture(scope="module")
def draws():
    """N draws of θ ~ Dir(β) for three groups and the pathwise gradient ∇_α (c·θ_normal) of
    each draw, from one compiled function (compiling the Gamma sampler dominates the cost):
    ``normal`` and ``reduce`` share α = ALPHA, ``tiny`` has α = -40 (β at the 1e-6 floor)."""
    arch = {"normal": ALPHA, "reduce": ALPHA, "tiny": jnp.full(ALPHA.shape, -40.0)}

    def one(key):
        def f(alpha):
            theta = sample_dirichlet({**arch, "normal": alpha}, key, 0.5)
            return jnp.sum(theta["normal"] @ C), theta
        return jax.grad(f, has_aux=True)(ALPHA)

    grads, theta = jax.jit(jax.vmap(one))(jax.random.split(jax.random.PRNGKey(1), N))
    return {g: np.asarray(t) for g, t in theta.items()}, np.asarray(grads)


def test_concentration_is_shifted_elu_and_stays_positive(draws):
    a = jnp.asarray([-200.0, -30.0, -1.0, 0.0, 1.0, 50.0, 200.0])
    beta = concentration(a)
    np.testing.assert_allclose(np.asarray(beta[2:6]), np.asarray(jax.nn.elu(a[2:6]) + 1.0), rtol=1e-6)
    assert bool(jnp.all(beta > 0)) and bool(jnp.all(jnp.isfinite(beta)))
    g = jax.grad(lambda a: jnp.sum(concentration(a)))(a)
    assert bool(jnp.all(jnp.isfinite(g))) and float(g[3]) == pytest.approx(1.0)  # elu'(0) = 1
    # very negative α: the draws are still finite points of the simplex
    tiny = draws[0]["tiny"]
    assert np.isfinite(tiny).all() and np.allclose(tiny.sum(-1), 1.0, atol=1e-5)


def test_samples_lie_on_the_simplex_and_average_to_the_dirichlet_mean(draws):
    """θ ≥ 0, Σθ = 1, and the mean of N draws is within 5 standard errors of β/Σβ
    (Var θ_i = m_i (1 - m_i) / (Σβ + 1))."""
    m, s = _closed_form_mean(np.asarray(ALPHA))
    se = np.sqrt(m * (1 - m) / (s + 1) / N)
    for g in ("normal", "reduce"):
        w = draws[0][g]
        assert w.shape == (N, 2, 5) and (w >= 0).all()
        np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)
        assert (np.abs(w.mean(0) - m) < 5 * se).all(), (g, w.mean(0), m, se)
    np.testing.assert_allclose(np.asarray(dirichlet_mean({"cell": ALPHA})["cell"]), m, rtol=1e-6)


def test_groups_get_independent_keys(draws):
    """Equal α in two groups, yet different draws: each group has its own key."""
    normal, reduce = draws[0]["normal"], draws[0]["reduce"]
    assert not np.allclose(normal[:10], reduce[:10])
    assert abs(np.corrcoef(normal[:, 0, 0], reduce[:, 0, 0])[0, 1]) < 0.05


def test_pathwise_gradient_matches_the_gradient_of_the_mean(draws):
    """E[c·θ] = c·β/Σβ, so the average of the reparameterised gradients ∇_α (c·θ) must match
    ∂/∂α_i (c·β/Σβ) = elu'(α_i)·(c_i - c·m)/Σβ (elu'(α) = 1 for α ≥ 0, e^α below)."""
    grads = draws[1]
    g_mc, se = grads.mean(0), grads.std(0) / np.sqrt(N)
    a, c = np.asarray(ALPHA), np.asarray(C)
    m, s = _closed_form_mean(a)
    g_exact = np.where(a >= 0, 1.0, np.exp(a)) * (c - (m @ c)[:, None]) / s
    assert np.linalg.norm(g_mc - g_exact) / np.linalg.norm(g_exact) < 0.03
    assert (np.abs(g_mc - g_exact) < 5 * se + 1e-6).all(), (g_mc, g_exact, se)
    # autodiff through the mean itself (eval_sample / probs) is the same closed form
    g_mean = jax.grad(lambda a: jnp.sum(dirichlet_mean({"g": a})["g"] @ C))(ALPHA)
    np.testing.assert_allclose(np.asarray(g_mean), g_exact, rtol=1e-5, atol=1e-7)


def test_anchor_penalty_is_off_by_default_and_l2_when_set():
    arch = {"normal": ALPHA, "reduce": -ALPHA}
    assert float(get_relaxation("drnas").arch_penalty(arch, 0.0)) == 0.0
    relax = get_relaxation("drnas", reg_scale=1e-3)
    beta = [np.asarray(concentration(a)) for a in arch.values()]
    want = 1e-3 * sum(((b - 1.0) ** 2).sum() for b in beta)
    assert float(relax.arch_penalty(arch, 0.3)) == pytest.approx(want, rel=1e-5)
    assert float(anchor_penalty({"g": jnp.zeros((2, 3))}, 1.0)) == 0.0  # α = 0 is the anchor Dir(1)


def test_registry_and_one_jitted_nb201_search_step():
    from dnas.searcher import make_searcher
    from dnas.supernet.genotype import NB201Genotype

    assert "drnas" in REGISTRY and get_relaxation("drnas").name == "drnas"
    searcher = make_searcher("nb201", "drnas", space_options=dict(channels=4, cells_per_stage=1, in_channels=1))
    state = searcher.init(jax.random.PRNGKey(0))
    assert state.arch["cell"].shape == searcher.space.groups["cell"]
    rng = np.random.default_rng(0)
    batch = lambda: (jnp.asarray(rng.standard_normal((8, 8, 8, 1)), jnp.float32),
                     jnp.asarray(rng.integers(0, 10, 8), jnp.int32))
    alpha0 = np.asarray(state.arch["cell"])
    state, metrics = searcher.compiled_step()(state, batch(), batch())
    for k in ("train_loss", "val_loss", "a_grad_norm", "entropy"):
        assert np.isfinite(float(metrics[k])), k
    assert float(metrics["a_grad_norm"]) > 0  # the Dirichlet sample carries a gradient to α
    assert not np.allclose(np.asarray(state.arch["cell"]), alpha0)
    assert isinstance(searcher.derive(state), NB201Genotype)
