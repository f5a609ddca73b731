"""FairDARTS: independent sigmoids with a zero-one loss (Chu et al., ECCV 2020, Sec. 3-4).

DARTS's softmax makes the ops of a choice point compete for one unit of weight; FairDARTS
argues that this *exclusive* competition, together with the skip connection's easier
optimisation, is what lets ``skip_connect`` take over (the "unfair advantage"). It gives every op
its own weight ``σ(α_o)`` (eq. 3: ``ō(x) = Σ_o σ(α_o)·o(x)``), so ops cooperate instead, and
adds the zero-one loss (eq. 5) to the architecture objective,

    L_01 = −(1/N) Σ_i (σ(α_i) − ½)²,

weighted by ``w01`` (the paper's 10), which pushes every weight towards 0 or 1 so that the
discretisation after the search loses little.

In dnas it is an ordinary relaxation, so the existing protocol derives the architecture:
``scores`` are the sigmoids and each choice point keeps its highest-scoring op (the DARTS cell
keeps its top-2 edges by score as usual). The paper's own DARTS-space derivation keeps every op
with σ > 0.85 instead; that threshold rule is not implemented. ``probs`` (entropy, expected
latency) are the sigmoids normalised per choice point.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dnas.relaxations.base import Relaxation, dense_mix, init_alpha


def sigmoids(arch: dict) -> dict:
    return {g: jax.nn.sigmoid(a) for g, a in arch.items()}


def zero_one_loss(arch: dict) -> jax.Array:
    """−mean over every α of (σ(α) − ½)² (FairDARTS eq. 5)."""
    s = jnp.concatenate([jax.nn.sigmoid(a).reshape(-1) for a in arch.values()])
    return -jnp.mean((s - 0.5) ** 2)


def fair_darts(w01: float = 10.0) -> Relaxation:
    if w01 < 0:
        raise ValueError(f"fair_darts: w01 must be non-negative, got {w01}")

    def probs(arch):
        return {g: s / jnp.sum(s, axis=-1, keepdims=True) for g, s in sigmoids(arch).items()}

    return Relaxation(
        name="fair_darts", init=init_alpha,
        sample=lambda arch, key, progress: sigmoids(arch),
        mix=dense_mix, eval_sample=sigmoids, probs=probs, scores=sigmoids,
        penalty=lambda arch, progress: w01 * zero_one_loss(arch))
