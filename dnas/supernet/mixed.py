"""Mixed operations and the edge scan that runs a cell's choice points.

A *choice point* (an edge of a cell, a layer of a chain) holds every candidate operation.
How the candidates are combined is not decided here but by the active relaxation's ``mix``
function (see :mod:`dnas.relaxations.base`), which receives a :class:`Candidates` view:
``all(x)`` evaluates every candidate (DARTS, SNAS), ``one(i, x)`` evaluates only candidate
``i`` through ``lax.switch`` (GDAS, ProxylessNAS), so a sampled relaxation really skips the
unsampled operations.

Edges of equal shape are stacked and run by :func:`scan_edges` under ``lax.scan`` (unrolled
on CPU, see :func:`dnas.supernet.context.scan`), so one mixed op is traced once per group of
edges instead of once per edge: this is what keeps the
compile time of a full supernet short.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dnas.supernet.layers import Layer, sequential
from dnas.supernet.context import Ctx, policy, scan, stack_trees
from dnas.kernels.dispatch import batch_normalize_vjp
from dnas.kernels.cpu.pin import pinned

Mix = Callable[[Any, "Candidates", jax.Array], tuple[jax.Array, tuple]]


class Candidates:
    """The candidate ops of one choice point, bound to their weights, BN state and context."""

    def __init__(self, layers: Sequence[Layer], params: tuple, state: tuple, ctx: Ctx):
        self.layers, self.params, self.state, self.ctx = tuple(layers), params, state, ctx

    @property
    def num(self) -> int:
        return len(self.layers)

    def all(self, x: jax.Array) -> tuple[list[jax.Array], tuple]:
        """Evaluate every candidate; returns their outputs and the updated state tuple."""
        outs, states = [], []
        for layer, p, s in zip(self.layers, self.params, self.state):
            y, s = layer.apply(p, s, x, self.ctx)
            outs.append(y)
            states.append(s)
        return outs, tuple(states)

    def static(self, index: int, x: jax.Array) -> tuple[jax.Array, tuple]:
        """Evaluate only candidate ``index``, a Python integer (a discrete architecture compiled
        as such, no switch); returns its output and the state tuple with its state updated."""
        y, s = self.layers[index].apply(self.params[index], self.state[index], x, self.ctx)
        return y, self.state[:index] + (s,) + self.state[index + 1:]

    def one(self, index: jax.Array, x: jax.Array, state: tuple | None = None) -> tuple[jax.Array, tuple]:
        """Evaluate only candidate ``index`` (a traced integer) with ``lax.switch``.

        Returns its output and the full state tuple with only that candidate's state updated.
        ``state`` lets a relaxation thread the state through several calls (two sampled paths).
        """
        state = self.state if state is None else state
        kernels = policy(self.ctx)
        # XLA:CPU's policy: the branch's convolutions through branch_conv (fast inside lax.switch);
        # neither they nor switch_sampled when the estimator differentiates twice (Ctx.custom_vjp)
        custom = self.ctx.custom_vjp
        ctx = self.ctx._replace(branch=kernels.branch_convs and custom, dense_separable=True, kernels=kernels)
        branches = tuple(_Branch(layer, i, ctx) for i, layer in enumerate(self.layers))
        if not (kernels.recompute_sampled and custom):
            return lax.switch(index, [b.apply for b in branches], self.params, state, x)
        return switch_sampled(branches, index, varying_like(self.params, x), state, x)


class _Branch:
    """Candidate ``i`` as a branch of the sampled op's switch.

    ``apply(params, state, x) -> (y, new_state)`` on the tuples of all candidates.
    ``forward`` also returns what its backward pass keeps: for an op ending in an affine-free
    BatchNorm (ReLU-conv-BN, the DARTS separable convolutions, pooling + BN) the BatchNorm's
    ``rstd``, with which the backward pass starts from the op's output ``y`` = ``x̂``
    (:func:`dnas.kernels.dispatch.batch_normalize_vjp`) and recomputes only the layers before
    the BatchNorm whose activations the gradient needs, never the last convolution; for any
    other op nothing (zeros), and the backward pass recomputes the op.
    """

    def __init__(self, layer, i: int, ctx: Ctx):
        self.layer, self.i, self.ctx = layer, i, ctx
        tail = layer.parts[-1] if layer.parts else None
        self.normalize = tail.normalize if tail is not None and ctx.train else None
        self.prefix = sequential(*layer.parts[:-1]) if self.normalize is not None else None

    def _set(self, state, s):
        return state[:self.i] + (s,) + state[self.i + 1:]

    def apply(self, params, state, x):
        y, s = self.layer.apply(params[self.i], state[self.i], x, self.ctx)
        return y, self._set(state, s)

    def forward(self, params, state, x):
        if self.normalize is None:
            y, state = self.apply(params, state, x)
            return y, state, jnp.zeros(y.shape[-1:], y.dtype)
        p, s = params[self.i], state[self.i]
        z, s_prefix = self.prefix.apply(p[:-1], s[:-1], x, self.ctx)
        y, s_tail, rstd = self.normalize(s[-1], z, self.ctx)
        return y, self._set(state, s_prefix + (s_tail,)), rstd.astype(y.dtype)

    def backward(self, params, x, y, saved, gy, *, state):
        """``(∂/∂params, ∂/∂x)`` of ``⟨gy, y⟩``; zeros for the other candidates' params."""
        if self.normalize is None:
            f = lambda p, x_: self.apply(p, state, x_)[0]
            return jax.vjp(f, params, x)[1](gy)
        gz = batch_normalize_vjp(y, saved, gy, self.ctx.axis_name)

        f = lambda p, x_: self.prefix.apply(p[self.i][:-1], state[self.i][:-1], x_, self.ctx)[0]
        return jax.vjp(f, params, x)[1](gz)


