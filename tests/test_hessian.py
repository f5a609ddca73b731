"""The dominant eigenvalue of ∇²_α L_val (RobustDARTS), matrix-free, against explicit Hessians."""
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from dnas.hessian import hessian_extremes, lanczos
from dnas.searcher import make_searcher



def test_lanczos_on_a_quadratic_with_a_known_spectrum():
    """f(x) = ½ xᵀAx + bᵀx has Hessian A whatever x: the Ritz values of a full Lanczos run are A's
    eigenvalues, and a few steps already give the extreme ones closely."""
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    eig = np.array([-3.0, -1.0, -0.5, 0.1, 0.2, 0.5, 1.0, 1.5, 2.0, 4.0, 6.0, 9.0])
    a = (q * eig) @ q.T
    b = rng.normal(size=12)

    def f(x):
        return 0.5 * x["u"] @ (jnp.asarray(a, jnp.float32) @ x["u"]) + jnp.asarray(b, jnp.float32) @ x["u"]
    x = {"u": jnp.asarray(rng.normal(size=12), jnp.float32)}
    top, bottom = hessian_extremes(f, x, jax.random.PRNGKey(0), iters=12)
    np.testing.assert_allclose([float(top), float(bottom)], [9.0, -3.0], rtol=1e-4)
    ritz = lanczos(lambda v: jnp.asarray(a, jnp.float32) @ v, 12, jax.random.PRNGKey(1), 12)
    np.testing.assert_allclose(np.sort(np.asarray(ritz)), eig, atol=1e-4)
    top6, _ = hessian_extremes(f, x, jax.random.PRNGKey(0), iters=6)
    assert abs(float(top6) - 9.0) < 0.05
    # an invariant Krylov space (a start vector in a 2-d eigenspace) breaks down early and
    # still reports extremes of the spectrum it saw, no spurious values outside it
    diag = jnp.diag(jnp.asarray([5.0, 5.0, 1.0, 1.0]))
    ritz = lanczos(lambda v: diag @ v, 4, jax.random.PRNGKey(3), 4)
    assert float(ritz[-1]) == pytest.approx(5.0, rel=1e-5) and float(ritz[0]) == pytest.approx(1.0, rel=1e-5)


def _searcher(**kw):
    return make_searcher("nb201", "darts", space_options=dict(channels=4, cells_per_stage=1, in_channels=1,
                                                              num_classes=10), **kw)


def _perturbed_state(s):
    state = s.init(jax.random.PRNGKey(0))
    arch = jax.tree_util.tree_map(lambda a: a + 0.5 * jax.random.normal(jax.random.PRNGKey(7), a.shape), state.arch)
    return state._replace(arch=arch)


def test_supernet_hessian_extremes_equal_the_explicit_hessian(digit_batches):
    """On the NB201 supernet (30 α), Lanczos with 30 steps equals eigvalsh(jax.hessian) of the
    same validation loss."""
    s = _searcher()
    state = _perturbed_state(s)
    (_, val), = digit_batches(1, batch=32)
    top, bottom = jax.jit(lambda st, b: s.arch_hessian_extremes(st, b, iters=30))(state, val)

    progress = jnp.float32(0.0)
    k_sample, _ = jax.random.split(jax.random.fold_in(state.key, 0x4E55))
    flat, unravel = jax.flatten_util.ravel_pytree(state.arch)
    h = jax.jit(jax.hessian(lambda v: s.val_loss(unravel(v), state.params, state.batch_stats, val, k_sample,
                                                 progress)[0]))(flat)
    eig = np.linalg.eigvalsh(np.asarray(h, np.float64))
    scale = max(abs(eig[-1]), abs(eig[0]))
    np.testing.assert_allclose([float(top), float(bottom)], [eig[-1], eig[0]], atol=2e-3 * scale)
    assert eig[-1] > 0


@pytest.mark.slow   # ~1 min on 2 cores (the Lanczos scan of second-order products compiles twice)
@pytest.mark.skipif(jax.local_device_count() < 8, reason="needs 8 (simulated) devices; see tests/conftest.py")
def test_hessian_eigenvalue_on_8_devices_equals_1_device(digit_batches):
    (_, val), = digit_batches(1, batch=32)
    one = _searcher()
    state = _perturbed_state(one)
    ref = one.hessian_function(iters=10)(state, val)
    eight = _searcher(num_devices=8)
    got = eight.hessian_function(iters=10)(eight.replicate(state), eight.shard(val))
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=2e-4, atol=1e-6)
