"""A 2-D convolution whose backward pass is written as forward-style NHWC convolutions.

Why: on XLA:CPU, the convolutions that autodiff emits for a convolution's backward pass
(input gradient: a transposed convolution; weight gradient: a convolution with the batch and
feature dimensions swapped) run 10-40x slower when they sit inside a conditional or a loop
(``benchmarks/bench_scan_conv.py``). Expressed instead as ordinary NHWC/HWIO convolutions on
explicitly transposed operands, the same gradients run at full speed there. GDAS evaluates
only the sampled op of an edge through ``lax.switch``, so its ops use this convolution.

The gradients are exact (tested against ``lax.conv_general_dilated``'s). Reverse-over-reverse
differentiation works (the backward rule is made of differentiable ops); forward-mode (jvp)
does not, as for any ``jax.custom_vjp`` function, so the default (non-branch) path keeps
the plain ``lax`` convolution.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

_DN = ("NHWC", "HWIO", "NHWC")


def _out_size(n: int, k: int, stride: int, pad: int, dilation: int) -> int:
    return (n + 2 * pad - dilation * (k - 1) - 1) // stride + 1


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv2d(x: jax.Array, w: jax.Array, stride: int, padding: int, dilation: int) -> jax.Array:
    """``lax.conv_general_dilated(x, w, stride, padding, rhs_dilation=dilation)``, NHWC/HWIO."""
    return _forward(x, w, stride, padding, dilation)


def _forward(x, w, stride, padding, dilation):
    return lax.conv_general_dilated(x, w, (stride, stride), ((padding, padding), (padding, padding)),
                                    rhs_dilation=(dilation, dilation), dimension_numbers=_DN)


def _fwd(x, w, stride, padding, dilation):
    return _forward(x, w, stride, padding, dilation), (x, w)


def _bwd(stride, padding, dilation, res, g):
    x, w = res
    n, h, wd, c_in = x.shape
    kh, kw, _, c_out = w.shape
    ho, wo = g.shape[1], g.shape[2]
    # input gradient: the transposed convolution = a stride-1 convolution of the
    # (stride-dilated) output gradient with the flipped, in/out-swapped kernel
    w_t = jnp.flip(w, (0, 1)).swapaxes(2, 3)
    eff_h, eff_w = dilation * (kh - 1), dilation * (kw - 1)
    used_h, used_w = (ho - 1) * stride + 1, (wo - 1) * stride + 1
    pad_h = (eff_h - padding, h + padding - used_h)   # rows of x beyond the last window
    pad_w = (eff_w - padding, wd + padding - used_w)
    gx = lax.conv_general_dilated(g, w_t, (1, 1), (pad_h, pad_w), lhs_dilation=(stride, stride),
                                  rhs_dilation=(dilation, dilation), dimension_numbers=_DN)
    # weight gradient: dW[a,b,i,o] = sum_{n,p,q} xpad[n, p*s + a*d, q*s + b*d, i] * g[n,p,q,o],
    # a convolution over (p, q) of x^T (batch = in-channels, features = examples) with g^T
    # (kernel = output positions, in = examples, out = out-channels), kernel dilated by the
    # stride and strided by the dilation
    # (the padding goes into the convolution, not a jnp.pad before it: XLA:CPU runs this
    # convolution through YNNPACK only then, 5 ms instead of 25 ms for a 3x3 conv at
    # B=64, 32x32, C=16, inside a lax.switch branch as well as outside)
    lhs = x.transpose(3, 1, 2, 0)                       # (C_in, H, W, N)
    rhs = g.transpose(1, 2, 0, 3)                       # (Ho, Wo, N, C_out)
    gw = lax.conv_general_dilated(lhs, rhs, (dilation, dilation), ((padding, padding), (padding, padding)),
                                  rhs_dilation=(stride, stride),
                                  dimension_numbers=_DN)  # (C_in, >=kh, >=kw, C_out)
    gw = gw[:, :kh, :kw, :].transpose(1, 2, 0, 3)
    return gx.astype(x.dtype), gw.astype(w.dtype)


conv2d.defvjp(_fwd, _bwd)
