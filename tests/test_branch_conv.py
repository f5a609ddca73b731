"""The branch convolution: same values and gradients as lax's, usable inside lax.switch."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from dnas.backend import XLA_CPU
from dnas.kernels.cpu.branch_conv import conv2d


def _lax_conv(x, w, s, p, d):
    return lax.conv_general_dilated(x, w, (s, s), ((p, p), (p, p)), rhs_dilation=(d, d),
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("hw", [8, 9])
@pytest.mark.parametrize("k,s,d,p", [(1, 1, 1, 0), (1, 2, 1, 0), (3, 1, 1, 1), (3, 2, 1, 1), (5, 1, 1, 2),
                                     (5, 2, 1, 2), (3, 1, 2, 2), (3, 2, 2, 2), (5, 1, 2, 4), (5, 2, 2, 4)])
def test_values_and_gradients_match_lax(hw, k, s, d, p):
    rng = np.random.default_rng(k * 100 + s * 10 + d + hw)
    x = jnp.asarray(rng.standard_normal((2, hw, hw, 3)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, k, 3, 5)), jnp.float32)
    y_ref, vjp_ref = jax.vjp(lambda x, w: _lax_conv(x, w, s, p, d), x, w)
    y, vjp = jax.vjp(lambda x, w: conv2d(x, w, s, p, d), x, w)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-5, atol=1e-5)
    g = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    for a, b in zip(vjp(g), vjp_ref(g)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def test_second_order_reverse_over_reverse_matches_lax():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 7, 7, 3)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 3, 4)), jnp.float32)
    v = jnp.asarray(rng.standard_normal(w.shape), jnp.float32)

    def hvp(conv):
        f = lambda w: jnp.sum(jnp.tanh(conv(x, w, 2, 1, 1)))  # noqa: E731
        return jax.grad(lambda w: jnp.vdot(jax.grad(f)(w), v))(w)

    np.testing.assert_allclose(np.asarray(hvp(conv2d)), np.asarray(hvp(_lax_conv)), rtol=1e-4, atol=1e-4)


def test_inside_switch_gradient_equals_lax():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 3)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 3, 3)), jnp.float32)

    def f(w, conv, i):
        return jnp.sum(lax.switch(i, [lambda x: conv(x, w, 1, 1, 1), lambda x: x * 2.0], x) ** 2)

    for i in (0, 1):
        np.testing.assert_allclose(np.asarray(jax.grad(f)(w, conv2d, jnp.int32(i))),
                                   np.asarray(jax.grad(f)(w, _lax_conv, jnp.int32(i))), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------- memory-lean layer forms
# (the other formulations that keep the supernet's activation memory down; same values and
# gradients as the plain formulas they replace)

def _bn_reference(x, scale, bias, axis_name=None, eps=1e-5):
    mean = jnp.mean(x, axis=(0, 1, 2))
    mean_sq = jnp.mean(jnp.square(x), axis=(0, 1, 2))
    if axis_name is not None:
        mean, mean_sq = lax.pmean((mean, mean_sq), axis_name)
    var = jnp.maximum(mean_sq - jnp.square(mean), 0.0)
    return ((x - mean) * lax.rsqrt(var + eps)) * scale + bias


@pytest.mark.parametrize("axis_name,c", [(None, 5), ("d", 5), (None, 8), ("d", 8)])
def test_batchnorm_output_form_derivative_matches_autodiff(axis_name, c):
    """``K.batch_normalize`` (custom_jvp written in terms of the output; on the CPU its
    output pinned, in blocks of 4 channels where they divide ``c``): values, gradients,
    forward-over-reverse (Hessian-vector products) and reverse-over-reverse equal autodiff
    through the formula, also with synchronised statistics (``axis_name``)."""
    from dnas.supernet import layers as L
    from dnas.supernet import context as C
    bn = L.batchnorm(c, True)
    _, s = bn.init(None)
    k = jax.random.split(jax.random.PRNGKey(0), 5)
    x = jax.random.normal(k[0], (2, 4, 3, 3, c)) * 2 + 1
    p = {"scale": jax.random.normal(k[1], (c,)), "bias": jax.random.normal(k[2], (c,))}
    h = jax.random.normal(k[3], x.shape)
    v = jax.random.normal(k[4], x.shape)

    def over_devices(f):  # two "devices" by vmap with a named axis, or one device
        if axis_name is None:
            return lambda x, p: f(x[0], p, h[0])
        return lambda x, p: jnp.sum(jax.vmap(lambda xi, hi: f(xi, p, hi), axis_name=axis_name)(x, h))

    ours = over_devices(lambda x, p, h: jnp.sum(jnp.sin(bn.apply(p, s, x, C.Ctx(axis_name=axis_name))[0]) * h))
    ref = over_devices(lambda x, p, h: jnp.sum(jnp.sin(_bn_reference(x, p["scale"], p["bias"], axis_name)) * h))
    np.testing.assert_allclose(float(ours(x, p)), float(ref(x, p)), rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(jax.grad(ours, (0, 1))(x, p)),
                    jax.tree_util.tree_leaves(jax.grad(ref, (0, 1))(x, p))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    hvp = lambda f: jax.jvp(lambda x: jax.grad(f)(x, p), (x,), (v,))[1]  # noqa: E731
    np.testing.assert_allclose(np.asarray(hvp(ours)), np.asarray(hvp(ref)), rtol=1e-4, atol=1e-4)
    rr = lambda f: jax.grad(lambda x: jnp.sum(jax.grad(f)(x, p) ** 2))(x)  # noqa: E731
    np.testing.assert_allclose(np.asarray(rr(ours)), np.asarray(rr(ref)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("group", [None, 4, 3])
def test_pinned_is_the_identity_with_itself_as_transpose(group):
    """``pin.pinned`` (whole or in channel blocks; 3 does not divide 8: whole) returns its
    input exactly, and its gradient is the cotangent unchanged."""
    from dnas.kernels.cpu.pin import pinned
    t = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 3, 8))
    g = jax.random.normal(jax.random.PRNGKey(1), t.shape)
    np.testing.assert_array_equal(np.asarray(pinned(t, group)), np.asarray(t))
    np.testing.assert_array_equal(np.asarray(jax.vjp(lambda a: pinned(a, group), t)[1](g)[0]), np.asarray(g))


def test_pinned_batchnorm_output_cuts_xla_memory():
    """BatchNorm's output stored once (the kernel policy's ``pin_bn_output``) lowers XLA's temporary memory
    of the gradient through two NAS-Bench-201 mixed ops (XLA:CPU otherwise keeps each
    convolution's output as well as the normalised one), with the same loss and gradients.
    (The NB201 search step at C=16, N=5: 1.26 → 0.81 GB, ``docs/benchmarks.md``.)"""
    from dnas.relaxations import get_relaxation
    from dnas.supernet import context as C
    from dnas.supernet.genotype import NB201_OPS
    from dnas.supernet.mixed import MixedOp
    from dnas.supernet.ops import candidate_ops
    mixed = MixedOp(candidate_ops("nb201", NB201_OPS, 8, 1))
    params, state = mixed.init(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (16, 16, 16, 8))
    w = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(2), (len(NB201_OPS),)))
    mix = get_relaxation("darts").mix

    temp, results = {}, {}
    for pin in (False, True):
        ctx = C.Ctx(train=True, kernels=dataclasses.replace(XLA_CPU, pin_bn_output=pin))

        def loss(p, w, x):
            y = mixed.apply(p, state, x, w, mix, ctx)[0]
            return jnp.sum(jnp.sin(mixed.apply(p, state, jax.nn.relu(y), w, mix, ctx)[0]))
        compiled = jax.jit(jax.value_and_grad(loss, (0, 1))).lower(params, w, x).compile()
        temp[pin] = compiled.memory_analysis().temp_size_in_bytes
        results[pin] = jax.tree_util.tree_leaves(compiled(params, w, x))
    assert temp[True] < 0.9 * temp[False], temp
    for a, b in zip(results[True], results[False]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_unrolled_edges_equal_the_scanned_buffer_form():
    """The unrolled edge loop (nodes as separate arrays, each materialised once) computes what
    the ``lax.scan`` over a stacked node buffer computes: outputs, states and gradients."""
    from dnas.relaxations import get_relaxation
    from dnas.supernet import context as C
    from dnas.supernet.genotype import NB201_EDGES, NB201_OPS
    from dnas.supernet.mixed import MixedOp, scan_edges
    from dnas.supernet.ops import candidate_ops
    mixed = MixedOp(candidate_ops("nb201", NB201_OPS, 4, 1))
    params, state = mixed.init_stacked(jax.random.PRNGKey(0), len(NB201_EDGES))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 6, 6, 4))
    w = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(2), (len(NB201_EDGES), len(NB201_OPS))), -1)
    src, dst = [s for s, _ in NB201_EDGES], [d for _, d in NB201_EDGES]
    mix = get_relaxation("darts").mix

    def cell(params, w, x, unroll):
        buf = jnp.zeros((4,) + x.shape).at[0].set(x)
        buf, st = scan_edges(mixed, params, state, w, src, dst, buf, mix, C.Ctx(), unroll=unroll)
        return buf, st

    (b1, s1), (b2, s2) = cell(params, w, x, True), cell(params, w, x, False)
    np.testing.assert_allclose(np.asarray(b1), np.asarray(b2), rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(s1), jax.tree_util.tree_leaves(s2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    loss = lambda u: lambda p, w, x: jnp.sum(jnp.sin(cell(p, w, x, u)[0][3]))  # noqa: E731
    for a, b in zip(jax.tree_util.tree_leaves(jax.grad(loss(True), (0, 1, 2))(params, w, x)),
                    jax.tree_util.tree_leaves(jax.grad(loss(False), (0, 1, 2))(params, w, x))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_pointwise_conv_as_dot_matches_lax():
    """On CPU a 1x1 stride-1 convolution runs as a matrix product (``K.conv``): same values and
    gradients as the native convolution."""
    from dnas.kernels.dispatch import conv as _conv
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((3, 5, 6, 4)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((1, 1, 4, 7)), jnp.float32)
    if jax.default_backend() == "cpu":
        assert "dot_general" in str(jax.make_jaxpr(lambda x, w: _conv(x, w, 1, 0, 1))(x, w))
    y_ref, vjp_ref = jax.vjp(lambda x, w: _lax_conv(x, w, 1, 0, 1), x, w)
    y, vjp = jax.vjp(lambda x, w: _conv(x, w, 1, 0, 1), x, w)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-5, atol=1e-5)
    g = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    for a, b in zip(vjp(g), vjp_ref(g)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the dot form is the CPU path")
def test_pointwise_conv_weight_gradient_reads_cotangent_in_place():
    """The 1x1 convolution's weight gradient is one dot contracting the pixels of the input and
    of the output cotangent as they lie in memory. (A dot over the 4-D arrays had XLA:CPU copy
    the cotangent transposed, as ``[c_out, pixels]``, first: 2x slower backward pass.)"""
    import re
    from dnas.kernels.dispatch import conv as _conv
    x = jnp.ones((8, 16, 16, 16), jnp.float32)
    w = jnp.ones((1, 1, 16, 24), jnp.float32)
    g = jnp.ones((8, 16, 16, 24), jnp.float32)

    def backward(x, w, g):
        return jax.vjp(lambda x, w: _conv(jax.nn.relu(x), w, 1, 0, 1), x, w)[1](g * g)

    hlo = jax.jit(backward).lower(x, w, g).compile().as_text()
    weight_dots = [line for line in hlo.splitlines() if re.search(r"= f32\[16,24\]\{[0-9,]*\} dot\(", line)]
    assert len(weight_dots) == 1, weight_dots
    assert "lhs_contracting_dims={0}, rhs_contracting_dims={0}" in weight_dots[0], weight_dots[0]
    assert not re.search(r"= f32\[24,2048\]", hlo), "the cotangent was copied transposed"
