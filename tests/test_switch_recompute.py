"""A sampled op differentiated by its own backward pass (``mixed.switch_sampled``): the same
values and gradients as autodiff of ``lax.switch``, the memory of the sampled path only, and
no second forward pass of a convolution that ends in an affine-free BatchNorm."""
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dnas.backend import XLA_CPU
from dnas.bench import compiled_costs
from dnas.supernet.chain import KEEP_OPS, chain_op
from dnas.supernet.context import Ctx
from dnas.supernet.nnx_space import module_layer
from dnas.supernet.mixed import Candidates, MixedOp
from dnas.supernet.ops import candidate_ops
from dnas.supernet.genotype import DARTS_OPS, NB201_OPS


def _edge_loss(mixed, recompute, pin_bn_output=True):
    kernels = dataclasses.replace(XLA_CPU, recompute_sampled=recompute, pin_bn_output=pin_bn_output)

    def loss(params, state, x, index):
        y, new_state = Candidates(mixed.layers, params, state, Ctx(train=True, kernels=kernels)).one(index, x)
        return jnp.sum(jnp.sin(y) * y), new_state
    return loss


@pytest.mark.parametrize("space", ["nb201", "chain", "darts"])
def test_recomputed_switch_equals_autodiff_of_switch(space):
    """In float64, so that equal means equal to rounding (1e-10), not to float32's sum order."""
    if space in ("nb201", "darts"):
        ops = {"nb201": NB201_OPS, "darts": DARTS_OPS}[space]
        mixed = MixedOp(candidate_ops(space, ops, 4, 1))
        x_shape = (4, 6, 6, 4)
    else:
        mixed = MixedOp([module_layer(lambda rngs, o=o: chain_op(o, 8, 8, 1, rngs)) for o in KEEP_OPS])
        x_shape = (2, 6, 6, 8)
    with jax.enable_x64(True):
        f64 = lambda t: jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), t)
        params, state = f64(mixed.init(jax.random.PRNGKey(0)))
        x = jnp.asarray(np.random.default_rng(1).standard_normal(x_shape), jnp.float64)
        f1 = jax.jit(jax.value_and_grad(_edge_loss(mixed, True), (0, 2), has_aux=True))
        f0 = jax.jit(jax.value_and_grad(_edge_loss(mixed, False), (0, 2), has_aux=True))
        for index in range(len(mixed.layers)):
            i = jnp.int32(index)
            (l1, s1), g1 = f1(params, state, x, i)
            (l0, s0), g0 = f0(params, state, x, i)
            np.testing.assert_allclose(l1, l0, rtol=1e-12)
            for a, b in zip(jax.tree_util.tree_leaves((s1, g1)), jax.tree_util.tree_leaves((s0, g0))):
                assert a.dtype == jnp.float64
                np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)
            if index == 0 and space == "nb201":  # "none": no gradient reaches x
                assert float(jnp.abs(g1[1]).max()) == 0.0


def test_recomputed_switch_keeps_one_path_of_memory():
    """Chain candidates differ in shape (expansion 3 vs 6, kernel 3/5/7), so autodiff of the
    switch keeps the residuals of all of them; recomputing keeps only the branch inputs."""
    mixed = MixedOp([module_layer(lambda rngs, o=o: chain_op(o, 16, 16, 1, rngs)) for o in KEEP_OPS])
    params, state = mixed.init(jax.random.PRNGKey(0))
    x = jnp.zeros((16, 16, 16, 16))

    def temp(recompute):
        f = jax.jit(jax.grad(lambda p, x, i: _edge_loss(mixed, recompute)(p, state, x, i)[0], (0, 1)))
        return compiled_costs(f.lower(params, x, jnp.int32(0)).compile())["temp_bytes"]
    plain, recomputed = temp(False), temp(True)
    print(f"temp memory: plain switch {plain} B, recomputed {recomputed} B")
    assert recomputed < 0.6 * plain, (recomputed, plain)


def _conv_and_dot_count(hlo: str) -> int:
    return len(re.findall(r"= \S+ (?:convolution|dot)\(", hlo))


