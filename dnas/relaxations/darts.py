"""DARTS: the continuous softmax relaxation (Liu, Simonyan & Yang, ICLR 2019, eq. 2).

Each choice point's output is ō(x) = Σ_o softmax(α)_o · o(x); every candidate is evaluated.
"""
from __future__ import annotations

from dnas.relaxations.base import Relaxation, dense_mix, init_alpha, softmax_probs


def darts() -> Relaxation:
    return Relaxation(
        name="darts",
        init=init_alpha,
        sample=lambda arch, key, progress: softmax_probs(arch),
        mix=dense_mix,
        eval_sample=softmax_probs,
        probs=softmax_probs,
    )
