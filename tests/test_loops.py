"""The supernet's loop modes compute the same function and gradients.

``unroll=True`` (every loop unrolled at trace time), ``False`` (cells and edges under
``lax.scan``, convolutions through ``branch_conv`` on CPU) and ``"scan_cells"`` (cells
scanned, edges unrolled) are three traced forms of one network: same parameters, same loss,
same gradient w.r.t. weights and α (``dnas.supernet.context.loop_mode``).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dnas.searcher import make_searcher
from dnas.supernet import layers as L
from dnas.supernet import context as C
from dnas.supernet.spaces import build_space

# darts: cells 3,4 form a scanned run. The DARTS space uses the dense separable-conv kernel in
# every mode, so that only the loops differ here (unrolled with the CPU default's shifted-view
# depthwise convolutions its compile took 84 s instead of 50 s on 2 cores; the views are
# checked against the native convolution in tests/test_ops.py, and in a whole supernet by the
# slow case below)
SMALL = {"nb201": {"channels": 4, "cells_per_stage": 2, "num_classes": 5},
         "darts": {"channels": 4, "layers": 5, "num_classes": 5, "impl": "dense"}}


@functools.lru_cache(maxsize=None)   # the unrolled reference is compiled once per space
def _loss_and_grads(space, unroll, relaxation="darts", impl=None):
    opts = {**SMALL[space], "unroll": unroll, **({"impl": impl} if impl else {})}
    s = make_searcher(space, relaxation, space_options=opts)
    st = s.init(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 3))
    y = jnp.arange(4) % 5

    def loss(params, arch):
        return s.train_loss(params, arch, st.batch_stats, (x, y), jax.random.PRNGKey(2), 0.5)[0]

    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(st.params, st.arch)
    if hasattr(s.space, "unrolled"):   # NB201's scanned cells hold stacked weights: compare cell by cell
        grads = (s.space.unrolled(grads[0], st.batch_stats)[0], grads[1])
    return value, grads


@pytest.mark.parametrize("space,mode", [
    # NB201's scanned cells against unrolled ones (its edges are unrolled in both): by default in
    # tests/test_spaces.py::test_supernet_shapes_and_unroll_equivalence, here under -m slow
    pytest.param("nb201", "scan_cells", marks=pytest.mark.slow),
    # the DARTS space compiles for 65-90 s per mode on 2 cores: pytest -m slow (its scanned form
    # also in the slow tests/test_spaces.py case)
    pytest.param("darts", False, marks=pytest.mark.slow),
    pytest.param("darts", "scan_cells", marks=pytest.mark.slow)])
def test_scanned_loops_equal_unrolled(space, mode):
    v_ref, g_ref = _loss_and_grads(space, True)
    v, g = _loss_and_grads(space, mode)
    _assert_same(v, g, v_ref, g_ref)


@pytest.mark.slow
def test_shifted_view_supernet_equals_the_dense_kernel_one():
    """The CPU default unrolled (depthwise convolutions as shifted views, dnas.kernels.cpu.depthwise)
    against the dense fused kernel scanned: the two formulations agree in a whole supernet."""
    v_ref, g_ref = _loss_and_grads("darts", True, impl="auto")
    v, g = _loss_and_grads("darts", False)
    _assert_same(v, g, v_ref, g_ref)


@pytest.mark.slow
def test_scanned_shifted_view_supernet_equals_unrolled():
    """With cells and edges scanned the CPU default's separable convolutions are shifted views
    too (their convolution-free backward pass, dnas.kernels.cpu.depthwise.branch_depthwise_conv)."""
    v_ref, g_ref = _loss_and_grads("darts", True, impl="auto")
    v, g = _loss_and_grads("darts", False, impl="auto")
    _assert_same(v, g, v_ref, g_ref)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU formulations")
def test_scanned_edges_keep_shifted_views_unrolled_edges_in_scanned_cells_the_dense_kernel():
    assert C.loop_ctx(C.Ctx(), False, True) == C.Ctx()
    assert C.loop_ctx(C.Ctx(custom_vjp=False), True, False) == C.Ctx(custom_vjp=False)
    scanned, cells_only = C.loop_ctx(C.Ctx(), True, False), C.loop_ctx(C.Ctx(), True, True)
    assert scanned.branch and not scanned.dense_separable
    assert cells_only.branch and cells_only.dense_separable
    layer = L.separable_conv(4, 6, 3, impl="auto")
    p, st = layer.init(jax.random.PRNGKey(0))
    x = jnp.ones((2, 8, 8, 4))

    def convolves(ctx):  # the dense kernel is one convolution; the views and the 1x1 dot none
        return "conv_general_dilated" in str(jax.make_jaxpr(lambda x: layer.apply(p, st, x, ctx)[0])(x))
    assert not convolves(C.Ctx()) and not convolves(scanned)
    assert convolves(cells_only) and convolves(C.Ctx(branch=True, dense_separable=True))


def _assert_same(v, g, v_ref, g_ref):
    np.testing.assert_allclose(float(v), float(v_ref), rtol=1e-5)
    flat_ref, tree_ref = jax.tree_util.tree_flatten(g_ref)
    flat, tree = jax.tree_util.tree_flatten(g)
    assert tree == tree_ref
    for a, b in zip(flat, flat_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-3, atol=2e-5)


def test_loop_mode_resolution_and_errors():
    cpu = jax.default_backend() == "cpu"
    assert C.loop_mode(True) == (True, True, False)
    assert C.loop_mode(False) == (False, False, cpu)
    assert C.loop_mode("scan_cells") == (False, True, cpu)
    assert C.loop_mode(None) == ((True, True, False) if cpu else (False, False, False))
    with pytest.raises(ValueError, match="unknown loop mode"):
        C.loop_mode("sideways")


def test_looped_darts_cells_run_their_edges_as_one_scan_per_kind_of_edge():
    """With its edges looped (``unroll=False``) a DARTS normal cell runs its 14 edges as one scan
    on a buffer that holds the cell inputs too (one edge traced per cell), a reduction cell its
    stride-2 input edges and its inner edges as two; unrolled there is no scan. (That both
    forms compute the same: tests/test_space_reference.py, against the old code's numbers.)"""
    from dnas.relaxations import dense_mix

    x = jnp.zeros((2, 8, 8, 3))
    for unroll, scans in ((False, 1 + 2 + 2), (True, 0)):
        space = build_space("darts", channels=4, layers=3, unroll=unroll)   # normal, reduce, reduce
        params, stats = space.init(jax.random.PRNGKey(0))
        w = {g: jnp.full(shape, 1.0 / shape[1]) for g, shape in space.groups.items()}
        jaxpr = jax.make_jaxpr(lambda p: space.apply(p, stats, x, w, dense_mix, C.Ctx(train=True)))(params)
        assert sum(e.primitive.name == "scan" for e in jaxpr.jaxpr.eqns) == scans
