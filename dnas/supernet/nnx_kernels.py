"""The kernel policy (:mod:`dnas.backend`) applied to a Flax NNX model's own layers.

A user's model is written with plain ``nnx.Conv`` and ``nnx.BatchNorm``; the built-in spaces
run their layers through XLA:CPU's formulations (``docs/cpu.md``). :func:`follow_policy` gives
a user's model the same formulations, on the copy of the model that one traced forward pass
merges from its weights (the user's own objects are never touched):

* every ``nnx.Conv`` gets a convolution function with ``lax.conv_general_dilated``'s
  signature (Flax's own hook, ``Conv.conv_general_dilated``) that routes a 2-D NHWC/HWIO
  convolution to :func:`dnas.kernels.dispatch.conv_impl`: 1x1 convolutions as matrix products,
  depthwise ones as shifted views, and inside a sampled op's ``lax.switch`` (:func:`in_branch`)
  or under the vmap over seeds the backward pass of :mod:`dnas.kernels.cpu.branch_conv`;
  anything else (other ranks, dilated inputs, asymmetric padding, a precision) is passed to
  ``lax.conv_general_dilated`` unchanged;
* every ``nnx.BatchNorm`` normalising the last axis of a 4-D input in training mode runs
  :func:`dnas.kernels.dispatch.batch_normalize`: the same values, gradients and running
  statistics as Flax's (biased variance, Flax's momentum convention), with the backward pass
  written from the output and, under XLA:CPU's policy, the output stored once. It also writes
  its running statistics as whole values: Flax's ``variable[...] = tracer`` asks the tracer for
  its sharding, which costs a walk of the whole traced program per write; a supernet with
  hundreds of BatchNorms spent most of its tracing time there (``docs/benchmarks.md``).
  Inside a sampled candidate it records (and, recomputing for the backward pass, replays) its
  output: :class:`OutputTail`.

Both policies compute the same function: ``tests/test_nnx_kernels.py`` compares a user
model's logits, gradients and statistics under ``xla_cpu`` and ``native``.

The built-in spaces' shared initialisation and layers live here too: :func:`HE_NORMAL`,
:func:`torch_linear`, :class:`TorchBatchNorm`, :class:`ReLUConvBN`, :class:`PooledLinear`.
"""
from __future__ import annotations

import contextlib
import contextvars
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from dnas.backend import KernelPolicy
from dnas.kernels.dispatch import batch_normalize
from dnas.kernels.dispatch import batch_normalize_vjp
from dnas.kernels.dispatch import conv_impl

_BRANCH: contextvars.ContextVar[bool] = contextvars.ContextVar("dnas_nnx_branch", default=False)

_NHWC_HWIO = lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))


@contextlib.contextmanager
def in_branch(custom_vjp: bool = True):
    """Within this context convolutions run inside a sampled op's ``lax.switch`` branch, through
    the branch kernels when ``custom_vjp`` (not when the estimator differentiates twice)."""
    token = _BRANCH.set(bool(custom_vjp))
    try:
        yield
    finally:
        _BRANCH.reset(token)


def _same(values) -> int | None:
    values = tuple(values)
    return values[0] if values and all(v == values[0] for v in values) else None