def varying_like(tree, x):
    """Inside ``shard_map``: mark the (replicated) ``tree`` as varying over the axes ``x`` varies
    over, so a custom backward pass may return per-device cotangents for it (the transpose of
    the cast sums them over devices, as autodiff does for the plain form)."""
    from dnas.kernels.cpu.branch_conv import _vma

    axes = tuple(sorted(_vma(x)))
    if not axes:
        return tree

    def cast(a):
        missing = tuple(sorted(set(axes) - _vma(a)))
        return lax.pcast(a, missing, to="varying") if missing else a
    return jax.tree_util.tree_map(cast, tree)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def switch_sampled(branches, index, params, state, x):
    """``lax.switch`` over the candidates' branches with a backward pass of the chosen branch
    only. A branch has :class:`_Branch`'s ``apply``, ``forward`` and ``backward`` (the NNX
    choice points' is :class:`dnas.nnx._ModuleBranch`).

    Autodiff of a ``lax.switch`` stores the residuals of *every* branch (JAX joins them across
    branches and zero-fills the slots a branch does not use), so a sampled op costs the memory
    (and the zero-filling time) of all candidates of different shapes, not of the sampled one.
    Here the forward pass keeps only the branch inputs, the op's output (kept anyway for the
    α gradient) and one vector per op; the backward pass runs the sampled branch's backward
    alone: from the saved output for ops ending in an affine-free BatchNorm, otherwise by
    ``jax.vjp`` of a recomputed forward (rematerialisation of the sampled path only). Exact:
    same values and gradients as autodiff of the switch (``tests/test_switch_recompute.py``).
    The new state (BatchNorm running statistics) gets no gradient.
    """
    return lax.switch(index, [b.apply for b in branches], params, state, x)


def _switch_fwd(branches, index, params, state, x):
    y, new_state, saved = lax.switch(index, [b.forward for b in branches], params, state, x)
    return (y, new_state), (index, params, state, x, y, saved)


def _switch_bwd(branches, res, g):
    index, params, state, x, y, saved = res
    g_params, g_x = lax.switch(index, [partial(b.backward, state=state) for b in branches],
                               params, x, y, saved, g[0])
    return None, g_params, None, g_x


switch_sampled.defvjp(_switch_fwd, _switch_bwd)


class MixedOp:
    """All candidate ops of one choice point; params/state are tuples over candidates."""

    def __init__(self, layers: Sequence[Layer]):
        self.layers = tuple(layers)

    def init(self, key):
        keys = jax.random.split(key, len(self.layers))
        ps, ss = zip(*(l.init(k) for l, k in zip(self.layers, keys)))
        return tuple(ps), tuple(ss)

    def init_stacked(self, key, n: int):
        """Initialise ``n`` independent copies, stacked along a leading axis (for scanning)."""
        inits = [self.init(k) for k in jax.random.split(key, n)]
        return stack_trees([p for p, _ in inits]), stack_trees([s for _, s in inits])

    def apply(self, params, state, x, sample, mix: Mix, ctx: Ctx):
        return mix(sample, Candidates(self.layers, params, state, ctx), x)


def take_edges(tree, idx: Sequence[int]):
    """Select the edges ``idx`` (static) of a pytree with a leading edge axis."""
    idx = jnp.asarray(idx, jnp.int32)
    return jax.tree_util.tree_map(lambda a: a[idx], tree)


