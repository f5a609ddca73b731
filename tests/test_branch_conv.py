"""The branch convolution: same values and gradients as lax's, usable inside lax.switch."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from dnas.supernet.branch_conv import conv2d


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
