"""The bilevel search step: optimizer conventions, learning, determinism, data parallelism."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dnas.searcher import Hyper, NonFiniteLossError, arch_optimizer, check_finite, make_searcher, weight_optimizer

TINY = dict(channels=4, cells_per_stage=1, num_classes=10, in_channels=1)


def test_weight_optimizer_is_darts_sgd():
    """One step from zero momentum: w ← w − lr·(clip(g) + wd·w); clipping scales to norm 5."""
    h = Hyper()
    tx, sched = weight_optimizer(h, total_steps=100)
    w = {"a": jnp.asarray([1.0, -2.0]), "b": jnp.asarray([[0.5]])}
    g = {"a": jnp.asarray([30.0, 40.0]), "b": jnp.asarray([[0.0]])}  # norm 50 -> scaled by 0.1
    upd, st = tx.update(g, tx.init(w), w)
    new = optax.apply_updates(w, upd)
    expect_a = np.array([1.0, -2.0]) - 0.025 * (np.array([3.0, 4.0]) + 3e-4 * np.array([1.0, -2.0]))
    np.testing.assert_allclose(np.asarray(new["a"]), expect_a, rtol=1e-6)
    assert float(sched(0)) == pytest.approx(0.025)
    assert float(sched(50)) == pytest.approx(0.001 + 0.5 * (0.025 - 0.001), rel=1e-5)
    assert float(sched(100)) == pytest.approx(0.001, rel=1e-5)


def test_arch_optimizer_is_adam_with_l2():
    """First Adam step moves each α by −lr·sign(g + wd·α) (bias-corrected m/√v = ±1)."""
    tx = arch_optimizer(Hyper())
    a = {"cell": jnp.asarray([[0.5, -0.5, 0.0]])}
    g = {"cell": jnp.asarray([[1.0, -2.0, 0.0]])}
    upd, _ = tx.update(g, tx.init(a), a)
    gl2 = np.array([[1.0, -2.0, 0.0]]) + 1e-3 * np.array([[0.5, -0.5, 0.0]])
    expected = -3e-4 * gl2 / (np.abs(gl2) + 1e-8)
    np.testing.assert_allclose(np.asarray(upd["cell"]), expected, rtol=1e-4, atol=1e-12)


def test_check_finite_names_the_step():
    check_finite({"train_loss": 1.0, "val_loss": 2.0}, 3)
    with pytest.raises(NonFiniteLossError, match="train_loss is nan at step 7"):
        check_finite({"train_loss": float("nan"), "val_loss": 2.0}, 7)


def test_arch_gradient_matches_finite_differences(digit_batches):
    """The first-order α-gradient of the validation loss agrees with central differences."""
    s = make_searcher("nb201", space_options=TINY)
    state = s.init(jax.random.PRNGKey(0))
    (_, _), (xv, yv) = digit_batches(1)[0]
    key = jax.random.PRNGKey(5)
    f = jax.jit(lambda a: s.val_loss(a, state.params, state.batch_stats, (xv, yv), key, 0.0)[0])
    g = jax.grad(f)(state.arch)["cell"]
    eps = 2e-3
    rng = np.random.default_rng(0)
    for _ in range(4):
        e, o = int(rng.integers(6)), int(rng.integers(5))
        d = jnp.zeros((6, 5)).at[e, o].set(eps)
        fd = (f({"cell": state.arch["cell"] + d}) - f({"cell": state.arch["cell"] - d})) / (2 * eps)
        assert float(g[e, o]) == pytest.approx(float(fd), rel=0.05, abs=2e-4)


def test_search_steps_lower_validation_loss(digits, digit_batches):
    """25 search steps on fresh batches lower the validation loss on 256 held-out examples."""
    s = make_searcher("nb201", space_options=TINY, total_steps=25)
    step = s.compiled_step(donate=False)
    state0 = state = s.init(jax.random.PRNGKey(0))
    held_out = (digits.test_x[:256], digits.test_y[:256].astype(np.int32))
    val = jax.jit(lambda st: s.val_loss(st.arch, st.params, st.batch_stats, held_out, st.key, 0.0)[0])
    losses = []
    for tb, vb in digit_batches(25, seed=1):
        state, m = step(state, tb, vb)
        losses.append(float(m["val_loss"]))
    assert np.all(np.isfinite(losses))
    before, after = float(val(state0)), float(val(state))
    assert after < before - 0.2, (before, after)
    # α moved away from its initialisation and the distribution stays a distribution
    assert float(jnp.abs(state.arch["cell"] - state0.arch["cell"]).max()) > 1e-3
    probs = s.probs(state)["cell"]
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    assert int(state.step) == 25


_SEARCHERS: dict = {}


def _run(digit_batches, seed, n=3, num_devices=1):
    if num_devices not in _SEARCHERS:  # one searcher (one compiled step) per device count
        s = make_searcher("nb201", space_options=TINY, total_steps=10, num_devices=num_devices)
        _SEARCHERS[num_devices] = (s, s.compiled_step())
    s, step = _SEARCHERS[num_devices]
    state = s.replicate(s.init(jax.random.PRNGKey(seed)))
    for tb, vb in digit_batches(n):
        state, m = step(state, s.shard(tb), s.shard(vb))
    return s, state


@pytest.mark.slow  # the default run covers determinism end to end: tests/test_cli.py::test_same_seed_same_architecture
def test_same_seed_same_alpha(digit_batches):
    _, a = _run(digit_batches, 0)
    _, b = _run(digit_batches, 0)
    _, c = _run(digit_batches, 1)
    np.testing.assert_array_equal(np.asarray(a.arch["cell"]), np.asarray(b.arch["cell"]))
    for u, v in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    assert not np.array_equal(np.asarray(a.arch["cell"]), np.asarray(c.arch["cell"]))


# ~30 s on 2 cores: `pytest -m slow`. The built-in spaces are NNX models searched through
# NNXSpace, so the default run's test_nnx.py::test_user_model_eight_devices_equal_one (same
# searcher, data-parallel step and synchronised BatchNorm), test_edge_loop.py's and
# test_train.py's data-parallel tests exercise the same code on 8 simulated devices
@pytest.mark.slow
@pytest.mark.skipif(jax.local_device_count() < 8, reason="needs 8 (simulated) devices; see tests/conftest.py")
def test_pmap_8_devices_equals_1_device(digit_batches):
    """Data parallel over 8 devices (sync BN, pmean'd gradients) reproduces the single-device
    step on the same global batch, and every device holds the same α."""
    s1, one = _run(digit_batches, 0, n=4, num_devices=1)
    s8, eight = _run(digit_batches, 0, n=4, num_devices=8)
    shards = [np.asarray(sh.data) for sh in eight.arch["cell"].addressable_shards]
    assert len(shards) == 8 and {sh.device for sh in eight.arch["cell"].addressable_shards} == set(s8.mesh.devices)
    for d in range(1, 8):
        np.testing.assert_array_equal(shards[d], shards[0])
    np.testing.assert_allclose(shards[0], np.asarray(one.arch["cell"]), atol=1e-5, rtol=0)
    for u, v in zip(jax.tree_util.tree_leaves(eight.params), jax.tree_util.tree_leaves(one.params)):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), atol=1e-5, rtol=1e-4)
    for u, v in zip(jax.tree_util.tree_leaves(eight.batch_stats),
                    jax.tree_util.tree_leaves(one.batch_stats)):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), atol=1e-5, rtol=1e-4)
