"""PC-DARTS: partial channel connections and edge normalisation (Xu et al., ICLR 2020).

* **Partial channels** (Sec. 3.2, eq. 2): on each edge only the first ``C/K`` channels go
  through the softmax-weighted mixed op; the other ``(K-1)C/K`` bypass it (max-pooled 2x2 on a
  reduction edge so the shapes agree), the two parts are concatenated and the channels
  shuffled with ``K`` groups, so that a different subset is sampled by the next edge. The
  candidate ops are built at ``C/K`` channels (the space reads ``partial_channels``), which is
  where the memory saving comes from.
* **Edge normalisation** (Sec. 3.3, eq. 4): every edge ``(i, j)`` gets a parameter ``β_ij``;
  the edges entering node ``j`` are weighted by ``softmax_i(β_ij)``. The edge weight multiplies
  the op weights, and derivation ranks ``edge weight × op weight``.

With ``K=1`` every channel goes through the ops, and with ``edge_norm=False`` the relaxation is
exactly DARTS. Candidates that run no op (a :class:`dnas.nnx.InputChoice`'s inputs, marked
``partial_channels = False``) are mixed on all their channels.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dnas.relaxations.base import Relaxation, init_alpha


def channel_shuffle(x: jax.Array, groups: int) -> jax.Array:
    """ShuffleNet's channel shuffle of an NHWC tensor: channel ``g·(C/groups) + i`` moves to
    ``i·groups + g``."""
    if groups == 1:
        return x
    *lead, c = x.shape
    return x.reshape(*lead, groups, c // groups).swapaxes(-1, -2).reshape(*lead, c)


def _bypass(x: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
    """The bypassed channels, max-pooled 2x2/2 on a reduction edge (padded to the op's size)."""
    if x.shape[1:3] == tuple(out_hw):
        return x
    ph, pw = 2 * out_hw[0] - x.shape[1], 2 * out_hw[1] - x.shape[2]
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1),
                             ((0, 0), (0, ph), (0, pw), (0, 0)))


def take_channels(x: jax.Array, n: int) -> jax.Array:
    """The first ``n`` channels of an NHWC tensor, as a gather (not a slice).

    Same values and gradient as ``x[..., :n]``; the difference is what XLA keeps for the
    backward pass. The candidate ops need their input ``x[..., :n]`` again in the backward
    pass (ReLU mask, convolution weight gradient). XLA fuses a slice into its consumers, so it
    kept the full-width arrays the slice was read from — on a cell node, the concatenated
    full-width outputs of every edge entering it — alive until the backward pass instead of
    the 1/K-wide slice: in an NB201 supernet at K=4, that was a third of PC-DARTS's memory
    (``docs/benchmarks.md``). A gather's output is materialised, so only it is kept.
    """
    return jnp.take(x, jnp.arange(n), axis=-1, mode="clip")


def partial_mix(k: int):
    def mix(weights, candidates, x):
        if k == 1 or not getattr(candidates, "partial_channels", True):   # (an input choice runs no op)
            outs, state = candidates.all(x)
            return sum(w * o for w, o in zip(weights, outs)), state
        c = x.shape[-1]
        if c % k:
            raise ValueError(f"PC-DARTS: {c} channels are not divisible by K={k}")
        part, rest = take_channels(x, c // k), x[..., c // k:]
        outs, state = candidates.all(part)
        y = sum(w * o for w, o in zip(weights, outs))
        return channel_shuffle(jnp.concatenate([y, _bypass(rest, y.shape[1:3])], axis=-1), k), state
    return mix


def pc_darts(space, k: int = 4, edge_norm: bool = True) -> Relaxation:
    """``space`` supplies the destination node of every edge (``space.choice_point_nodes``): the
    edges entering one node may lie in several groups (a user model's cell edges are one
    choice point each, ``dnas.nnx.Choice(..., node=)``), so β is normalised over all groups."""
    groups = sorted(space.groups)
    ids: dict = {}
    seg = np.asarray([ids.setdefault(node, len(ids)) for g in groups for node in space.choice_point_nodes(g)],
                     np.int32)
    splits = np.cumsum([space.groups[g][0] for g in groups])[:-1]

    def init(key, groups):
        alpha = init_alpha(key, groups)
        return {"alpha": alpha, "beta": {g: 1e-3 * jax.random.normal(jax.random.fold_in(key, 7), (n,))
                                         for g, (n, _) in sorted(groups.items())}}

    def edge_weights(arch):
        """softmax of β over the edges entering the same node (1 everywhere without edge_norm)."""
        if not edge_norm:
            return {g: jnp.ones_like(beta) for g, beta in arch["beta"].items()}
        beta = jnp.concatenate([arch["beta"][g] for g in groups])
        m = jax.ops.segment_max(beta, seg, num_segments=len(ids))
        e = jnp.exp(beta - m[seg])
        w = e / jax.ops.segment_sum(e, seg, num_segments=len(ids))[seg]
        return dict(zip(groups, jnp.split(w, splits)))

    def probs(arch):
        return {g: jax.nn.softmax(a, axis=-1) for g, a in arch["alpha"].items()}

    def weights(arch):
        p, e = probs(arch), edge_weights(arch)
        return {g: p[g] * e[g][:, None] for g in p}

    return Relaxation(name="pc_darts", init=init, sample=lambda arch, key, progress: weights(arch),
                      mix=partial_mix(k), eval_sample=weights, probs=probs, scores=weights,
                      partial_channels=k, logits=lambda arch: arch["alpha"])


#: the option that gives K, read before the space is built (dnas.relaxations.partial_channels)
pc_darts.partial_channels_option = "k"
