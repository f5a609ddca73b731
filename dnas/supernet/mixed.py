"""Mixed operations and the edge scan that runs a cell's choice points.

A *choice point* (an edge of a cell, a layer of a chain) holds every candidate operation.
How the candidates are combined is not decided here but by the active relaxation's ``mix``
function (see :mod:`dnas.relaxations.base`), which receives a :class:`Candidates` view:
``all(x)`` evaluates every candidate (DARTS, SNAS), ``one(i, x)`` evaluates only candidate
``i`` through ``lax.switch`` (GDAS, ProxylessNAS), so a sampled relaxation really skips the
unsampled operations.

Edges of equal shape are stacked and run by :func:`scan_edges` under ``lax.scan`` (unrolled
on CPU, see :func:`dnas.supernet.layers.scan`), so one mixed op is traced once per group of
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

from dnas.supernet.layers import Ctx, Layer, scan, stack_trees

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

    def one(self, index: jax.Array, x: jax.Array, state: tuple | None = None) -> tuple[jax.Array, tuple]:
        """Evaluate only candidate ``index`` (a traced integer) with ``lax.switch``.

        Returns its output and the full state tuple with only that candidate's state updated.
        ``state`` lets a relaxation thread the state through several calls (two sampled paths).
        """
        state = self.state if state is None else state
        ctx = self.ctx._replace(branch=True)

        def branch(i):
            def run(params, state, x):
                y, s = self.layers[i].apply(params[i], state[i], x, ctx)
                return y, state[:i] + (s,) + state[i + 1:]
            return run

        fns = tuple(branch(i) for i in range(self.num))
        if not RECOMPUTE_SAMPLED:
            return lax.switch(index, list(fns), self.params, state, x)
        return switch_recompute(fns, index, _varying_like(self.params, x), state, x)


#: Differentiate a sampled op by recomputing it in the backward pass (see switch_recompute).
RECOMPUTE_SAMPLED = True


def _varying_like(tree, x):
    """Inside ``shard_map``: mark the (replicated) ``tree`` as varying over the axes ``x`` varies
    over, so a custom backward pass may return per-device cotangents for it (the transpose of
    the cast sums them over devices, as autodiff does for the plain form)."""
    from dnas.supernet.branch_conv import _vma

    axes = tuple(sorted(_vma(x)))
    if not axes:
        return tree

    def cast(a):
        missing = tuple(sorted(set(axes) - _vma(a)))
        return lax.pcast(a, missing, to="varying") if missing else a
    return jax.tree_util.tree_map(cast, tree)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def switch_recompute(fns, index, params, state, x):
    """``lax.switch(index, fns, params, state, x)`` whose backward pass re-runs the chosen branch.

    Autodiff of a ``lax.switch`` stores the residuals of *every* branch (JAX joins them across
    branches and zero-fills the slots a branch does not use), so a sampled op costs the memory
    (and the zero-filling time) of all candidates of different shapes, not of the sampled one.
    Here the forward pass keeps only the branch inputs and the index; the backward pass runs
    ``jax.vjp`` of the sampled branch alone (one extra forward of that op: rematerialisation
    of the sampled path only). Exact: same values and gradients as autodiff of the switch.
    ``fns[i](params, state, x) -> (y, new_state)``; the new state (BatchNorm running
    statistics) gets no gradient.
    """
    return lax.switch(index, list(fns), params, state, x)


def _switch_fwd(fns, index, params, state, x):
    return lax.switch(index, list(fns), params, state, x), (index, params, state, x)


def _switch_bwd(fns, res, g):
    index, params, state, x = res
    gy = g[0]

    def grad(fn):
        def run(params, x, gy):
            _, vjp = jax.vjp(lambda p, x_: fn(p, state, x_)[0], params, x)
            return vjp(gy)
        return run

    g_params, g_x = lax.switch(index, [grad(fn) for fn in fns], params, x, gy)
    return None, g_params, None, g_x


switch_recompute.defvjp(_switch_fwd, _switch_bwd)


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

    def node(i):
        if not done[i]:
            parts[i], done[i] = [_node_sum(parts[i])], True
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


def _node_sum(terms: list) -> jax.Array:
    """Σ terms, materialised once (a product with the identity matrix).

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
    if len(terms) == 1:
        return out
    c = out.shape[-1]
    return jnp.einsum("...c,cd->...d", out, jnp.eye(c, dtype=out.dtype), precision=lax.Precision.HIGHEST)


def scan_edges(mixed: MixedOp, params, state, samples, src: Sequence[int], dst: Sequence[int],
               out_buf: jax.Array, mix: Mix, ctx: Ctx, in_buf: jax.Array | None = None,
               unroll: bool = False):
    """Run a group of stacked edges in order: ``out_buf[dst_e] += mixed_e(source[src_e])``.

    ``source`` is ``in_buf`` when given (edges reading cell inputs), else ``out_buf`` itself
    (edges between intermediate nodes, which must be ordered so that a node is complete before
    an edge reads it). Returns the final buffer and the stacked new states.
    ``unroll=True`` unrolls the loop at trace time (see :func:`dnas.supernet.layers.unroll_loops`)
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
