"""Relaxations of the discrete architecture choice; one file each, one registry entry each.

To add one: write ``dnas/relaxations/<name>.py`` with a function returning a
:class:`~dnas.relaxations.base.Relaxation`, and add it to ``REGISTRY`` below.
"""
from __future__ import annotations

from typing import Callable

from dnas.relaxations.base import Relaxation, dense_mix, entropy, init_alpha
from dnas.relaxations.darts import darts

REGISTRY: dict[str, Callable[..., Relaxation]] = {
    "darts": darts,
}


class UnknownRelaxationError(ValueError):
    pass


def get_relaxation(name: str, **options) -> Relaxation:
    if name not in REGISTRY:
        raise UnknownRelaxationError(f"unknown relaxation {name!r}; available: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name](**options)


__all__ = ["Relaxation", "REGISTRY", "get_relaxation", "dense_mix", "entropy", "init_alpha", "UnknownRelaxationError"]