class PolicyConv:
    """``lax.conv_general_dilated``'s signature, computed by the policy's formulation where
    the convolution is one dnas has formulations for (see the module docstring).

    ``compute_dtype`` (``--precision bfloat16``): input and kernel are cast to it and the output
    back, as dnas's own convolutions do (:func:`dnas.kernels.dispatch.conv`; Micikevicius et al.
    2018): everything around the convolution stays float32."""

    def __init__(self, kernels: KernelPolicy, members: bool = False, compute_dtype=None):
        self.kernels, self.members, self.compute_dtype = kernels, members, compute_dtype

    def _plain(self, lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
               batch_group_count, precision, extra):
        """``(stride, padding, dilation)`` as integers when dnas's formulations apply, else None."""
        if (lhs.ndim != 4 or extra or precision is not None or batch_group_count != 1
                or lhs.dtype != rhs.dtype or dimension_numbers != _NHWC_HWIO):
            return None
        if lhs_dilation is not None and any(d != 1 for d in lhs_dilation):
            return None
        if isinstance(padding, str):
            padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
        pad = _same(p for pair in padding for p in pair)
        stride = _same(window_strides)
        dilation = _same(rhs_dilation) if rhs_dilation is not None else 1
        if pad is None or stride is None or dilation is None:
            return None
        return stride, pad, dilation

    def __call__(self, lhs, rhs, *args, **kwargs):
        dtype = self.compute_dtype
        if dtype is None or lhs.dtype == dtype:
            return self._conv(lhs, rhs, *args, **kwargs)
        return self._conv(lhs.astype(dtype), rhs.astype(dtype), *args, **kwargs).astype(lhs.dtype)

    def _conv(self, lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
              dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
              out_sharding=None, **extra):
        plain = self._plain(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                            batch_group_count, precision, extra or out_sharding is not None)
        if plain is None:
            return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                            dimension_numbers, feature_group_count, batch_group_count, precision,
                                            out_sharding=out_sharding, **extra)
        stride, pad, dilation = plain
        branch = _BRANCH.get() and self.kernels.branch_convs
        return conv_impl(lhs, rhs, stride, pad, dilation, feature_group_count, branch=branch,
                         members=self.members, kernels=self.kernels)


class OutputTail:
    """The affine-free BatchNorms a sampled candidate runs, so that its backward pass can start
    from its output, as the built-in ops' does (:class:`dnas.supernet.mixed._Branch`).

    Forward (``replay=None``): ``last`` is the latest training-mode :class:`PolicyBatchNorm`
    call, ``(k, x̂, rstd)`` with ``k`` its place in call order, when that layer is affine-free
    (its output is ``x̂``), else ``None``. If the candidate's output *is* that ``x̂``, the
    candidate ends in that BatchNorm, and ``rstd`` is all its backward pass needs besides ``x̂``
    (:func:`dnas.kernels.dispatch.batch_normalize_vjp`).

    Backward (``replay=(k, x̂, rstd)``): the recomputed forward pass's ``k``-th call returns the
    saved ``x̂`` with that derivative, so nothing reads the value of its input. XLA then drops
    the recomputation of the layer before it (the candidate's last convolution), whose input
    the gradient still needs but whose output it does not.
    """

    def __init__(self, replay: tuple | None = None):
        self.last: tuple | None = None
        self.replay, self.calls = replay, 0


_TAIL: contextvars.ContextVar[OutputTail | None] = contextvars.ContextVar("dnas_nnx_tail", default=None)


@contextlib.contextmanager
def output_tail(tail: OutputTail):
    """Within this context the :class:`PolicyBatchNorm` calls record into (or replay from) ``tail``."""
    token = _TAIL.set(tail)
    try:
        yield tail
    finally:
        _TAIL.reset(token)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _from_output(x, xhat, rstd, axis_name):
    """``x̂`` (saved), with the derivative of batch normalisation at ``x`` written from ``x̂``."""
    return xhat


def _from_output_fwd(x, xhat, rstd, axis_name):
    return xhat, (xhat, rstd)


def _from_output_bwd(axis_name, res, g):
    xhat, rstd = res
    return batch_normalize_vjp(xhat, rstd, g, axis_name), jnp.zeros_like(xhat), jnp.zeros_like(rstd)


_from_output.defvjp(_from_output_fwd, _from_output_bwd)


