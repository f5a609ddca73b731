"""Candidate ops, layers and mixed ops: shapes, closed forms, equivalences."""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dnas.relaxations import dense_mix
from dnas.supernet import layers as L
from dnas.supernet import context as C
from dnas.kernels import dispatch as K
from dnas.supernet.genotype import DARTS_OPS, NB201_OPS
from dnas.supernet.mixed import Candidates, MixedOp
from dnas.supernet.ops import UnknownOpError, candidate_ops, darts_op, nb201_op

CTX = C.Ctx(train=True)


def _x(shape=(2, 9, 9, 6), seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("name", DARTS_OPS)
@pytest.mark.parametrize("hw", [8, 9])
def test_darts_op_shapes(name, stride, hw):
    op = darts_op(name, 6, stride)
    p, s = op.init(jax.random.PRNGKey(0))
    y, s2 = op.apply(p, s, _x((2, hw, hw, 6)), CTX)
    out = (hw + 1) // 2 if stride == 2 else hw
    assert y.shape == (2, out, out, 6)
    assert jax.tree_util.tree_structure(s2) == jax.tree_util.tree_structure(s)
    assert bool(jnp.all(jnp.isfinite(y)))
    if name == "none":
        assert float(jnp.abs(y).max()) == 0.0


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("name", NB201_OPS)
def test_nb201_op_shapes(name, stride):
    op = nb201_op(name, 6, stride)
    p, s = op.init(jax.random.PRNGKey(0))
    y, _ = op.apply(p, s, _x((2, 8, 8, 6)), CTX)
    assert y.shape == (2, 8 // stride, 8 // stride, 6)


def test_skip_connect_is_identity_at_stride_1():
    x = _x()
    for op in (darts_op("skip_connect", 6, 1), nb201_op("skip_connect", 6, 1)):
        y, _ = op.apply(*op.init(jax.random.PRNGKey(0)), x, CTX)
        np.testing.assert_array_equal(np.asarray(y), np.asarray(x))


@pytest.mark.parametrize("builder,valid", [(darts_op, DARTS_OPS), (nb201_op, NB201_OPS)])
def test_unknown_op_names_the_op_and_the_valid_ones(builder, valid):
    with pytest.raises(UnknownOpError) as e:
        builder("conv_7x7", 6, 1)
    assert "conv_7x7" in str(e.value) and all(v in str(e.value) for v in valid)


def test_avg_pool_excludes_padding_like_pytorch():
    x = jnp.ones((1, 4, 4, 1))
    y, _ = L.avg_pool(3, 1, 1).apply((), (), x, CTX)
    np.testing.assert_allclose(np.asarray(y), 1.0, rtol=1e-6)  # corners average 4 real pixels
    x = jnp.arange(16.0).reshape(1, 4, 4, 1)
    y, _ = L.avg_pool(3, 1, 1).apply((), (), x, CTX)
    np.testing.assert_allclose(float(y[0, 0, 0, 0]), (0 + 1 + 4 + 5) / 4.0, rtol=1e-6)


def test_batchnorm_train_and_eval_closed_form():
    x = _x((4, 3, 3, 5))
    bn = L.batchnorm(5, affine=False)
    p, s = bn.init(None)
    y, s2 = bn.apply(p, s, x, C.Ctx(train=True))
    xn = np.asarray(x).reshape(-1, 5)
    mean, var = xn.mean(0), xn.var(0)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 5), (xn - mean) / np.sqrt(var + 1e-5), atol=1e-5)
    np.testing.assert_allclose(np.asarray(s2["mean"]), 0.1 * mean, atol=1e-6)
    n = xn.shape[0]
    np.testing.assert_allclose(np.asarray(s2["var"]), 0.9 + 0.1 * var * n / (n - 1), atol=1e-6)
    y_eval, s3 = bn.apply(p, s2, x, C.Ctx(train=False))
    np.testing.assert_allclose(np.asarray(y_eval), (np.asarray(x) - np.asarray(s2["mean"])) /
                               np.sqrt(np.asarray(s2["var"]) + 1e-5), atol=1e-5)
    assert s3 is s2


