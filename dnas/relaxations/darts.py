"""DARTS: the continuous softmax relaxation (Liu, Simonyan & Yang, ICLR 2019, eq. 2).

Each choice point's output is ō(x) = Σ_o softmax(α)_o · o(x); every candidate is evaluated.
"""
from __future__ import annotations

import jax

from dnas.relaxations.base import Relaxation, dense_mix, init_alpha


def _softmax(arch):
    return {g: jax.nn.softmax(a, axis=-1) for g, a in arch.items()}


def darts() -> Relaxation:
    return Relaxation(
        name="darts",
        init=init_alpha,
        sample=lambda arch, key, progress: _softmax(arch),
        mix=dense_mix,
        eval_sample=_softmax,
        probs=_softmax,
    )