class PolicyBatchNorm(nnx.BatchNorm):
    """``nnx.BatchNorm`` whose training-mode normalisation is dnas's (see the module
    docstring); every other case is Flax's own ``__call__``."""

    dnas_pin: bool = False
    #: the running variance is updated with the batch's unbiased variance (PyTorch's convention)
    unbiased_running_var: bool = False

    def __call__(self, x, use_running_average=None, *, mask=None):
        running = self.use_running_average if use_running_average is None else use_running_average
        axis = self.axis if isinstance(self.axis, int) else (self.axis[0] if len(self.axis) == 1 else None)
        if (running or mask is not None or x.ndim != 4 or axis not in (-1, 3) or self.axis_index_groups is not None
                or not self.use_fast_variance or self.dtype not in (None, x.dtype)
                or self.mean[...].dtype != x.dtype):
            return super().__call__(x, use_running_average, mask=mask)
        tail = _TAIL.get()
        call = None
        if tail is not None:
            call, tail.calls = tail.calls, tail.calls + 1
            if tail.replay is not None and tail.replay[0] == call:
                # the recomputed candidate's last layer: its output is saved, its statistics discarded
                return _from_output(x, tail.replay[1], tail.replay[2], self.axis_name)
        y, mean, var = batch_normalize(x, self.epsilon, self.axis_name, self.dnas_pin)
        if tail is not None and tail.replay is None:
            affine_free = self.scale is None and self.bias is None
            tail.last = (call, y, lax.rsqrt(var + self.epsilon)) if affine_free else None
        m = self.momentum
        if self.unbiased_running_var:
            n = x.shape[0] * x.shape[1] * x.shape[2]
            if self.axis_name is not None:
                n = n * lax.psum(1, self.axis_name)
            var = var * n / jnp.maximum(n - 1, 1)
        self.mean.set_value(lax.stop_gradient(m * self.mean[...] + (1 - m) * mean))
        self.var.set_value(lax.stop_gradient(m * self.var[...] + (1 - m) * var))
        if self.scale is not None:
            y = y * self.scale[...]
        if self.bias is not None:
            y = y + self.bias[...]
        return y


class TorchBatchNorm(PolicyBatchNorm):
    """BatchNorm over N, H, W with PyTorch's conventions, which the built-in spaces and the
    papers' code (DARTS, NAS-Bench-201, ProxylessNAS) use: momentum 0.1 (Flax's 0.9), epsilon
    1e-5 and a running variance updated with the batch's *unbiased* variance
    (``var · n / (n - 1)``, ``n`` the examples times pixels over every device of a synchronised
    BatchNorm) when it normalises the channels of NHWC images; Flax's ``nnx.BatchNorm`` uses the
    biased one. Normalisation and gradients are
    the same as ``nnx.BatchNorm``'s; ``affine=False`` leaves out the scale and bias (DARTS's
    search cells)."""

    unbiased_running_var = True

    def __init__(self, num_features: int, rngs: nnx.Rngs, affine: bool = True):
        super().__init__(num_features, momentum=0.9, epsilon=1e-5, use_bias=affine, use_scale=affine, rngs=rngs)


_FLAX_HE_NORMAL = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")
_FLAT_DRAW_MIN = 256


@partial(jax.jit, static_argnums=1)
def _flat_normal(key, size: int):
    return jax.random.normal(key, (size,), jnp.float32)


@partial(jax.jit, static_argnums=1)
def _scaled_prefix(flat, shape, scale):
    return flat[:int(np.prod(shape))].reshape(shape) * scale


def _prefix_draws(key) -> bool:
    """Whether a draw's i-th number depends only on the key and i (JAX's threefry PRNG with
    ``jax_threefry_partitionable``, the default), so that a shape's numbers are the first numbers
    of a longer flat draw."""
    if isinstance(key, jax.core.Tracer) or not jax.config.jax_threefry_partitionable:
        return False
    impl = jax.random.key_impl(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) \
        else jax.config.jax_default_prng_impl
    return "threefry2x32" in str(impl)


