"""A minimal functional layer kit: every layer is a pair of pure functions.

A :class:`Layer` has ``init(key) -> (params, state)`` and
``apply(params, state, x, ctx) -> (y, new_state)``. ``params`` are trainable weights,
``state`` holds BatchNorm running statistics; both are plain pytrees (tuples and dicts of
arrays), so that supernet weights, BN statistics and architecture parameters stay separate
pytrees that ``jit``, ``pmap``, ``vmap``, ``lax.scan`` and checkpointing all see as they are.
Layers of identical structure stack with ``tree_map(jnp.stack, ...)`` so a group of equal
edges or cells can be traced once and run under ``lax.scan``.

All tensors are NHWC. Convolutions take an ``impl`` argument choosing how a depthwise
convolution is computed (see :func:`depthwise_impl`): XLA:CPU's grouped convolution is
3–12x slower than the same arithmetic written as a dense convolution with a block-diagonal
kernel (``benchmarks`` / ``../shared/notes/jax-cpu.md``), while on GPU/TPU the native grouped
convolution is the fast path. Both formulations compute the same function and gradient.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from dnas.backend import KernelPolicy, default_policy, resolve
from dnas.kernels.cpu.branch_conv import conv2d as branch_conv2d
from dnas.kernels.cpu.depthwise import branch_depthwise_conv, depthwise_conv
from dnas.kernels.cpu.pin import pinned

Params = Any
State = Any


class Ctx(NamedTuple):
    """What a forward pass needs besides weights and input.

    ``train``: BatchNorm uses batch statistics (and returns updated running statistics) when
    true, running statistics when false. ``axis_name``: when set (inside ``pmap``), BatchNorm
    averages its batch statistics over that device axis (synchronised BN), so a data-parallel
    step computes exactly what one device computes on the global batch. ``branch``: true
    while evaluating inside a ``lax.switch`` branch (a sampled op); convolutions then use
    :func:`dnas.kernels.cpu.branch_conv.conv2d`, whose backward pass stays fast inside control
    flow on XLA:CPU. ``members``: true while tracing under a ``vmap`` over independent
    searches (``dnas search --seeds``) on the CPU: convolutions take the same branch path,
    whose convolutions run one per member there (:func:`dnas.kernels.cpu.branch_conv.member_conv`)
    instead of as one slow grouped convolution. ``custom_vjp``: whether kernels with a custom backward pass may
    run: the branch convolutions of a sampled op and of scanned loops (:func:`loop_mode`) and
    a sampled op's own backward pass (:func:`dnas.supernet.mixed.switch_sampled`). The searcher
    clears it for estimators that differentiate twice: a ``custom_vjp`` has no forward mode.
    ``dense_separable``: :func:`separable_conv`'s
    ``auto`` runs as one dense convolution (set in a sampled op's branch and in scanned cells
    whose edges are unrolled: where the shifted views' larger graph makes compiles too long).
    ``compute_dtype``: when set (``jnp.bfloat16``: ``--precision bfloat16``), convolutions
    read their input and kernel in that dtype and return float32 (:func:`_conv`); weights,
    BatchNorm statistics, the mixed ops' weighted sums, α and the loss stay float32.
    ``kernels``: the :class:`dnas.backend.KernelPolicy` the layers follow (which of XLA:CPU's
    formulations run); ``None``: the backend's default (:func:`policy`).
    """

    train: bool = True
    axis_name: str | None = None
    branch: bool = False
    members: bool = False
    custom_vjp: bool = True
    dense_separable: bool = False
    compute_dtype: Any = None
    kernels: Any = None


def policy(ctx: Ctx) -> KernelPolicy:
    """The kernel policy of a forward pass: ``ctx.kernels``, else the backend's default."""
    return ctx.kernels if ctx.kernels is not None else default_policy()


def with_kernels(ctx: Ctx, kernels: KernelPolicy) -> Ctx:
    """``ctx`` with a space's kernel policy, unless the caller set one."""
    return ctx if ctx.kernels is not None else ctx._replace(kernels=kernels)


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


def depthwise_impl(impl: str | None = None, kernels: KernelPolicy | None = None) -> str:
    """Resolve a separable convolution's formulation: ``native``, ``dense`` or ``auto``.

    ``None``/``"auto"`` stays ``auto`` under a policy with shifted depthwise convolutions
    (XLA:CPU's; :func:`separable_conv` then picks per call) and is ``native`` otherwise.
    """
    if impl in (None, "auto"):
        return "auto" if resolve(kernels).shifted_depthwise else "native"
    if impl not in ("native", "dense"):
        raise ValueError(f"unknown conv implementation {impl!r}; expected 'auto', 'native' or 'dense'")
    return impl


def unroll_loops(unroll: bool | str | None = None, kernels: KernelPolicy | None = None) -> bool:
    """Whether to unroll the supernet's loops over equal edges and cells at trace time.

    ``None`` resolves to the kernel policy's ``unroll_loops`` (true for XLA:CPU's): XLA:CPU runs the weight-gradient
    convolution of autodiff inside a while loop (``lax.scan``) 70-500x slower than the same
    convolution at the top level (``benchmarks/bench_scan_conv.py``), which made a scanned
    NAS-Bench-201 step 45 s instead of 2.3 s. On GPU/TPU the scanned loops keep the traced
    graph, and so the compile time, small. See :func:`loop_mode` for the full choice.
    """
    return loop_mode(unroll, kernels)[0]


LOOP_MODES = (None, True, False, "scan_cells")


def loop_mode(unroll: bool | str | None = None, kernels: KernelPolicy | None = None) -> tuple[bool, bool, bool]:
    """``(unroll_cells, unroll_edges, loop_convs)`` for a space's ``unroll`` option.

    ``True``: every loop unrolled at trace time (one traced copy per cell and edge: the fastest
    steps on XLA:CPU, the longest compiles). ``False``: cells and edges run under ``lax.scan``
    (one traced body). ``"scan_cells"``: runs of equal cells scanned, the edges inside a cell
    unrolled. ``None``: the policy's ``unroll_loops`` (``True`` for XLA:CPU, ``False`` natively).

    ``loop_convs``: under a policy with branch convolutions (XLA:CPU's), when any loop is scanned, convolutions take the
    :mod:`dnas.kernels.cpu.branch_conv` path (:class:`Ctx` ``branch``), whose backward pass is
    written as forward-style convolutions that XLA:CPU runs at full speed inside loops. With
    it a scanned NAS-Bench-201 step (C=16, N=5, B=64) is 2.1 s against 1.6 s unrolled while
    compiling in 8.7 s instead of 22 s (``docs/benchmarks.md``).
    """
    if unroll not in LOOP_MODES:
        raise ValueError(f"unknown loop mode unroll={unroll!r}; expected one of {LOOP_MODES}")
    kernels = resolve(kernels)
    if unroll is None:
        unroll = kernels.unroll_loops
    cells, edges = (False, True) if unroll == "scan_cells" else (bool(unroll), bool(unroll))
    return cells, edges, kernels.branch_convs and not (cells and edges)


def loop_ctx(ctx: Ctx, loop_convs: bool, edges_unrolled: bool) -> Ctx:
    """``ctx`` for a network whose loops are scanned: convolutions on the branch path when the
    space's loop mode asks for it (:func:`loop_mode`) and the caller allows it (``ctx.custom_vjp``),
    separable ones as a dense convolution when the edges inside the scanned cells are unrolled."""
    if not (loop_convs and ctx.custom_vjp):
        return ctx
    return ctx._replace(branch=True, dense_separable=ctx.dense_separable or edges_unrolled)


def scan(body, carry, xs, unroll: bool = False):
    """``lax.scan(body, carry, xs)``, or the same loop unrolled in Python when ``unroll``.

    The unrolled form slices ``xs`` with static indices and stacks the outputs, so the traced
    graph holds one copy of ``body`` per step and no while loop at all. (``lax.scan`` with
    ``unroll=True`` is not enough on XLA:CPU: it still emits the loop's dynamic slicing and
    updates, and the step stayed >20x slower in our measurements.)
    """
    if not unroll:
        return lax.scan(body, carry, xs)
    n = jax.tree_util.tree_leaves(xs)[0].shape[0]
    ys = []
    for i in range(n):
        carry, y = body(carry, jax.tree_util.tree_map(lambda a: a[i], xs))
        ys.append(y)
    return carry, stack_trees(ys)


def _he_normal(key, shape, fan_in):
    return jax.random.normal(key, shape, jnp.float32) * math.sqrt(2.0 / fan_in)


def _conv(x, w, stride, padding, dilation, groups=1, branch=False, members=False, dtype=None, kernels=None):
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
        # two dots, 1.5-2x faster than the convolutions of autodiff or of branch_conv
        # (docs/benchmarks.md); GPU/TPU keep the native convolution. Flattened to one
        # [pixels, c_in] matrix: a dot over the 4-D array (einsum "nhwi,io") has XLA:CPU
        # transpose the output cotangent into a copy for the weight gradient (2x slower)
        flat = x.reshape(-1, x.shape[-1]) @ w[0, 0]
        return flat.reshape(x.shape[:-1] + (w.shape[-1],))
    if (groups > 1 and groups == x.shape[-1] == w.shape[-1] and w.shape[2] == 1
            and not members and kernels.shifted_depthwise):
        # depthwise (one filter per channel): k*k shifted views, with its gradients 4-20x
        # faster on XLA:CPU than its grouped convolution (docs/benchmarks.md). On the branch
        # path with a backward pass free of convolutions (custom VJP): there the grouped
        # convolution's gradient is 190-600x slower (inside a lax.switch)
        if branch:
            return branch_depthwise_conv(x, w[:, :, 0, :], stride, padding, dilation)
        return depthwise_conv(x, w[:, :, 0, :], stride, padding, dilation)
    if (branch or members) and groups == 1:
        return branch_conv2d(x, w, stride, padding, dilation, members=members)
    return lax.conv_general_dilated(
        x, w, (stride, stride), ((padding, padding), (padding, padding)),
        rhs_dilation=(dilation, dilation), dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups)


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
    * ``auto`` (CPU default): ``native`` (1.1-2.3x faster than ``dense`` with all gradients,
      1.5-10x with the input gradient only; ``docs/benchmarks.md``), also where cells and
      edges are scanned (DARTS space, ``--loops scan``: 1.7-1.9x faster steps for a 1.4-1.5x
      longer compile), except where ``ctx.dense_separable`` (a sampled op's branch, scanned cells
      with unrolled edges) or ``ctx.members`` (``vmap`` over seeds): ``dense`` there (the views
      are faster still per op, but graphs that trace many of them compile for too long: a
      DARTS-space GDAS step past 11 minutes, ``--loops scan-cells`` 890 s against 113 s).
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
    ``x̂``. Stored once, XLA's temporary memory of a search step falls by a quarter to a third
    (NAS-Bench-201 DARTS step 1.26 → 0.81 GB, DARTS space 6.72 → 4.95 GB;
    ``docs/benchmarks.md``) for 8 FLOPs per element.
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


def batchnorm(c: int, affine: bool = True, momentum: float = 0.1, eps: float = 1e-5) -> Layer:
    """BatchNorm over N, H, W with PyTorch conventions (momentum 0.1, unbiased running var).

    ``affine=False`` is what DARTS uses inside the supernet during search. In training mode
    the normalisation is :func:`batch_normalize` (exact gradients, fewer stored activations).
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


def stack_trees(trees):
    """Stack a list of identically structured pytrees along a new leading axis."""
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)
