"""Hypergradient estimators against closed forms and explicitly written objectives."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dnas.hypergrad import (Bilevel, check_tunable, conjugate_gradient, get_hypergrad, hvp, mixed_vjp,
                            mixed_vjp_fd, neumann_inverse)


# ---------------------------------------------------------------------- ridge regression
def _ridge(seed=0, n=40, d=6, m=30):
    rng = np.random.default_rng(seed)
    x, xv = rng.standard_normal((n, d)), rng.standard_normal((m, d))
    w_true = rng.standard_normal(d)
    y = x @ w_true + 0.5 * rng.standard_normal(n)
    yv = xv @ w_true + 0.5 * rng.standard_normal(m)
    return x, y, xv, yv


def _ridge_truth(x, y, xv, yv, lam):
    """w*(λ) = (XᵀX/n + λI)⁻¹ Xᵀy/n and dL_val(w*(λ))/d log λ = -λ ∇L_valᵀ (A+λI)⁻¹ w*."""
    n, d = x.shape
    a = x.T @ x / n + lam * np.eye(d)
    w = np.linalg.solve(a, x.T @ y / n)
    g_val = xv.T @ (xv @ w - yv) / len(yv)
    return w, -lam * g_val @ np.linalg.solve(a, w)


def _ridge_problem(x, y, xv, yv):
    x, y, xv, yv = (jnp.asarray(a, jnp.float32) for a in (x, y, xv, yv))
    return Bilevel(
        train_loss=lambda w, o: (0.5 * jnp.mean((x @ w["w"] - y) ** 2), None),
        val_loss=lambda w, o: (0.5 * jnp.mean((xv @ w["w"] - yv) ** 2), None),
        update=None,
        weight_decay=lambda o: jnp.exp(o["log_wd"]))


@pytest.mark.parametrize("lam", [0.03, 0.3, 2.0])
def test_implicit_cg_matches_ridge_closed_form(lam):
    x, y, xv, yv = _ridge()
    w_star, truth = _ridge_truth(x, y, xv, yv, lam)
    est = get_hypergrad("implicit-cg", iters=12, damping=0.0)
    g, (loss, _) = est(_ridge_problem(x, y, xv, yv), {"w": jnp.asarray(w_star, jnp.float32)}, None,
                       {"log_wd": jnp.log(jnp.float32(lam))})
    assert abs(float(g["log_wd"]) - truth) <= 1e-4 * abs(truth)
    assert np.isclose(float(loss), 0.5 * np.mean((xv @ w_star - yv) ** 2), rtol=1e-5)


def test_implicit_neumann_converges_to_ridge_closed_form():
    x, y, xv, yv = _ridge(seed=1)
    lam = 0.3
    w_star, truth = _ridge_truth(x, y, xv, yv, lam)
    eig_max = np.linalg.eigvalsh(x.T @ x / len(x) + lam * np.eye(x.shape[1])).max()
    prob, w = _ridge_problem(x, y, xv, yv), {"w": jnp.asarray(w_star, jnp.float32)}
    errors = []
    for terms in (2, 5, 10, 20):
        est = get_hypergrad("implicit-neumann", terms=terms, lr=float(1.0 / eig_max))
        g, _ = est(prob, w, None, {"log_wd": jnp.log(jnp.float32(lam))})
        errors.append(abs(float(g["log_wd"]) - truth) / abs(truth))
    assert all(b < 0.5 * a for a, b in zip(errors, errors[1:])), errors  # geometric convergence
    assert errors[-1] < 1e-4, errors


def test_conjugate_gradient_and_neumann_solve_spd_system():
    rng = np.random.default_rng(3)
    m = rng.standard_normal((8, 8))
    a = jnp.asarray(m @ m.T + 0.5 * np.eye(8), jnp.float32)
    b = {"u": jnp.asarray(rng.standard_normal(5), jnp.float32), "v": jnp.asarray(rng.standard_normal(3), jnp.float32)}
    flat = lambda t: jnp.concatenate([t["u"], t["v"]])
    unflat = lambda z: {"u": z[:5], "v": z[5:]}
    matvec = lambda t: unflat(a @ flat(t))
    exact = np.linalg.solve(np.asarray(a, np.float64), np.asarray(flat(b), np.float64))
    for unroll in (True, False):
        x = conjugate_gradient(matvec, b, iters=16, unroll=unroll)
        np.testing.assert_allclose(flat(x), exact, rtol=1e-3, atol=1e-4)
    lam_max = float(np.linalg.eigvalsh(np.asarray(a)).max())
    x = neumann_inverse(matvec, b, terms=3000, lr=1.0 / lam_max, unroll=False)
    np.testing.assert_allclose(flat(x), exact, rtol=1e-3, atol=1e-3)


def test_conjugate_gradient_stops_at_negative_curvature():
    """Indefinite A: the first direction with pᵀAp ≤ 0 stops CG (Steihaug) with the iterate so
    far — finite, never NaN — while A + δI positive definite is solved exactly."""
    a = jnp.diag(jnp.array([3.0, 1.0, -0.5]))
    b = jnp.array([1.0, 1.0, 4.0])  # bᵀAb = 4 - 8 < 0: stops at once
    x = conjugate_gradient(lambda v: a @ v, b, iters=5)
    np.testing.assert_array_equal(np.asarray(x), np.zeros(3))
    b2 = jnp.array([1.0, 1.0, 0.5])  # bᵀAb > 0: one step along b, then negative curvature
    x2 = conjugate_gradient(lambda v: a @ v, b2, iters=5)
    assert np.all(np.isfinite(np.asarray(x2))) and float(jnp.abs(x2).max()) > 0
    x3 = conjugate_gradient(lambda v: a @ v + 1.0 * v, b, iters=3)
    np.testing.assert_allclose(np.asarray(x3), np.asarray(b) / np.array([4.0, 2.0, 0.5]), rtol=1e-5)


def test_hvp_and_mixed_vjp_match_explicit_second_derivatives():
    def f(w, o):
        return jnp.sum(jnp.sin(w["a"]) * o["s"][0] ** 2) + jnp.sum(w["a"] ** 3) * o["s"][1] + jnp.prod(o["s"])
    w = {"a": jnp.array([0.3, -0.7, 1.1])}
    o = {"s": jnp.array([0.5, 2.0])}
    v = {"a": jnp.array([1.0, 0.5, -2.0])}
    h = jax.hessian(lambda a: f({"a": a}, o))(w["a"])
    np.testing.assert_allclose(hvp(lambda w_: f(w_, o), w, v)["a"], h @ v["a"], rtol=1e-5)
    cross = jax.jacfwd(lambda s: jax.grad(lambda a: f({"a": a}, {"s": s}))(w["a"]))(o["s"])  # (3, 2)
    np.testing.assert_allclose(mixed_vjp(f, w, o, v)["s"], cross.T @ v["a"], rtol=1e-5)
    np.testing.assert_allclose(mixed_vjp_fd(f, w, o, v)["s"], cross.T @ v["a"], rtol=1e-2)


# ---------------------------------------------------------------------- unrolled estimators
def _mlp_problem(seed=0, momentum=0.9, clip=None):
    """A two-layer regression net whose activation is an α-weighted mix of tanh and relu,
    trained by SGD with momentum and weight decay (optax, hyperparameters injected from the
    outer variables)."""
    rng = np.random.default_rng(seed)
    xt, xv = (jnp.asarray(rng.standard_normal((32, 4)), jnp.float32) for _ in range(2))
    yt, yv = (jnp.asarray(rng.standard_normal((32, 1)), jnp.float32) for _ in range(2))

    def net(w, o, x):
        p = jax.nn.softmax(o["alpha"])
        z = x @ w["w1"]
        return (p[0] * jnp.tanh(z) + p[1] * jax.nn.relu(z)) @ w["w2"]

    def make(learning_rate, weight_decay):
        parts = [optax.clip_by_global_norm(clip)] if clip else []
        return optax.chain(*parts, optax.add_decayed_weights(weight_decay),
                           optax.sgd(learning_rate, momentum=momentum))
    tx = optax.inject_hyperparams(make)(learning_rate=0.1, weight_decay=0.01)

    def update(g, w, s, o):
        s = s._replace(hyperparams={"learning_rate": jnp.exp(o["log_lr"]), "weight_decay": jnp.exp(o["log_wd"])})
        u, s = tx.update(g, s, w)
        return optax.apply_updates(w, u), s

    problem = Bilevel(train_loss=lambda w, o: (jnp.mean((net(w, o, xt) - yt) ** 2), None),
                      val_loss=lambda w, o: (jnp.mean((net(w, o, xv) - yv) ** 2), None),
                      update=update, weight_decay=lambda o: jnp.exp(o["log_wd"]))
    w = {"w1": jnp.asarray(rng.standard_normal((4, 8)), jnp.float32) * 0.5,
         "w2": jnp.asarray(rng.standard_normal((8, 1)), jnp.float32) * 0.5}
    outer = {"alpha": jnp.array([0.3, -0.2]), "log_lr": jnp.log(jnp.float32(0.1)),
             "log_wd": jnp.log(jnp.float32(0.01))}
    # a non-zero momentum buffer, as in the middle of a search
    s = tx.init(w)
    for _ in range(3):
        w, s = update(problem.train_grad(w, outer), w, s, outer)
    return problem, w, s, outer, net, (xt, yt, xv, yv)


def _explicit_one_step(problem, w, s, net, data, momentum):
    """DARTS's one-step objective written out by hand: L_val(w - ξ(μ·m + ∇L_train + wd·w), φ)."""
    xt, yt, xv, yv = data
    m = s.inner_state[1][0].trace  # the momentum buffer of optax.trace

    def objective(o):
        lr, wd = jnp.exp(o["log_lr"]), jnp.exp(o["log_wd"])
        g = jax.grad(lambda w_: jnp.mean((net(w_, o, xt) - yt) ** 2))(w)
        w1 = jax.tree_util.tree_map(lambda wi, gi, mi: wi - lr * (momentum * mi + gi + wd * wi), w, g, m)
        return jnp.mean((net(w1, o, xv) - yv) ** 2)
    return jax.grad(objective)


