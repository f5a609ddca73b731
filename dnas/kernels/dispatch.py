"""The convolution and BatchNorm every network runs, in the formulation its kernel policy picks.

:func:`conv_impl` is the one place where a convolution chooses between XLA's native
``conv_general_dilated`` (what GPUs and TPUs run) and XLA:CPU's formulations in
:mod:`dnas.kernels.cpu` (1x1 convolutions as matrix products, depthwise ones as shifted views,
convolutions with a backward pass that stays fast inside control flow), by the
:class:`dnas.backend.KernelPolicy` passed down in :class:`dnas.supernet.context.Ctx`.
:func:`batch_normalize` is BatchNorm's normalisation with a derivative written in terms of its
output (fewer stored activations on every backend), its output pinned under XLA:CPU's policy.
Both the NNX kernels (:mod:`dnas.supernet.nnx_kernels`) and the layer kit
(:mod:`dnas.supernet.layers`) call these.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from dnas.backend import resolve
from dnas.kernels.cpu.branch_conv import conv2d as branch_conv2d
from dnas.kernels.cpu.depthwise import branch_depthwise_conv, depthwise_conv
from dnas.kernels.cpu.pin import pinned


def conv(x, w, stride, padding, dilation, groups=1, branch=False, members=False, dtype=None, kernels=None):
    """A convolution, NHWC input, HWIO kernel.

    ``dtype`` (``Ctx.compute_dtype``): mixed precision, as in Micikevicius et al. 2018, "Mixed
    Precision Training": input and kernel are cast to ``dtype`` (bfloat16: float32's exponent
    range, so no loss scaling) and the output back to the input's dtype, so that everything
    around the convolution (BatchNorm's statistics, α's softmax and mixing, the loss and every
    weight) stays float32. XLA fuses the casts into the neighbouring elementwise fusions.
    """
    if dtype is not None:
        out = conv_impl(x.astype(dtype), w.astype(dtype), stride, padding, dilation, groups, branch, members, kernels)
        return out.astype(x.dtype)
    return conv_impl(x, w, stride, padding, dilation, groups, branch, members, kernels)


def conv_impl(x, w, stride, padding, dilation, groups=1, branch=False, members=False, kernels=None):
    """``branch``/``members``: the :mod:`branch_conv` path (custom backward pass; with
    ``members`` one convolution per member under ``vmap``). Under XLA:CPU's kernel policy
    (``kernels``) 1x1 convolutions run as a matrix product, and depthwise ones (off the
    ``members`` path) as shifted views
    (:mod:`dnas.kernels.cpu.depthwise`; on the branch path with a convolution-free backward pass).
    Input and kernel must share a dtype on every path, as XLA's convolution demands on GPU (the
    CPU formulations would silently promote a bfloat16 input to float32)."""
    if x.dtype != w.dtype:
        raise TypeError(f"convolution of a {x.dtype} input with a {w.dtype} kernel; cast both (Ctx.compute_dtype)")
    kernels = resolve(kernels)
    if w.shape[:2] == (1, 1) and stride == 1 and padding == 0 and groups == 1 and kernels.matmul_1x1:
        # a 1x1 convolution as a matrix product over the pixels (on every path: top level,
        # sampled branch, scanned loop, vmapped members): on XLA:CPU its backward pass is then
        # two dots, faster than the convolutions of autodiff or of branch_conv
        # (docs/benchmarks.md); GPU/TPU keep the native convolution. Flattened to one
        # [pixels, c_in] matrix: a dot over the 4-D array (einsum "nhwi,io") has XLA:CPU
        # transpose the output cotangent into a copy for the weight gradient (slower)
        flat = x.reshape(-1, x.shape[-1]) @ w[0, 0]
        return flat.reshape(x.shape[:-1] + (w.shape[-1],))
    if (groups > 1 and groups == x.shape[-1] == w.shape[-1] and w.shape[2] == 1
            and not members and kernels.shifted_depthwise):
        # depthwise (one filter per channel): k*k shifted views, with its gradients several
        # faster on XLA:CPU than its grouped convolution (docs/benchmarks.md). On the branch
        # path with a backward pass free of convolutions (custom VJP): there the grouped
        # convolution's gradient is orders of magnitude slower (inside a lax.switch;
        # docs/benchmarks.md)
        if branch:
            return branch_depthwise_conv(x, w[:, :, 0, :], stride, padding, dilation)
        return depthwise_conv(x, w[:, :, 0, :], stride, padding, dilation)
    if (branch or members) and groups == 1:
        return branch_conv2d(x, w, stride, padding, dilation, members=members)
    return lax.conv_general_dilated(
        x, w, (stride, stride), ((padding, padding), (padding, padding)),
        rhs_dilation=(dilation, dilation), dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups)


def _moments(x, axis_name):
    """Batch mean and (biased) variance over N, H, W, averaged over ``axis_name`` (sync BN)."""
    mean = jnp.mean(x, axis=(0, 1, 2))
    mean_sq = jnp.mean(jnp.square(x), axis=(0, 1, 2))
    if axis_name is not None:
        mean, mean_sq = lax.pmean((mean, mean_sq), axis_name)
    return mean, jnp.maximum(mean_sq - jnp.square(mean), 0.0)


@partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def batch_normalize(x: jax.Array, eps: float, axis_name: str | None = None, pin: bool = False):
    """``(x̂, mean, var)`` with ``x̂ = (x - mean) / sqrt(var + eps)`` over the batch statistics.

    Same values and gradients as autodiff through the formula, but the derivative is written
    in terms of the output: ``dx̂ = rstd · (dx - mean(dx) - x̂ · mean(x̂ · dx))``. Reverse mode
    (the transpose of that linear map) then needs only ``x̂`` and ``rstd`` for the backward
    pass, where autodiff kept ``x``, ``x - mean`` and ``x̂``; ``x̂`` is usually kept anyway (a
    mixed op's α gradient needs every candidate's output). A ``custom_jvp`` (not
    ``custom_vjp``) so that forward-over-reverse (Hessian-vector products of the
    hypergradients) still works.

    With ``pin`` (the kernel policy's ``pin_bn_output``, XLA:CPU's) ``x̂`` is
    :func:`~dnas.kernels.cpu.pin.pinned`: XLA:CPU
    otherwise fuses the cheap normalisation into the backward ops and so keeps ``x`` *and*
    ``x̂``. Stored once, XLA's temporary memory of a search step falls markedly
    (``docs/benchmarks.md``) for 8 FLOPs per element.
    """
    mean, var = _moments(x, axis_name)
    return _store_once((x - mean) * lax.rsqrt(var + eps), pin), mean, var


def _store_once(xhat, pin: bool):
    """BatchNorm's output ``x̂``, pinned if ``pin`` (see :func:`batch_normalize`)."""
    return pinned(xhat, group=4) if pin else xhat


