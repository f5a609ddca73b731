"""A minimal functional layer kit: every layer is a pair of pure functions.

A :class:`Layer` has ``init(key) -> (params, state)`` and
``apply(params, state, x, ctx) -> (y, new_state)``. ``params`` are trainable weights,
``state`` holds BatchNorm running statistics; both are plain pytrees (tuples and dicts of
arrays), so that supernet weights, BN statistics and architecture parameters stay separate
pytrees that ``jit``, ``pmap``, ``vmap``, ``lax.scan`` and checkpointing all see as they are.
Layers of identical structure stack with ``tree_map(jnp.stack, ...)`` so a group of equal
edges or cells can be traced once and run under ``lax.scan``. It is what a space written
directly against :class:`~dnas.supernet.space_base.SearchSpace` builds with
(``docs/spaces.md``); the built-in spaces are NNX models (:mod:`dnas.nnx`).

All tensors are NHWC. Convolutions take an ``impl`` argument choosing how a depthwise
convolution is computed (see :func:`dnas.supernet.context.depthwise_impl`): XLA:CPU's grouped convolution is
several times slower than the same arithmetic written as a dense convolution with a
block-diagonal kernel (``docs/benchmarks.md``), while on GPU/TPU the native grouped
convolution is the fast path. Both formulations compute the same function and gradient.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from dnas.kernels.dispatch import batch_normalize
from dnas.kernels.dispatch import conv as _conv
from dnas.supernet.context import Ctx, depthwise_impl, policy

Params = Any
State = Any


class Layer(NamedTuple):
    """``parts``: the sublayers of a :func:`sequential` (empty otherwise). ``normalize``: set
    on an affine-free :func:`batchnorm` only, ``(state, x, ctx) -> (x̂, new_state, rstd)`` in
    training mode; with it a sampled op ending in such a BatchNorm is differentiated from its
    saved output instead of being recomputed (:func:`dnas.supernet.mixed.switch_sampled`)."""

    init: Callable[[jax.Array], tuple[Params, State]]
    apply: Callable[[Params, State, jax.Array, Ctx], tuple[jax.Array, State]]
    parts: tuple = ()
    normalize: Callable | None = None


# --------------------------------------------------------------------------- utilities

def _stateless(fn: Callable[[jax.Array], jax.Array]) -> Layer:
    return Layer(lambda key: ((), ()), lambda p, s, x, ctx: (fn(x), s))


def sequential(*layers: Layer) -> Layer:
    """Compose layers left to right; params and state are tuples, one entry per layer."""

    def init(key):
        keys = jax.random.split(key, max(len(layers), 1))
        ps, ss = zip(*(l.init(k) for l, k in zip(layers, keys))) if layers else ((), ())
        return tuple(ps), tuple(ss)

    def apply(params, state, x, ctx):
        new_state = []
        for layer, p, s in zip(layers, params, state):
            x, s = layer.apply(p, s, x, ctx)
            new_state.append(s)
        return x, tuple(new_state)

    return Layer(init, apply, parts=tuple(layers))


def _he_normal(key, shape, fan_in):
    return jax.random.normal(key, shape, jnp.float32) * math.sqrt(2.0 / fan_in)


# --------------------------------------------------------------------------- layers

def relu() -> Layer:
    return _stateless(jax.nn.relu)


def identity() -> Layer:
    return _stateless(lambda x: x)


def conv(c_in: int, c_out: int, kernel: int, stride: int = 1, padding: int | None = None,
         dilation: int = 1, bias: bool = False, groups: int = 1) -> Layer:
    """2-D convolution, HWIO kernel, He-normal init (fan-in); ``groups`` > 1 is a grouped
    (``groups == c_in``: depthwise) convolution."""
    padding = dilation * (kernel - 1) // 2 if padding is None else padding
    if c_in % groups or c_out % groups:
        raise ValueError(f"conv: groups={groups} must divide c_in={c_in} and c_out={c_out}")

    def init(key):
        kw, _ = jax.random.split(key)
        p = {"w": _he_normal(kw, (kernel, kernel, c_in // groups, c_out), kernel * kernel * c_in // groups)}
        if bias:
            p["b"] = jnp.zeros((c_out,), jnp.float32)
        return p, ()

    def apply(p, s, x, ctx):
        y = _conv(x, p["w"], stride, padding, dilation, groups=groups, branch=ctx.branch, members=ctx.members,
                  dtype=ctx.compute_dtype, kernels=policy(ctx))
        if bias:
            y = y + p["b"]
        return y, s

    return Layer(init, apply)


def separable_conv(c_in: int, c_out: int, kernel: int, stride: int = 1,
                   dilation: int = 1, impl: str | None = None) -> Layer:
    """Depthwise ``kernel``x``kernel`` conv followed by a pointwise 1x1 conv (no BN between).

    Params ``{"dw": (k,k,1,c_in), "pw": (1,1,c_in,c_out)}`` whatever the implementation:

    * ``native``: a depthwise convolution then a 1x1 convolution (the fast path on GPU/TPU;
      on CPU they run as shifted views and a matrix product, see :func:`_conv`).
    * ``dense``: the composition of the two linear maps is itself a convolution with kernel
      ``K[i,j,c,o] = dw[i,j,c] * pw[c,o]``; one dense convolution computes it. Same function,
      same gradients (autodiff through the product); on XLA:CPU far faster than the grouped
      convolution; ``auto`` picks it where ``ctx.dense_separable`` (below).
    * ``auto`` (CPU default): ``native`` (faster than ``dense``, most with the input gradient
      only), also where cells and edges are scanned (faster steps for a longer compile), except
      where ``ctx.dense_separable`` (a sampled op's branch, scanned cells with unrolled edges) or
      ``ctx.members`` (``vmap`` over seeds): ``dense`` there (the views are faster still per op,
      but graphs that trace many of them compile for too long). ``docs/benchmarks.md``
      ("Depthwise convolutions as shifted views") has the figures.
    """
    padding = dilation * (kernel - 1) // 2
    if impl not in (None, "auto", "native", "dense"):
        raise ValueError(f"unknown conv implementation {impl!r}; expected 'auto', 'native' or 'dense'")

    def init(key):
        k1, k2 = jax.random.split(key)
        return {"dw": _he_normal(k1, (kernel, kernel, 1, c_in), kernel * kernel),
                "pw": _he_normal(k2, (1, 1, c_in, c_out), c_in)}, ()

    def apply(p, s, x, ctx):
        kernels = policy(ctx)
        impl_r = depthwise_impl(impl, kernels)
        conv_kw = dict(branch=ctx.branch, members=ctx.members, dtype=ctx.compute_dtype, kernels=kernels)
        if impl_r == "native" or (impl_r == "auto" and not (ctx.dense_separable or ctx.members)):
            y = _conv(x, p["dw"], stride, padding, dilation, groups=c_in, **conv_kw)
            return _conv(y, p["pw"], 1, 0, 1, **conv_kw), s
        fused = p["dw"][:, :, 0, :, None] * p["pw"][0, 0][None, None]
        return _conv(x, fused, stride, padding, dilation, **conv_kw), s

    return Layer(init, apply)


def batchnorm(c: int, affine: bool = True, momentum: float = 0.1, eps: float = 1e-5) -> Layer:
    """BatchNorm over N, H, W with PyTorch conventions (momentum 0.1, unbiased running var).

    ``affine=False`` is what DARTS uses inside the supernet during search. In training mode
    the normalisation is :func:`dnas.kernels.dispatch.batch_normalize` (exact gradients, fewer stored activations).
    """

    def init(key):
        p = {"scale": jnp.ones((c,), jnp.float32), "bias": jnp.zeros((c,), jnp.float32)} if affine else {}
        s = {"mean": jnp.zeros((c,), jnp.float32), "var": jnp.ones((c,), jnp.float32)}
        return p, s

    def normalize(s, x, ctx):
        y, mean, var = batch_normalize(x, eps, ctx.axis_name, policy(ctx).pin_bn_output)
        n = x.shape[0] * x.shape[1] * x.shape[2]
        if ctx.axis_name is not None:
            n = n * lax.psum(1, ctx.axis_name)
        unbiased = var * n / jnp.maximum(n - 1, 1)
        new_s = {"mean": lax.stop_gradient((1 - momentum) * s["mean"] + momentum * mean),
                 "var": lax.stop_gradient((1 - momentum) * s["var"] + momentum * unbiased)}
        return y, new_s, lax.rsqrt(var + eps)

    def apply(p, s, x, ctx):
        if ctx.train:
            y, new_s, _ = normalize(s, x, ctx)
        else:
            y, new_s = (x - s["mean"]) * lax.rsqrt(s["var"] + eps), s
        if affine:
            y = y * p["scale"] + p["bias"]
        return y, new_s

    return Layer(init, apply, normalize=None if affine else normalize)


def _pool_padding(kernel, stride, padding):
    return ((0, 0), (padding, padding), (padding, padding), (0, 0))


def max_pool(kernel: int = 3, stride: int = 1, padding: int = 1) -> Layer:
    pads = _pool_padding(kernel, stride, padding)

    def fn(x):
        return lax.reduce_window(x, -jnp.inf, lax.max, (1, kernel, kernel, 1), (1, stride, stride, 1), pads)

    return _stateless(fn)


def avg_pool(kernel: int = 3, stride: int = 1, padding: int = 1, count_include_pad: bool = False) -> Layer:
    """Average pooling; ``count_include_pad=False`` divides by the in-image count (PyTorch)."""
    pads = _pool_padding(kernel, stride, padding)

    def fn(x):
        window, strides = (1, kernel, kernel, 1), (1, stride, stride, 1)
        total = lax.reduce_window(x, 0.0, lax.add, window, strides, pads)
        if count_include_pad or padding == 0:
            return total / (kernel * kernel)
        ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
        count = lax.reduce_window(ones, 0.0, lax.add, window, strides, pads)
        return total / count

    return _stateless(fn)


def global_avg_pool() -> Layer:
    return _stateless(lambda x: jnp.mean(x, axis=(1, 2)))


def dense(c_in: int, c_out: int) -> Layer:
    """Fully connected layer (PyTorch-style uniform init)."""

    def init(key):
        k1, k2 = jax.random.split(key)
        bound = 1.0 / math.sqrt(c_in)
        return {"w": jax.random.uniform(k1, (c_in, c_out), jnp.float32, -bound, bound),
                "b": jax.random.uniform(k2, (c_out,), jnp.float32, -bound, bound)}, ()

    return Layer(init, lambda p, s, x, ctx: (x @ p["w"] + p["b"], s))


def zero(stride: int = 1, c_out: int | None = None) -> Layer:
    """The ``none`` operation: zeros of the output shape."""

    def fn(x):
        y = x[:, ::stride, ::stride, :] if stride > 1 else x
        if c_out is not None and c_out != x.shape[-1]:
            y = jnp.zeros(y.shape[:-1] + (c_out,), y.dtype)
        return jnp.zeros_like(y)

    return _stateless(fn)


def factorized_reduce(c_in: int, c_out: int, affine: bool = True) -> Layer:
    """ReLU, two 1x1 stride-2 convs on offset grids, concatenated, BN (DARTS, Liu et al. 2019)."""
    if c_out % 2:
        raise ValueError(f"factorized_reduce needs an even number of output channels, got {c_out}")
    conv_a, conv_b, bn = conv(c_in, c_out // 2, 1, 2, 0), conv(c_in, c_out // 2, 1, 2, 0), batchnorm(c_out, affine)

    def init(key):
        ka, kb, kc = jax.random.split(key, 3)
        pa, _ = conv_a.init(ka)
        pb, _ = conv_b.init(kb)
        pn, sn = bn.init(kc)
        return {"a": pa, "b": pb, "bn": pn}, sn

    def apply(p, s, x, ctx):
        x = jax.nn.relu(x)
        ya, _ = conv_a.apply(p["a"], (), x, ctx)
        yb, _ = conv_b.apply(p["b"], (), x[:, 1:, 1:, :], ctx)
        if yb.shape[1:3] != ya.shape[1:3]:  # odd sizes: pad the shifted branch to match
            yb = jnp.pad(yb, ((0, 0), (0, ya.shape[1] - yb.shape[1]), (0, ya.shape[2] - yb.shape[2]), (0, 0)))
        return bn.apply(p["bn"], s, jnp.concatenate([ya, yb], axis=-1), ctx)

    return Layer(init, apply)


def relu_conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1, padding: int | None = None,
                 dilation: int = 1, affine: bool = True) -> Layer:
    return sequential(relu(), conv(c_in, c_out, kernel, stride, padding, dilation), batchnorm(c_out, affine))