def test_unrolled_equals_grad_of_explicit_one_step_objective():
    problem, w, s, outer, net, data = _mlp_problem(momentum=0.9)
    truth = _explicit_one_step(problem, w, s, net, data, 0.9)(outer)
    g, _ = get_hypergrad("unrolled")(problem, w, s, outer)
    for k in outer:
        np.testing.assert_allclose(g[k], truth[k], rtol=2e-5, atol=1e-7)
        assert np.all(np.abs(np.asarray(truth[k])) > 1e-6)  # every outer variable is exercised
    g_fd, _ = get_hypergrad("unrolled-fd")(problem, w, s, outer)
    for k in outer:
        np.testing.assert_allclose(g_fd[k], truth[k], rtol=1e-2, atol=1e-5)
    g1, _ = get_hypergrad("unrolled-k", steps=1)(problem, w, s, outer)
    for k in outer:
        np.testing.assert_allclose(g1[k], truth[k], rtol=2e-5, atol=1e-7)


def test_unrolled_through_clipping_equals_jax_grad_of_the_update():
    problem, w, s, outer, net, data = _mlp_problem(momentum=0.5, clip=0.05)  # clipping active
    def objective(o):
        w1, _ = problem.update(problem.train_grad(w, o), w, s, o)
        return problem.val_loss(w1, o)[0]
    truth = jax.grad(objective)(outer)
    g, _ = get_hypergrad("unrolled")(problem, w, s, outer)
    for k in outer:
        np.testing.assert_allclose(g[k], truth[k], rtol=2e-5, atol=1e-7)