def unrolled_edges(mixed: MixedOp, params, state, samples, src: Sequence[int], dst: Sequence[int],
                   nodes: list, mix: Mix, ctx: Ctx, inputs: list | None = None):
    """:func:`scan_edges` unrolled at trace time, on nodes kept as separate arrays.

    ``nodes`` is a list of node values (``None``: a node no edge has written yet); edge ``e``
    reads ``(inputs or nodes)[src[e]]`` and adds its output to ``nodes[dst[e]]``. Returns the
    updated list and the stacked new states.

    Keeping the nodes separate matters for memory: updating one stacked buffer edge by edge
    (``buf.at[d].add``) made a full copy of all nodes per edge, and XLA kept each copy alive
    until the backward pass because the next edge's input was a slice of it — six copies of a
    four-node buffer per NAS-Bench-201 cell (``docs/benchmarks.md``).
    """
    parts = [[] if v is None else [v] for v in nodes]   # the terms summed into each node
    done = [False] * len(parts)
    pin = policy(ctx).pin_nodes

    def node(i):
        if not done[i]:
            parts[i], done[i] = [node_sum(parts[i], pin)], True
        return parts[i][0]

    n = jax.tree_util.tree_leaves(params)[0].shape[0]
    new_states = []
    for e in range(n):
        p, s, smp = jax.tree_util.tree_map(lambda a: a[e], (params, state, samples))
        x = node(src[e]) if inputs is None else inputs[src[e]]
        y, s_new = mixed.apply(p, s, x, smp, mix, ctx)
        if done[dst[e]]:
            raise ValueError(f"edge {e} writes node {dst[e]} after an edge has read it; order the edges")
        parts[dst[e]].append(y)
        new_states.append(s_new)
    return [node(i) if parts[i] else None for i in range(len(parts))], stack_trees(new_states)


def node_sum(terms: list, pin: bool = True) -> jax.Array:
    """Σ terms, materialised once (a product with the identity matrix) when ``pin`` (the kernel
    policy's ``pin_nodes``, XLA:CPU's).

    XLA:CPU fuses a chain of elementwise adds into every consumer instead of storing it; a
    cell node feeds several ops (a 3x3 pooling window reads each element 9 times), and through
    skip connections (identity ops) the fused expressions grew node after node, cell after
    cell: a NAS-Bench-201 DARTS step at N=5 recomputed ~30 GFLOP of them and ran about 3x
    slower. A dot is a library call that XLA neither fuses nor simplifies away, so it pins
    the node in memory at the cost of ``2·C`` FLOPs per element (``docs/benchmarks.md``).
    """
    out = terms[0]
    for t in terms[1:]:
        out = out + t.astype(out.dtype)
    if len(terms) == 1 or not pin:
        return out
    return pinned(out)


def scan_edges(mixed: MixedOp, params, state, samples, src: Sequence[int], dst: Sequence[int],
               out_buf: jax.Array, mix: Mix, ctx: Ctx, in_buf: jax.Array | None = None,
               unroll: bool = False):
    """Run a group of stacked edges in order: ``out_buf[dst_e] += mixed_e(source[src_e])``.

    ``source`` is ``in_buf`` when given (edges reading cell inputs), else ``out_buf`` itself
    (edges reading nodes of the buffer, which may hold the cell inputs too, as in a scanned
    normal DARTS cell; the edges must be ordered so that a node is complete before an edge
    reads it). Returns the final buffer and the stacked new states.
    ``unroll=True`` unrolls the loop at trace time (see :func:`dnas.supernet.context.unroll_loops`)
    through :func:`unrolled_edges` (the spaces call that directly when unrolled, on a list of
    nodes).
    """
    if unroll:
        nodes = [out_buf[i] for i in range(out_buf.shape[0])]
        inputs = None if in_buf is None else [in_buf[i] for i in range(in_buf.shape[0])]
        nodes, new_states = unrolled_edges(mixed, params, state, samples, src, dst, nodes, mix, ctx, inputs)
        return jnp.stack(nodes), new_states

    def body(buf, xs):
        p, s, smp, si, di = xs
        x = (buf if in_buf is None else in_buf)[si]
        y, s_new = mixed.apply(p, s, x, smp, mix, ctx)
        return buf.at[di].add(y.astype(buf.dtype)), s_new

    # numpy indices: unrolled, each edge reads and writes its nodes through static slices
    edges = (params, state, samples, np.asarray(src, np.int32), np.asarray(dst, np.int32))
    return scan(body, out_buf, edges, unroll)
