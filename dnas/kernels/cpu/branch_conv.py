"""A 2-D convolution whose backward pass is written as forward-style NHWC convolutions.

Why: on XLA:CPU, the convolutions that autodiff emits for a convolution's backward pass
(input gradient: a transposed convolution; weight gradient: a convolution with the batch and
feature dimensions swapped) run an order of magnitude slower when they sit inside a
conditional or a loop (``benchmarks/bench_scan_conv.py``; ``docs/benchmarks.md``). Expressed instead as ordinary NHWC/HWIO convolutions on
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


def conv2d(x: jax.Array, w: jax.Array, stride: int, padding: int, dilation: int,
           members: bool = False) -> jax.Array:
    """``lax.conv_general_dilated(x, w, stride, padding, rhs_dilation=dilation)``, NHWC/HWIO.

    ``members``: its convolutions (forward and backward) batch per member under ``vmap``
    (:func:`member_conv`); such a convolution is differentiable once only (the search's
    first-derivative estimators), not twice.

    Inside ``shard_map`` the (replicated) kernel is first marked as varying over the axes the
    (sharded) input varies over, so the custom backward pass returns a per-device weight
    gradient of the type it must; the transpose of that cast sums it over the devices, as
    autodiff of the plain convolution does."""
    return _conv2d(x, varying_like(w, x), stride, padding, dilation, bool(members))


def varying_like(w: jax.Array, x: jax.Array) -> jax.Array:
    """``w`` marked as varying over the ``shard_map`` axes that ``x`` varies over and ``w``
    does not (``lax.pcast``); ``w`` itself outside ``shard_map``. For a custom backward pass
    that returns a per-device gradient of a replicated parameter."""
    axes = tuple(sorted(set(_vma(x)) - set(_vma(w))))
    return lax.pcast(w, axes, to="varying") if axes else w


def _vma(a) -> frozenset:
    """The mesh axes ``a`` varies over inside ``shard_map`` (empty outside)."""
    t = jax.typeof(a)
    mat = getattr(t, "manual_axis_type", None)
    return frozenset(getattr(mat, "varying", None) or getattr(t, "vma", None) or ())


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv2d(x, w, stride, padding, dilation, members):
    return _forward(x, w, stride, padding, dilation, members)


def _forward(x, w, stride, padding, dilation, members=False):
    return _conv_op(members)(x, w, (stride, stride), ((padding, padding), (padding, padding)),
                             rhs_dilation=(dilation, dilation))


def _lax_conv(lhs, rhs, strides, padding, lhs_dilation=(1, 1), rhs_dilation=(1, 1)):
    return lax.conv_general_dilated(lhs, rhs, strides, padding, lhs_dilation=lhs_dilation,
                                    rhs_dilation=rhs_dilation, dimension_numbers=_DN)


def _conv_op(members: bool):
    return member_conv if members else _lax_conv


def member_conv(lhs, rhs, strides, padding, lhs_dilation=(1, 1), rhs_dilation=(1, 1)):
    """``lax.conv_general_dilated`` (NHWC/HWIO) with a batching rule for independent models.

    Under ``jax.vmap`` over members that each have their own kernel (``dnas search --seeds``),
    JAX's own rule turns the convolution into one grouped convolution, which XLA:CPU runs
    several times slower than the members' convolutions one after another (see
    ``benchmarks/bench_seeds.py``; ``docs/benchmarks.md``). This rule instead emits one ordinary convolution per member
    (unrolled), folds the member axis into the batch when only the input is batched, and into
    the output features when only the kernel is. Same values; used only where the caller asks
    for it (``conv2d(..., members=True)``), so GPU/TPU keep JAX's rule. Not differentiable
    (``jax.custom_batching.custom_vmap``): :func:`conv2d` supplies the derivative.
    """
    conv = partial(_lax_conv, strides=strides, padding=padding, lhs_dilation=lhs_dilation,
                   rhs_dilation=rhs_dilation)

    @jax.custom_batching.custom_vmap
    def f(a, b):
        return conv(a, b)

    @f.def_vmap
    def _rule(axis_size, in_batched, a, b):
        a_b, b_b = in_batched
        if a_b and not b_b:   # members = more examples
            y = f(a.reshape((-1,) + a.shape[2:]), b)
            return y.reshape((axis_size, -1) + y.shape[1:]), True
        if b_b and not a_b:   # members = more output features
            kh, kw, ci, co = b.shape[1:]
            y = f(a, jnp.moveaxis(b, 0, 3).reshape(kh, kw, ci, axis_size * co))
            return jnp.moveaxis(y.reshape(y.shape[:3] + (axis_size, co)), 3, 0), True
        return jnp.stack([f(a[i], b[i]) for i in range(axis_size)]), True

    return f(lhs, rhs)


def _fwd(x, w, stride, padding, dilation, members):
    return _forward(x, w, stride, padding, dilation, members), (x, w)


def _bwd(stride, padding, dilation, members, res, g):
    x, w = res
    conv = _conv_op(members)
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
    gx = conv(g, w_t, (1, 1), (pad_h, pad_w), lhs_dilation=(stride, stride),
                     rhs_dilation=(dilation, dilation))
    # weight gradient: dW[a,b,i,o] = sum_{n,p,q} xpad[n, p*s + a*d, q*s + b*d, i] * g[n,p,q,o],
    # a convolution over (p, q) of x^T (batch = in-channels, features = examples) with g^T
    # (kernel = output positions, in = examples, out = out-channels), kernel dilated by the
    # stride and strided by the dilation
    # (the padding goes into the convolution, not a jnp.pad before it: XLA:CPU runs this
    # convolution through YNNPACK only then, several times faster, inside a lax.switch
    # branch as well as outside; docs/benchmarks.md)
    lhs = x.transpose(3, 1, 2, 0)                       # (C_in, H, W, N)
    rhs = g.transpose(1, 2, 0, 3)                       # (Ho, Wo, N, C_out)
    gw = conv(lhs, rhs, (dilation, dilation), ((padding, padding), (padding, padding)),
                     rhs_dilation=(stride, stride))  # (C_in, >=kh, >=kw, C_out)
    gw = gw[:, :kh, :kw, :].transpose(1, 2, 0, 3)
    return gx.astype(x.dtype), gw.astype(w.dtype)


_conv2d.defvjp(_fwd, _bwd)