@pytest.mark.parametrize("kernel,stride,dilation", [(3, 1, 1), (5, 2, 1), (3, 2, 2), (5, 1, 2)])
def test_separable_conv_dense_equals_native(kernel, stride, dilation):
    """The fused dense formulation computes the grouped+pointwise convolution exactly, with the
    same gradients for both kernels and the input."""
    native = L.separable_conv(6, 6, kernel, stride, dilation, impl="native")
    dense = L.separable_conv(6, 6, kernel, stride, dilation, impl="dense")
    p, _ = native.init(jax.random.PRNGKey(3))
    x = _x((2, 9, 9, 6), seed=1)

    def loss(layer):
        return lambda p, x: jnp.sum(jnp.sin(layer.apply(p, (), x, CTX)[0]))

    y_n, _ = native.apply(p, (), x, CTX)
    y_d, _ = dense.apply(p, (), x, CTX)
    np.testing.assert_allclose(np.asarray(y_d), np.asarray(y_n), rtol=1e-4, atol=1e-5)
    g_n = jax.grad(loss(native), argnums=(0, 1))(p, x)
    g_d = jax.grad(loss(dense), argnums=(0, 1))(p, x)
    for a, b in zip(jax.tree_util.tree_leaves(g_d), jax.tree_util.tree_leaves(g_n)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def _grouped_depthwise(x, w, stride, pad, dilation):
    """The reference depthwise convolution: XLA's grouped convolution (one group per channel)."""
    return jax.lax.conv_general_dilated(x, w[:, :, None, :], (stride, stride), ((pad, pad), (pad, pad)),
                                        rhs_dilation=(dilation, dilation), feature_group_count=x.shape[-1],
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("kernel,stride,dilation", [(3, 1, 1), (5, 2, 1), (3, 2, 2), (5, 1, 2)])
def test_depthwise_conv_as_shifted_views_equals_grouped_conv(kernel, stride, dilation):
    """``depthwise.depthwise_conv`` (shifted views, custom JVP) equals XLA's grouped
    convolution in float64: values, gradients, forward mode, and the second-order products the
    hypergradients take (forward-over-reverse and reverse-over-reverse)."""
    from dnas.kernels.cpu.depthwise import depthwise_conv
    pad = dilation * (kernel - 1) // 2
    rng = np.random.default_rng(kernel + 10 * stride + 100 * dilation)

    grouped = partial(_grouped_depthwise, stride=stride, pad=pad, dilation=dilation)

    def views(x, w):
        return depthwise_conv(x, w, stride, pad, dilation)

    with jax.enable_x64(True):
        x, tx = (jnp.asarray(rng.standard_normal((2, 9, 9, 5))) for _ in range(2))
        w, tw = (jnp.asarray(rng.standard_normal((kernel, kernel, 5))) for _ in range(2))

        @partial(jax.jit, static_argnums=0)
        def derivatives(conv):
            loss = lambda x, w: jnp.sum(jnp.sin(conv(x, w)))  # noqa: E731
            grad = jax.grad(loss, (0, 1))
            return (conv(x, w), *grad(x, w), jax.jvp(conv, (x, w), (tx, tw))[1],
                    *jax.jvp(grad, (x, w), (tx, tw))[1],
                    jax.grad(lambda x, w: jnp.sum(jax.grad(loss, 1)(x, w) ** 2), 0)(x, w))

        for a, b in zip(derivatives(views), derivatives(grouped)):
            assert a.shape == b.shape and a.dtype == jnp.float64
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kernel,stride,dilation", [(3, 1, 1), (7, 2, 1), (5, 1, 2)])
def test_branch_depthwise_conv_equals_grouped_conv_inside_a_switch(kernel, stride, dilation):
    """``depthwise.branch_depthwise_conv`` (shifted views; custom VJP without convolutions,
    kernel gradient one tap per loop iteration: what a sampled op's depthwise convolutions
    run on the CPU) equals XLA's grouped convolution in float64 inside a ``lax.switch``:
    values, gradients and reverse-over-reverse (the backward pass is differentiable; its input
    gradient is shifted views of the stride-dilated cotangent), at even and odd sizes;
    ``K.conv`` routes a depthwise convolution on the branch path to it."""
    from dnas.kernels.cpu.depthwise import branch_depthwise_conv
    pad = dilation * (kernel - 1) // 2
    rng = np.random.default_rng(kernel + 10 * stride + 100 * dilation)

    grouped = partial(_grouped_depthwise, stride=stride, pad=pad, dilation=dilation)

    def views(x, w):
        return branch_depthwise_conv(x, w, stride, pad, dilation)

    def routed(x, w):   # the layer on the branch path
        return K.conv(x, w[:, :, None, :], stride, pad, dilation, groups=x.shape[-1], branch=True)

    with jax.enable_x64(True):
        x = jnp.asarray(rng.standard_normal((2, 12, 11, 5)))   # even and odd sizes (stride 2)
        w = jnp.asarray(rng.standard_normal((kernel, kernel, 5)))

        @partial(jax.jit, static_argnums=0)
        def derivatives(conv):
            def loss(x, w, i=0):
                return jax.lax.switch(i, [lambda x, w: jnp.sum(jnp.sin(conv(x, w))), lambda x, w: jnp.sum(x * x)], x, w)
            grad = jax.grad(loss, (0, 1))
            return (conv(x, w), *grad(x, w), *grad(x, w, 1),
                    jax.grad(lambda x, w: jnp.sum(jax.grad(loss, 1)(x, w) ** 2), (0, 1))(x, w))

        want = jax.tree_util.tree_leaves(derivatives(grouped))
        got = jax.tree_util.tree_leaves(derivatives(views))
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert a.shape == b.shape and a.dtype == jnp.float64
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-10)
        # the layer on the branch path runs it: same values and gradients (not just close)
        for a, b in zip(jax.grad(lambda x, w: jnp.sum(jnp.sin(routed(x, w))), (0, 1))(x, w),
                        jax.grad(lambda x, w: jnp.sum(jnp.sin(views(x, w))), (0, 1))(x, w)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_factorized_reduce_odd_size_and_channels():
    fr = L.factorized_reduce(6, 8)
    p, s = fr.init(jax.random.PRNGKey(0))
    y, _ = fr.apply(p, s, _x((2, 9, 9, 6)), CTX)
    assert y.shape == (2, 5, 5, 8)
    with pytest.raises(ValueError, match="even"):
        L.factorized_reduce(6, 7)


@pytest.mark.parametrize("space,names", [("darts", DARTS_OPS), ("nb201", NB201_OPS)])
@pytest.mark.parametrize("stride", [1, 2])
def test_mixed_op_with_one_hot_weights_is_that_op(space, names, stride):
    mixed = MixedOp(candidate_ops(space, names, 6, stride))
    params, state = mixed.init(jax.random.PRNGKey(1))
    x = _x((2, 8, 8, 6), seed=2)
    for i, layer in enumerate(mixed.layers):
        alone, _ = layer.apply(params[i], state[i], x, CTX)
        y, _ = mixed.apply(params, state, x, jax.nn.one_hot(i, len(names)), dense_mix, CTX)
        np.testing.assert_allclose(np.asarray(y), np.asarray(alone), rtol=1e-6, atol=1e-6)
        # evaluating only candidate i (lax.switch) gives the same output and touches only its state
        # (inside the switch the branch path's formulations run, e.g. a separable convolution
        # as one dense convolution: float32 rounding differs, amplified by the BatchNorm's 1/σ)
        y1, st1 = Candidates(mixed.layers, params, state, CTX).one(jnp.int32(i), x)
        np.testing.assert_allclose(np.asarray(y1), np.asarray(alone), rtol=1e-5, atol=1e-5)
        for j in range(len(names)):
            if j != i:
                for a, b in zip(jax.tree_util.tree_leaves(st1[j]), jax.tree_util.tree_leaves(state[j])):
                    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_dense_mix_is_the_weighted_sum():
    mixed = MixedOp(candidate_ops("nb201", NB201_OPS, 4, 1))
    params, state = mixed.init(jax.random.PRNGKey(0))
    x = _x((2, 6, 6, 4))
    w = jax.nn.softmax(jnp.asarray([0.3, -1.0, 2.0, 0.5, 0.0]))
    y, _ = mixed.apply(params, state, x, w, dense_mix, CTX)
    outs = [l.apply(p, s, x, CTX)[0] for l, p, s in zip(mixed.layers, params, state)]
    np.testing.assert_allclose(np.asarray(y), np.asarray(sum(wi * o for wi, o in zip(w, outs))), rtol=1e-5, atol=1e-6)
    # and the derivative w.r.t. the weights is each op's output (linearity in the weights)
    g = jax.grad(lambda w: jnp.sum(mixed.apply(params, state, x, w, dense_mix, CTX)[0]))(w)
    np.testing.assert_allclose(np.asarray(g), [float(jnp.sum(o)) for o in outs], rtol=1e-4, atol=1e-4)


def test_unroll_resolves_per_backend():
    assert C.unroll_loops(True) is True and C.unroll_loops(False) is False
    assert C.unroll_loops(None) == (jax.default_backend() == "cpu")


def test_scan_unrolled_equals_lax_scan():
    xs = {"a": jnp.arange(12.0).reshape(4, 3), "b": jnp.ones((4, 2))}

    def body(c, x):
        c = c * 0.5 + jnp.sum(x["a"]) - x["b"][0]
        return c, {"y": c * x["a"]}

    c1, y1 = C.scan(body, jnp.float32(1.0), xs, unroll=False)
    c2, y2 = C.scan(body, jnp.float32(1.0), xs, unroll=True)
    np.testing.assert_allclose(float(c1), float(c2), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(y1["y"]), np.asarray(y2["y"]), rtol=1e-6)