def test_unrolled_k_equals_explicit_k_step_objective():
    problem, w, s, outer, net, data = _mlp_problem(momentum=0.9)
    xt, yt, xv, yv = data

    def objective(o):  # K = 3 momentum-SGD steps written out
        lr, wd = jnp.exp(o["log_lr"]), jnp.exp(o["log_wd"])
        wk, m = w, s.inner_state[1][0].trace
        for _ in range(3):
            g = jax.grad(lambda w_: jnp.mean((net(w_, o, xt) - yt) ** 2))(wk)
            m = jax.tree_util.tree_map(lambda mi, gi, wi: 0.9 * mi + gi + wd * wi, m, g, wk)
            wk = jax.tree_util.tree_map(lambda wi, mi: wi - lr * mi, wk, m)
        return jnp.mean((net(wk, o, xv) - yv) ** 2)
    truth = jax.grad(objective)(outer)
    g, _ = get_hypergrad("unrolled-k", steps=3)(problem, w, s, outer)
    for k in outer:
        np.testing.assert_allclose(g[k], truth[k], rtol=5e-5, atol=1e-7)


@pytest.mark.parametrize("estimator", ["unrolled", "unrolled-fd", "unrolled-k"])
def test_learning_rate_hypergradient_sign_on_a_quadratic(estimator):
    """L(w) = ½h‖w‖²: one SGD step scales w by (1 - ξh); a too small ξ (ξh = 0.1) must be
    pushed up (negative gradient w.r.t. log ξ), a too large one (ξh = 2.5, divergent) down."""
    h = 4.0
    def update(g, w, s, o):
        return jax.tree_util.tree_map(lambda wi, gi: wi - jnp.exp(o["log_lr"]) * gi, w, g), s
    loss = lambda w, o: (0.5 * h * jnp.sum(w["w"] ** 2), None)
    problem = Bilevel(train_loss=loss, val_loss=loss, update=update, weight_decay=lambda o: 0.0)
    w = {"w": jnp.array([1.0, -2.0])}
    opts = {"steps": 2} if estimator == "unrolled-k" else {}
    est = get_hypergrad(estimator, **opts)
    g_small, _ = est(problem, w, None, {"log_lr": jnp.log(jnp.float32(0.1 / h))})
    g_large, _ = est(problem, w, None, {"log_lr": jnp.log(jnp.float32(2.5 / h))})
    assert float(g_small["log_lr"]) < 0 < float(g_large["log_lr"])


