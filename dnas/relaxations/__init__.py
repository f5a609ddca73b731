"""Relaxations of the discrete architecture choice; one file each, one registry entry each.

To add one: write ``dnas/relaxations/<name>.py`` with a function returning a
:class:`~dnas.relaxations.base.Relaxation`, and add it to ``REGISTRY`` below.
"""
from __future__ import annotations

import inspect
from typing import Callable

from dnas.relaxations.base import Relaxation, dense_mix, entropy, init_alpha, per_group, softmax_probs
from dnas.relaxations.darts import darts
from dnas.relaxations.drnas import drnas
from dnas.relaxations.gumbel import gdas, snas
from dnas.relaxations.pc_darts import pc_darts
from dnas.relaxations.proxyless import proxyless

REGISTRY: dict[str, Callable[..., Relaxation]] = {
    "darts": darts,
    "gdas": gdas,
    "snas": snas,
    "pc_darts": pc_darts,
    "drnas": drnas,
    "proxyless": proxyless,
}


class UnknownRelaxationError(ValueError):
    pass


def get_relaxation(name: str, space=None, **options) -> Relaxation:
    """Build relaxation ``name`` with ``options``; ``space`` is passed to factories that take it."""
    if name not in REGISTRY:
        raise UnknownRelaxationError(f"unknown relaxation {name!r}; available: {', '.join(sorted(REGISTRY))}")
    factory = REGISTRY[name]
    params = inspect.signature(factory).parameters
    bad = sorted(set(options) - set(params) - {"space"})
    if bad:
        raise ValueError(f"relaxation {name!r} has no option(s) {bad}; options: "
                         f"{sorted(p for p in params if p != 'space')}")
    if "space" in params:
        if space is None:
            raise ValueError(f"relaxation {name!r} needs the search space (get_relaxation(..., space=...))")
        options["space"] = space
    return factory(**options)


__all__ = ["Relaxation", "REGISTRY", "get_relaxation", "dense_mix", "entropy", "init_alpha", "UnknownRelaxationError"]