def HE_NORMAL(key, shape, dtype=jnp.float32, **kwargs):
    """He et al. (ICCV 2015) normal initialisation, variance 2 / fan-in (``kaiming_normal_``),
    for the built-in spaces' convolutions: what dnas's layer kit drew before they were NNX models.
    Flax's default (LeCun, 1 / fan-in) starts a search elsewhere: NAS-Bench-201's planted-cell
    DARTS search (tests/test_planted.py) recovered 2 of 6 edges from it against 6 of 6 from this
    (docs/benchmarks.md, "The NAS-Bench-201 space declared as an NNX model").

    The values are exactly ``nnx.initializers.variance_scaling(2.0, "fan_in", "normal")``'s,
    drawn so that building a space compiles few programs: ``jax.random.normal`` is a program
    compiled for each shape it draws, and a space's weights have dozens of shapes (building a
    space was mostly these compiles, docs/benchmarks.md "A space builds with few compiles").
    With JAX's partitionable threefry PRNG (the default) the i-th number of a draw depends only
    on the key and i, so a kernel's numbers are the first ones of a flat draw of the next power
    of two: one program per size class; taking the prefix and scaling it by
    ``sqrt(float32(2 / fan_in))`` (computed on the host, correctly rounded as on the device) is a
    program per shape, but a small one, quick to compile. Under a trace, another PRNG, another
    dtype or with Flax's keyword arguments (``out_sharding``) it draws as Flax does."""
    shape = tuple(int(d) for d in shape)
    if kwargs or jnp.dtype(dtype) != jnp.float32 or len(shape) < 2 or not _prefix_draws(key):
        return _FLAX_HE_NORMAL(key, shape, dtype, **kwargs)
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)      # as jax.random does: one program for both kinds of key
    n = int(np.prod(shape))
    flat = _flat_normal(key, max(_FLAT_DRAW_MIN, 1 << max(n - 1, 0).bit_length()))
    return _scaled_prefix(flat, shape, np.sqrt(np.float32(2.0 / float(np.prod(shape[:-1])))))


def torch_linear(c_in: int, c_out: int, rngs: nnx.Rngs) -> nnx.Linear:
    """``nnx.Linear`` initialised as PyTorch's ``nn.Linear`` (weights and bias uniform in
    ±1/√fan-in), as the papers' classifiers and dnas's layer kit."""
    bound = 1.0 / float(np.sqrt(c_in))

    def bias_init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return nnx.Linear(c_in, c_out, kernel_init=nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"),
                      bias_init=bias_init, rngs=rngs)


class ReLUConvBN(nnx.Module):
    """``[ReLU,] conv (padding k // 2, no bias, He-initialised), BatchNorm`` (PyTorch's
    conventions, :class:`TorchBatchNorm`; ``affine``: its scale and bias): the ``ReLUConvBN``
    of DARTS's and NAS-Bench-201's code (a cell's preprocessing, NAS-Bench-201's convolution
    ops), and with ``relu=False`` their stems."""

    def __init__(self, c_in, c_out, k, rngs, stride=1, affine=True, relu=True):
        self.conv = nnx.Conv(c_in, c_out, (k, k), strides=stride, padding=[(k // 2, k // 2)] * 2, use_bias=False,
                             kernel_init=HE_NORMAL, rngs=rngs)
        self.bn = TorchBatchNorm(c_out, rngs, affine=affine)
        self.relu = relu

    def __call__(self, x):
        return self.bn(self.conv(jax.nn.relu(x) if self.relu else x))


class PooledLinear(nnx.Module):
    """Global average pooling, then the classifier (:func:`torch_linear`)."""

    def __init__(self, c_in, num_classes, rngs):
        self.linear = torch_linear(c_in, num_classes, rngs)

    def __call__(self, x):
        return self.linear(jnp.mean(x, axis=(1, 2)))


def follow_policy(model: nnx.Module, kernels: KernelPolicy, members: bool = False,
                  compute_dtype=None) -> nnx.Module:
    """Give ``model``'s convolutions and BatchNorms (in place) the policy's formulations, and
    its convolutions the ``compute_dtype`` (``Ctx.compute_dtype``). Call it on a model merged
    for one forward pass, not on the user's own object."""
    conv = PolicyConv(kernels, members, compute_dtype)
    for _, m in nnx.iter_modules(model):
        if isinstance(m, nnx.Conv) and m.conv_general_dilated is lax.conv_general_dilated:
            m.conv_general_dilated = conv
        elif type(m) is nnx.BatchNorm:
            m.__class__ = PolicyBatchNorm
            m.dnas_pin = kernels.pin_bn_output
        elif isinstance(m, PolicyBatchNorm):   # TorchBatchNorm
            m.dnas_pin = kernels.pin_bn_output
    return model