def test_first_order_is_partial_derivative_only():
    problem, w, s, outer, net, data = _mlp_problem()
    g, (loss, _) = get_hypergrad("first")(problem, w, s, outer)
    truth = jax.grad(lambda o: problem.val_loss(w, o)[0])(outer)
    np.testing.assert_allclose(g["alpha"], truth["alpha"], rtol=1e-6)
    assert float(g["log_lr"]) == 0.0 and float(g["log_wd"]) == 0.0


def test_bad_estimator_names_options_and_zero_hypergradient_combinations():
    with pytest.raises(ValueError, match="unknown hypergradient estimator 'secnd'"):
        get_hypergrad("secnd")
    with pytest.raises(ValueError, match="takes option"):
        get_hypergrad("unrolled", steps=3)
    with pytest.raises(ValueError, match="does not change the inner optimum"):
        check_tunable("implicit-cg", ["lr"])
    with pytest.raises(ValueError, match="first order holds w fixed"):
        check_tunable("first", ["wd"])
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        check_tunable("unrolled", ["momentum"])
    check_tunable("implicit-neumann", ["wd"])
    check_tunable("unrolled-k", ["lr", "wd"])


# ---------------------------------------------------------------------- on the supernet
from dnas.searcher import Hyper, make_searcher  # noqa: E402

TINY = dict(channels=4, cells_per_stage=1, num_classes=10, in_channels=1, unroll=False)  # scanned: short compiles


@pytest.mark.slow  # ~40 s on 2 cores; on a supernet also: test_nnx's test_user_model_unrolled_hypergradient_...
def test_supernet_unrolled_equals_explicit_darts_second_order(digit_batches):
    """On the NB201 supernet: the `unrolled` hypergradient of α, log lr and log wd equals
    jax.grad (reverse-over-reverse) of the DARTS one-step objective written out by hand,
    L_val(w - ξ(clip(∇_w L_train(w, α)) + wd·w), α) (momentum buffer empty at step 0)."""
    s = make_searcher("nb201", space_options=TINY, hypergrad="unrolled", tune=("lr", "wd"),
                      hyper=Hyper(w_grad_clip=1.0))
    state = s.init(jax.random.PRNGKey(0))
    tb, vb = digit_batches(1)[0]
    kt, kv = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    w, stats = state.params, state.batch_stats

    def objective(o):
        lr, wd = jnp.exp(o["hyper"]["log_lr"]), jnp.exp(o["hyper"]["log_wd"])
        g = jax.grad(lambda w_: s.train_loss(w_, o["arch"], stats, tb, kt, 0.0)[0])(w)
        norm = jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree_util.tree_leaves(g)))
        scale = jnp.minimum(1.0, 1.0 / norm)
        w1 = jax.tree_util.tree_map(lambda wi, gi: wi - lr * (scale * gi + wd * wi), w, g)
        return s.val_loss(o["arch"], w1, stats, vb, kv, 0.0)[0]

    outer = {"arch": state.arch, "hyper": dict(state.hyper)}
    truth = jax.jit(jax.grad(objective))(outer)
    got, _ = jax.jit(lambda st: s.outer_grad(st, tb, vb, kt, kv, 0.0))(state)
    np.testing.assert_allclose(got["arch"]["cell"], truth["arch"]["cell"], rtol=1e-3, atol=2e-6)
    for k in ("log_lr", "log_wd"):
        np.testing.assert_allclose(got["hyper"][k], truth["hyper"][k], rtol=1e-3, atol=1e-9)
    # second order differs from first order (the test would not notice a dropped term otherwise)
    first = jax.grad(lambda a: s.val_loss(a, w, stats, vb, kv, 0.0)[0])(state.arch)["cell"]
    assert float(jnp.abs(first - truth["arch"]["cell"]).max()) > 1e-2 * float(jnp.abs(first).max())


