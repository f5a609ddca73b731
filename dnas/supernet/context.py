"""What a forward pass is told besides its weights and input, and how a space's loops run.

:class:`Ctx` (training or inference, the device axis of synchronised BatchNorm, the kernel
policy, the compute dtype, the branch and member paths of XLA:CPU's kernels) is passed down
from the searcher or trainer through every supernet, derived network and kernel, so that the
backend's choices are made once, at the top (:mod:`dnas.backend`), not inside layers.
:func:`loop_mode` and :func:`scan` say how a space runs its loops over equal cells and edges:
unrolled at trace time or under ``lax.scan``.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
from jax import lax

from dnas.backend import KernelPolicy, default_policy, resolve
from dnas.supernet.stacked_leaves import stack_arrays


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
    ``dense_separable``: :func:`dnas.supernet.layers.separable_conv`'s
    ``auto`` runs as one dense convolution (set in a sampled op's branch and in scanned cells
    whose edges are unrolled: where the shifted views' larger graph makes compiles too long).
    ``compute_dtype``: when set (``jnp.bfloat16``: ``--precision bfloat16``), convolutions
    read their input and kernel in that dtype and return float32 (:func:`dnas.kernels.dispatch.conv`); weights,
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


def depthwise_impl(impl: str | None = None, kernels: KernelPolicy | None = None) -> str:
    """Resolve a separable convolution's formulation: ``native``, ``dense`` or ``auto``.

    ``None``/``"auto"`` stays ``auto`` under a policy with shifted depthwise convolutions
    (XLA:CPU's; :func:`dnas.supernet.layers.separable_conv` then picks per call) and is ``native`` otherwise.
    """
    if impl in (None, "auto"):
        return "auto" if resolve(kernels).shifted_depthwise else "native"
    if impl not in ("native", "dense"):
        raise ValueError(f"unknown conv implementation {impl!r}; expected 'auto', 'native' or 'dense'")
    return impl


def unroll_loops(unroll: bool | str | None = None, kernels: KernelPolicy | None = None) -> bool:
    """Whether to unroll the supernet's loops over equal edges and cells at trace time.

    ``None`` resolves to the kernel policy's ``unroll_loops`` (true for XLA:CPU's): XLA:CPU runs the weight-gradient
    convolution of autodiff inside a while loop (``lax.scan``) far slower than the same
    convolution at the top level (``benchmarks/bench_scan_conv.py``, ``docs/benchmarks.md``).
    On GPU/TPU the scanned loops keep the traced
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
    written as forward-style convolutions that XLA:CPU runs at full speed inside loops: a scanned
    step then runs a little slower than an unrolled one and compiles in a fraction of its time
    (``docs/benchmarks.md``).
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
    updates, and the step stayed many times slower; ``docs/benchmarks.md``.)
    """
    if not unroll:
        return lax.scan(body, carry, xs)
    n = jax.tree_util.tree_leaves(xs)[0].shape[0]
    ys = []
    for i in range(n):
        carry, y = body(carry, jax.tree_util.tree_map(lambda a: a[i], xs))
        ys.append(y)
    return carry, stack_trees(ys)


def stack_trees(trees):
    """Stack a list of identically structured pytrees along a new leading axis (on the host
    when the leaves are values: :func:`dnas.supernet.stacked_leaves.stack_arrays`)."""
    return jax.tree_util.tree_map(lambda *xs: stack_arrays(xs), *trees)
