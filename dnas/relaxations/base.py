"""The relaxation protocol: how architecture parameters become what mixed ops consume.

A relaxation is a :class:`Relaxation` — a small record of pure functions, in the spirit of an
``optax.GradientTransformation`` — plus one registry entry. The search loop, jit/pmap,
hypergradients, checkpointing and logging only ever call these functions:

``init(key, groups) -> arch``
    Architecture parameters, a pytree. ``groups`` is the space's
    ``{group: (num_choice_points, num_ops)}``; the usual form is ``{group: alpha}`` with
    ``alpha`` of that shape, but a relaxation may add its own leaves (e.g. PC-DARTS's edge
    parameters β, DrNAS's concentrations), as long as ``probs`` can read them.

``sample(arch, key, progress) -> samples``
    Per group, a pytree with a leading choice-point axis: what the mixed op of each choice
    point consumes. Dense softmax weights (DARTS), a hard one-hot with a straight-through
    gradient plus its index (GDAS), two sampled paths and their gates (ProxylessNAS), ...
    ``progress`` in [0, 1] is the fraction of the search done (for temperature schedules);
    ``key`` is a PRNG key (replicated on every device so all devices sample the same
    architecture).

``mix(sample, candidates, x) -> (y, state)``
    Combine one choice point's candidates (a :class:`dnas.supernet.mixed.Candidates`):
    ``candidates.all(x)`` evaluates every op, ``candidates.one(i, x)`` only op ``i``.

``eval_sample(arch) -> samples``
    Deterministic samples used to evaluate the supernet (e.g. softmax weights, or the argmax
    one-hot).

``probs(arch) -> {group: (num_choice_points, num_ops)}``
    The architecture distribution: for entropy logging, expected latency and derivation.

``scores(arch) -> {group: matrix}``
    What derivation ranks (defaults to ``probs``; PC-DARTS multiplies edge weights in).

``penalty(arch, progress) -> scalar``
    An extra term of the architecture objective (0 for most; FairDARTS's zero-one loss).

``logits(arch) -> {group: matrix}``
    The per-group (choice point x op) parameter matrices a user reads as "α" (``alphas.json``);
    defaults to ``arch`` itself when ``arch`` is ``{group: α}`` (PC-DARTS: its ``alpha`` leaf).

``partial_channels`` (an int, default 1)
    The space builds each choice point's candidate ops for ``1/partial_channels`` of its
    channels; ``mix`` still receives the full input and decides what bypasses the ops
    (PC-DARTS).

A factory in the registry may take a ``space`` argument: it then receives the search space
(for structure such as :meth:`~dnas.supernet.spaces.SearchSpace.choice_point_nodes`).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

Arch = Any


class Relaxation(NamedTuple):
    name: str
    init: Callable[[jax.Array, dict], Arch]
    sample: Callable[[Arch, jax.Array, jax.Array], dict]
    mix: Callable
    eval_sample: Callable[[Arch], dict]
    probs: Callable[[Arch], dict]
    scores: Callable[[Arch], dict] | None = None
    penalty: Callable[[Arch, jax.Array], jax.Array] | None = None
    partial_channels: int = 1
    logits: Callable[[Arch], dict] | None = None

    def derive_scores(self, arch):
        return (self.scores or self.probs)(arch)

    def alphas(self, arch) -> dict:
        """``{group: (num_choice_points, num_ops)}`` architecture parameters (see ``logits``);
        groups whose parameters are not such a matrix are left out."""
        if self.logits is not None:
            return self.logits(arch)
        return {g: a for g, a in arch.items() if getattr(a, "ndim", None) == 2}

    def arch_penalty(self, arch, progress):
        return jnp.zeros((), jnp.float32) if self.penalty is None else self.penalty(arch, progress)


def init_alpha(key: jax.Array, groups: dict, scale: float = 1e-3) -> dict:
    """α ~ scale · N(0, 1) per group, as in DARTS's search code."""
    keys = jax.random.split(key, len(groups))
    return {g: scale * jax.random.normal(k, shape, jnp.float32) for k, (g, shape) in zip(keys, sorted(groups.items()))}


def softmax_probs(arch: dict) -> dict:
    """softmax(α) per choice point, for relaxations whose ``arch`` is ``{group: α}``."""
    return {g: jax.nn.softmax(a, axis=-1) for g, a in arch.items()}


def per_group(arch: dict, key: jax.Array, fn: Callable) -> dict:
    """``{g: fn(arch[g], key_g)}`` with one independent key per group (sorted names), so a
    sample does not depend on dict order."""
    keys = jax.random.split(key, len(arch))
    return {g: fn(arch[g], k) for k, g in zip(keys, sorted(arch))}


def dense_mix(weights: jax.Array, candidates, x: jax.Array):
    """Σ_i w_i · op_i(x): every candidate evaluated (DARTS eq. 2, SNAS)."""
    outs, state = candidates.all(x)
    y = sum(w * o for w, o in zip(weights, outs))
    return y, state


def entropy(probs: dict) -> jax.Array:
    """Mean entropy (nats) of the per-choice-point distributions over all groups."""
    ents = [-jnp.sum(p * jnp.log(jnp.clip(p, 1e-12, 1.0)), axis=-1) for p in probs.values()]
    return jnp.mean(jnp.concatenate([e.reshape(-1) for e in ents]))