def test_searcher_refuses_zero_hypergradient_combinations():
    with pytest.raises(ValueError, match="--tune lr with --hypergrad implicit-cg"):
        make_searcher("nb201", space_options=TINY, hypergrad="implicit-cg", tune=("lr",))
    with pytest.raises(ValueError, match="--tune wd with --hypergrad first"):
        make_searcher("nb201", space_options=TINY, tune=("wd",))
    with pytest.raises(ValueError, match="positive initial weight decay"):
        make_searcher("nb201", space_options=TINY, hypergrad="unrolled", tune=("wd",),
                      hyper=Hyper(w_weight_decay=0.0))


_slow = pytest.mark.slow  # ~1-2 min each on 2 cores; `pytest -m slow` runs them
_ESTIMATOR_CASES = [pytest.param("first", {}, (), marks=_slow, id="first"),  # also in test_search
                    pytest.param("unrolled", {}, ("lr", "wd"), marks=_slow, id="unrolled"),  # exactness: test_supernet_unrolled_...
                    pytest.param("unrolled-fd", {}, ("lr",), marks=_slow, id="unrolled-fd"),
                    pytest.param("unrolled-k", {"steps": 2}, ("lr", "wd"), marks=_slow, id="unrolled-k"),
                    pytest.param("implicit-cg", {"iters": 3, "unroll": False}, ("wd",), marks=_slow, id="implicit-cg"),
                    pytest.param("implicit-neumann", {"terms": 3, "unroll": False}, ("wd",), marks=_slow, id="implicit-neumann")]


@pytest.mark.skipif(jax.local_device_count() < 8, reason="needs 8 (simulated) devices; see tests/conftest.py")
@pytest.mark.parametrize("name,opts,tune", _ESTIMATOR_CASES)
def test_estimator_8_devices_equals_1_device(digit_batches, name, opts, tune):
    """Each estimator, data parallel over 8 devices, reproduces 1 device on the same global
    batch (α and the tuned hyperparameters), and the tuned hyperparameters move."""
    results = []
    for n_dev in (1, 8):
        s = make_searcher("nb201", space_options=TINY, total_steps=10, num_devices=n_dev, hypergrad=name,
                          hypergrad_options=opts, tune=tune, hyper=Hyper(hyper_lr=0.05))
        step = s.compiled_step()
        state = s.replicate(s.init(jax.random.PRNGKey(0)))
        for tb, vb in digit_batches(3):
            state, m = step(state, s.shard(tb), s.shard(vb))
        assert np.isfinite(float(m["val_loss"]))
        results.append(jax.device_get((state.arch, state.hyper)))
    (a1, h1), (a8, h8) = results
    np.testing.assert_allclose(a8["cell"], a1["cell"], atol=2e-5, rtol=0)
    for k in h1:
        np.testing.assert_allclose(h8[k], h1[k], atol=2e-5, rtol=0)
    init = {"log_lr": np.log(0.025), "log_wd": np.log(3e-4)}
    for k in h1:
        moved = abs(float(h1[k]) - init[k]) > 0.05
        assert moved == (k[4:] in tune), (k, float(h1[k]), init[k])
