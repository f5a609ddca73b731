"""What a stand-alone (derived) network is: pure ``init``/``apply`` over the layer kit, and the
regularisers its training uses. Each space builds its own from a genotype (``Space.network``);
:func:`dnas.supernet.derived.build_network` picks the space from the genotype.

``apply(params, state, x, ctx, drop=None)`` returns an :class:`Output` (logits, auxiliary
logits or ``None``, new BatchNorm state); ``drop`` is a :class:`DropPath` (key and probability)
during training, ``None`` otherwise.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from dnas.supernet.context import Ctx


class Output(NamedTuple):
    logits: jax.Array
    aux_logits: jax.Array | None
    state: Any


class DropPath(NamedTuple):
    """Drop path during training: each op's output (identity ops excepted) is zeroed per example
    with probability ``prob`` and scaled by ``1 / (1 - prob)`` otherwise (DARTS's schedule raises
    ``prob`` linearly from 0 over the epochs). ``key``: the step's PRNG key."""

    key: jax.Array
    prob: Any


class Network(NamedTuple):
    """A stand-alone network (what ``dnas train`` trains): ``init(key) -> (params, stats)``,
    ``apply(params, stats, x, ctx, drop=None) -> Output``. ``stochastic``: its training forward
    pass draws random numbers of its own (a user model's dropout); the trainer then passes
    every step a :class:`DropPath` with the step's key even when drop path is off. ``layout``:
    the fingerprint of how ``init``'s weights are stacked
    (:meth:`~dnas.supernet.stacked_leaves.WeightLayout.fingerprint`), which checkpoints record."""

    init: Callable[[jax.Array], tuple[Any, Any]]
    apply: Callable[..., Output]
    genotype: Any
    config: dict
    stochastic: bool = False
    layout: str | None = None


def drop_path(x: jax.Array, key: jax.Array, prob) -> jax.Array:
    """Zero each example of ``x`` with probability ``prob``; survivors scaled by ``1/(1-prob)``,
    so the expectation is ``x`` (FractalNet's drop path, Larsson et al., ICLR 2017, as DARTS
    applies it, per op)."""
    keep = 1.0 - jnp.asarray(prob, x.dtype)
    mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, jnp.zeros((), x.dtype))


def drop_key(drop: DropPath, ctx: Ctx, index: int) -> jax.Array:
    """The drop-path key of op ``index``; data parallel, each device drops paths of its own
    examples."""
    key = jax.random.fold_in(drop.key, index)
    if ctx.axis_name is not None:
        key = jax.random.fold_in(key, lax.axis_index(ctx.axis_name))
    return key


def count_params(params) -> int:
    """Number of trainable parameters (BatchNorm running statistics are state, not counted)."""
    return int(sum(a.size for a in jax.tree_util.tree_leaves(params)))


def check_options(space: str, options: dict, allowed) -> None:
    """Refuse options a space's derived network does not take, naming the valid ones. ``allowed``:
    option names, or the network's builder (its keyword-only parameters)."""
    if callable(allowed):
        import inspect
        allowed = [n for n, p in inspect.signature(allowed).parameters.items() if p.kind is p.KEYWORD_ONLY]
    bad = sorted(set(options) - set(allowed))
    if bad:
        raise ValueError(f"derived {space} network has no option(s) {bad}; options: {sorted(allowed)}")
