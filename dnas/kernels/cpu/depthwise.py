"""A depthwise convolution written as a weighted sum of shifted views, for XLA:CPU.

XLA:CPU's grouped convolution is slow for depthwise kernels
(``benchmarks/bench_separable_conv.py``). A depthwise convolution is ``k*k`` multiply-adds per
output element:

    y[n, h, w, c] = sum_{i, j} x_pad[n, s*h + d*i, s*w + d*j, c] * w[i, j, c]

(stride ``s``, dilation ``d``, ``x_pad`` zero-padded), which XLA fuses into one elementwise
loop over the ``k*k`` strided views of the padded input. Its input gradient is the same kind
of sum (the transpose of a slice is a pad). With the pointwise convolution after it, the
forward pass, the input gradient and all gradients together are faster than one dense
convolution with the fused kernel (``docs/benchmarks.md``, "Figures behind the CPU kernels'
design").

The kernel gradient is the exception: autodiff writes it as ``k*k`` reductions over
``(n, h, w)`` of products of sliced views, and XLA:CPU materialises every slice before
reducing, which makes it slow. So :func:`depthwise_conv` has a custom JVP
whose kernel-tangent term is the same linear map written as a dense convolution with the
diagonal kernel ``K[i, j, c, o] = t[i, j, c] * [c == o]``; reverse mode transposes it into
one dense weight-gradient convolution followed by taking the diagonal, several times faster.
The JVP is exact, so forward mode, reverse mode and their compositions (the Hessian-vector
products of the hypergradients) all hold; tested against ``lax.conv_general_dilated`` with
``feature_group_count`` in ``tests/test_ops.py``.

Inside ``lax.switch`` (a sampled op) that dense kernel gradient, like any convolution
autodiff emits there, hits XLA:CPU's control-flow penalty, so the branch path has
:func:`branch_depthwise_conv`: a custom VJP whose backward pass is shifted views and a loop
of per-tap reductions, no convolution at all.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

from dnas.kernels.cpu.branch_conv import _out_size, varying_like
from dnas.kernels.cpu.pin import pinned

_DN = ("NHWC", "HWIO", "NHWC")


def _shifted_views(x, w, stride, padding, dilation):
    """``sum_{i,j} view_{i,j}(pad(x)) * w[i, j]`` (the primal and the input-tangent map)."""
    k = w.shape[0]
    _, h, wd, _ = x.shape
    ho = _out_size(h, k, stride, padding, dilation)
    wo = _out_size(wd, k, stride, padding, dilation)
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    return _views_of_padded(xp, w, stride, dilation, ho, wo)


def _views_of_padded(xp, w, stride, dilation, ho, wo):
    """``sum_{i,j} xp[:, d*i + s*h, d*j + s*w] * w[i, j]`` over the ``ho x wo`` output grid."""
    k = w.shape[0]
    n, c = xp.shape[0], xp.shape[-1]
    out = None
    for i in range(k):
        for j in range(k):
            start = (0, i * dilation, j * dilation, 0)
            limit = (n, start[1] + stride * (ho - 1) + 1, start[2] + stride * (wo - 1) + 1, c)
            term = lax.slice(xp, start, limit, (1, stride, stride, 1)) * w[i, j].astype(xp.dtype)
            out = term if out is None else out + term
    return out


def _diagonal_conv(x, w, stride, padding, dilation):
    """The same map as :func:`_shifted_views`, as a dense convolution with a diagonal kernel
    (used for the kernel tangent, whose transpose is then a dense weight-gradient convolution)."""
    c = x.shape[-1]
    kernel = w[:, :, :, None] * jnp.eye(c, dtype=w.dtype)
    return lax.conv_general_dilated(x, kernel.astype(x.dtype), (stride, stride),
                                   ((padding, padding), (padding, padding)),
                                   rhs_dilation=(dilation, dilation), dimension_numbers=_DN)


@partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))
def depthwise_conv(x: jax.Array, w: jax.Array, stride: int = 1, padding: int = 0,
                   dilation: int = 1) -> jax.Array:
    """Depthwise convolution of NHWC ``x`` with the ``[k, k, C]`` kernel ``w`` (one filter per
    channel, channel multiplier 1): ``lax.conv_general_dilated(x, w[:, :, None, :], ...,
    feature_group_count=C)``, computed as shifted views (see the module docstring)."""
    return _shifted_views(x, w, stride, padding, dilation)


def _depthwise_jvp(stride, padding, dilation, primals, tangents):
    x, w = primals
    tx, tw = tangents
    y = _shifted_views(x, w, stride, padding, dilation)
    terms = []
    if not isinstance(tx, SymbolicZero):
        # pinned: in the backward pass each op's input gradient (the sum of its k*k padded
        # views of the cotangent) is then one fusion, stored once. Without it XLA:CPU merged
        # the padded views of every op into the node's cotangent sum, gave up fusing at that
        # size and stored each padded view (290-operand fusions; the step took twice as long as
        # with the dense kernel, docs/benchmarks.md). lax.optimization_barrier does not help:
        # XLA:CPU removes it before fusing
        terms.append(_shifted_views(pinned(tx), w, stride, padding, dilation))
    if not isinstance(tw, SymbolicZero):
        terms.append(_diagonal_conv(x, tw, stride, padding, dilation))
    return y, sum(terms[1:], terms[0]) if terms else jnp.zeros_like(y)


depthwise_conv.defjvp(_depthwise_jvp, symbolic_zeros=True)


def branch_depthwise_conv(x: jax.Array, w: jax.Array, stride: int = 1, padding: int = 0,
                          dilation: int = 1) -> jax.Array:
    """:func:`depthwise_conv` for the branch path (inside ``lax.switch`` and loops on XLA:CPU).

    A ``custom_vjp`` whose backward pass has no convolution: the input gradient is shifted
    views of the stride-dilated cotangent (:func:`_views_input_grad`), and the kernel
    gradient is computed one tap at a time, ``gw[i, j] = sum_{n,h,w} view_ij(pad(x)) * g``,
    in a loop over the ``k*k`` taps, so that one strided view is alive at a time (written
    out, XLA:CPU materialised all ``k*k`` views of the padded input at once). Autodiff's
    grouped convolutions are XLA:CPU's slow path and slower still inside a conditional; the
    dense diagonal kernel of :func:`depthwise_conv`'s JVP is a convolution too. Reverse mode
    only (twice as well: the backward pass is made of differentiable ops), like
    :func:`dnas.kernels.cpu.branch_conv.conv2d`; inside ``shard_map`` the replicated kernel is
    marked varying as there.
    """
    return _branch_dw(x, varying_like(w, x), stride, padding, dilation)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _branch_dw(x, w, stride, padding, dilation):
    return _shifted_views(x, w, stride, padding, dilation)


def _branch_dw_fwd(x, w, stride, padding, dilation):
    return _shifted_views(x, w, stride, padding, dilation), (x, w)


def _tapwise_kernel_grad(x, g, k, stride, padding, dilation):
    """``gw[i, j, c] = sum_{n,h,w} pad(x)[n, s*h + d*i, s*w + d*j, c] * g[n, h, w, c]``, one
    tap per loop iteration (a dynamic window of the padded input, then a static stride)."""
    n, ho, wo, c = g.shape
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    span_h, span_w = stride * (ho - 1) + 1, stride * (wo - 1) + 1

    def tap(t, gw):
        i, j = t // k, t % k
        window = lax.dynamic_slice(xp, (0, i * dilation, j * dilation, 0), (n, span_h, span_w, c))
        view = window[:, ::stride, ::stride, :] if stride > 1 else window
        return gw.at[t].set(jnp.sum(view * g, axis=(0, 1, 2)))

    # inside shard_map the loop's carry varies over the devices as its input and cotangent do
    gw = lax.fori_loop(0, k * k, tap, varying_like(varying_like(jnp.zeros((k * k, c), g.dtype), x), g))
    return gw.reshape(k, k, c)


def _views_input_grad(g, w, x_shape, stride, padding, dilation):
    """The input gradient of :func:`_shifted_views` as shifted views itself: the cotangent,
    dilated by the stride (interior zeros) and padded so that output pixel ``h`` reads
    ``g_dil[h + p - d*i]``, correlated with the flipped kernel at stride 1. The transpose
    autodiff writes (``k*k`` pads summed) stayed unfused inside a conditional, each pad
    stored: this form makes the chain's ProxylessNAS step faster and its temporaries smaller
    (``docs/benchmarks.md``)."""
    k = w.shape[0]
    _, h, wd, _ = x_shape
    _, ho, wo, _ = g.shape
    low = dilation * (k - 1) - padding
    config = ((0, 0, 0),
              (low, h + padding - (stride * (ho - 1) + 1), stride - 1),
              (low, wd + padding - (stride * (wo - 1) + 1), stride - 1),
              (0, 0, 0))
    gp = lax.pad(g, jnp.zeros((), g.dtype), config)
    return _views_of_padded(gp, w[::-1, ::-1], 1, dilation, h, wd)


def _branch_dw_bwd(stride, padding, dilation, res, g):
    x, w = res
    gx = _views_input_grad(g, w, x.shape, stride, padding, dilation)
    gw = _tapwise_kernel_grad(x, g, w.shape[0], stride, padding, dilation)
    return gx, gw.astype(w.dtype)


_branch_dw.defvjp(_branch_dw_fwd, _branch_dw_bwd)