def test_backward_starts_from_the_saved_output():
    """ReLU-conv-BN (affine-free) candidates: the gradient of the sampled op runs, per
    convolution, the forward, the input gradient and the weight gradient, and no second
    forward (the backward pass starts from the op's output ``x̂`` and the BN's ``rstd``).
    The same count as differentiating the two conv ops unconditionally. (BatchNorm's output
    unpinned here: on the CPU its pin is a dot too, which the count would include.)"""
    unpinned = dataclasses.replace(XLA_CPU, pin_bn_output=False)
    mixed = MixedOp(candidate_ops("nb201", NB201_OPS, 4, 1))
    params, state = mixed.init(jax.random.PRNGKey(0))
    x = jnp.ones((4, 6, 6, 4))
    loss = lambda p, x, i: _edge_loss(mixed, True, pin_bn_output=False)(p, state, x, i)[0]
    hlo = jax.jit(jax.grad(loss, (0, 1))).lower(params, x, jnp.int32(3)).compile().as_text()

    def dense(p, x):  # every candidate, no conditional
        return sum(jnp.sum(jnp.sin(y) * y)
                   for y in Candidates(mixed.layers, p, state, Ctx(train=True, kernels=unpinned)).all(x)[0])
    dense_hlo = jax.jit(jax.grad(dense, (0, 1))).lower(params, x).compile().as_text()
    conv_ops = sum(n.startswith("nor_conv") for n in NB201_OPS)
    assert _conv_and_dot_count(dense_hlo) == 3 * conv_ops
    assert _conv_and_dot_count(hlo) == 3 * conv_ops


@pytest.mark.parametrize("space", ["nb201", "darts"])
def test_sampled_op_differentiates_twice_without_custom_backward_passes(space):
    """Second-order estimators differentiate the sampled op forward-over-reverse (Hessian-vector
    products); a custom VJP has no forward mode. With ``Ctx.custom_vjp`` cleared (what the
    searcher does for those estimators) the sampled op runs JAX's own switch and convolutions:
    the Hessian-vector product exists and equals finite differences of the gradient (float64)."""
    ops = {"nb201": NB201_OPS, "darts": DARTS_OPS}[space]
    mixed = MixedOp(candidate_ops(space, ops, 4, 1))
    with jax.enable_x64(True):
        f64 = lambda t: jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), t)  # noqa: E731
        params, state = f64(mixed.init(jax.random.PRNGKey(0)))
        x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 6, 6, 4)), jnp.float64)
        _check_second_order(mixed, ops, space, params, state, x)


def _check_second_order(mixed, ops, space, params, state, x):
    conv = ops.index("nor_conv_3x3" if space == "nb201" else "sep_conv_3x3")

    def grad_fn(custom_vjp):
        def loss(p):
            ctx = Ctx(train=True, kernels=XLA_CPU, custom_vjp=custom_vjp)
            y, _ = Candidates(mixed.layers, p, state, ctx).one(jnp.int32(conv), x)
            return jnp.sum(jnp.sin(y) * y)
        return jax.grad(loss)

    v = jax.tree_util.tree_map(lambda a: jnp.ones_like(a) * 0.01, params)
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(grad_fn(True), (params,), (v,))
    _, hvp = jax.jit(lambda p: jax.jvp(grad_fn(False), (p,), (v,)))(params)
    eps = 1e-4
    shift = lambda s: jax.tree_util.tree_map(lambda a, b: a + s * b, params, v)  # noqa: E731
    fd = jax.tree_util.tree_map(lambda a, b: (a - b) / (2 * eps), grad_fn(False)(shift(eps)),
                                grad_fn(False)(shift(-eps)))
    leaves = [(a, b) for a, b in zip(jax.tree_util.tree_leaves(hvp), jax.tree_util.tree_leaves(fd))]
    assert max(float(jnp.abs(a).max()) for a, _ in leaves) > 1e-4   # the conv's own weights have curvature
    for a, b in leaves:
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
    # the same first derivative as the custom backward passes
    custom, plain = grad_fn(True)(params), grad_fn(False)(params)
    for a, b in zip(jax.tree_util.tree_leaves(custom), jax.tree_util.tree_leaves(plain)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)