@batch_normalize.defjvp
def _batch_normalize_jvp(eps, axis_name, pin, primals, tangents):
    (x,), (t,) = primals, tangents
    mean, var = _moments(x, axis_name)
    rstd = lax.rsqrt(var + eps)
    xhat = _store_once((x - mean) * rstd, pin)
    t_mean, t_xs = jnp.mean(t, axis=(0, 1, 2)), jnp.mean(xhat * t, axis=(0, 1, 2))
    if axis_name is not None:
        t_mean, t_xs = lax.pmean((t_mean, t_xs), axis_name)
    t_xhat = rstd * (t - t_mean - xhat * t_xs)
    # d var = 2 E[(x - mean) dx] = 2 E[x̂ dx] / rstd
    return (xhat, mean, var), (t_xhat, t_mean, 2.0 * t_xs / rstd)


def batch_normalize_vjp(xhat: jax.Array, rstd: jax.Array, g: jax.Array, axis_name: str | None = None):
    """The cotangent of :func:`batch_normalize`'s input for the cotangent ``g`` of its output
    ``x̂``, from ``x̂`` and ``rstd`` alone (no need of the input ``x``).

    The derivative ``t ↦ rstd · (t - mean(t) - x̂ · mean(x̂ · t))`` (see
    :func:`batch_normalize`) is self-adjoint, so its transpose is the same formula applied to
    ``g``; over a device axis the means are global (``pmean``), as in the forward pass.
    """
    g_mean, g_xs = jnp.mean(g, axis=(0, 1, 2)), jnp.mean(xhat * g, axis=(0, 1, 2))
    if axis_name is not None:
        g_mean, g_xs = lax.pmean((g_mean, g_xs), axis_name)
    return rstd * (g - g_mean - xhat * g_xs)
