"""Relaxations of the discrete architecture choice; one file each, one registry entry each.

To add one to dnas: write ``dnas/relaxations/<name>.py`` with a function returning a
:class:`~dnas.relaxations.base.Relaxation`, and add it to ``REGISTRY`` below. From user code,
without editing dnas: :func:`dnas.plugins.register_relaxation`, the ``dnas.relaxations``
entry-point group, or an import spec ``"my_pkg.relax:factory"`` as the name.
"""
from __future__ import annotations

import inspect
from typing import Callable

from dnas.relaxations.base import Relaxation, dense_mix, entropy, init_alpha, per_group, softmax_probs
from dnas.relaxations.darts import darts
from dnas.relaxations.drnas import drnas
from dnas.relaxations.fair_darts import fair_darts
from dnas.relaxations.gumbel import gdas, snas
from dnas.relaxations.pc_darts import pc_darts
from dnas.relaxations.proxyless import proxyless

REGISTRY: dict[str, Callable[..., Relaxation]] = {
    "darts": darts,
    "gdas": gdas,
    "snas": snas,
    "pc_darts": pc_darts,
    "drnas": drnas,
    "fair_darts": fair_darts,
    "proxyless": proxyless,
}


class UnknownRelaxationError(ValueError):
    pass


def relaxation_factory(name):
    """The factory of relaxation ``name``: a registered name, an entry point of group
    ``dnas.relaxations``, or an import spec ``"package.module:factory"`` (:mod:`dnas.plugins`)."""
    from dnas import plugins
    factory = REGISTRY.get(name) if isinstance(name, str) else None
    if factory is None and plugins.is_spec(name):
        factory = plugins.load_spec(name, "relaxation")
    if factory is None and isinstance(name, str):
        factory = plugins.entry_point(plugins.RELAXATION_GROUP, name)
    if factory is None or not callable(factory):
        known = sorted(REGISTRY) + plugins.entry_point_names(plugins.RELAXATION_GROUP)
        raise UnknownRelaxationError(f"unknown relaxation {name!r}; available: {', '.join(known)} "
                                     "(or an import spec 'package.module:factory')")
    return factory


def _checked_options(factory, name, options: dict) -> dict:
    params = inspect.signature(factory).parameters
    bad = sorted(set(options) - set(params) - {"space"})
    if bad:
        raise ValueError(f"relaxation {name!r} has no option(s) {bad}; options: "
                         f"{sorted(p for p in params if p != 'space')}")
    from dnas.options import coerce_options
    return coerce_options(factory, options, f"relaxation {name!r}")


def partial_channels(name, **options) -> int:
    """``K`` of a relaxation whose candidate ops run on ``1/K`` of the channels (PC-DARTS), read
    before the search space is built, so that the space is built once, narrow: the factory names
    the option that gives ``K`` in its attribute ``partial_channels_option`` (PC-DARTS: ``"k"``),
    whose value is ``options``' or the factory's default. 1 for a factory that names none."""
    factory = relaxation_factory(name)
    return _declared_partial_channels(factory, name, _checked_options(factory, name, options))


def _declared_partial_channels(factory, name, options: dict) -> int:
    option = getattr(factory, "partial_channels_option", None)
    if option is None:
        return 1
    if option in options:
        return int(options[option])
    param = inspect.signature(factory).parameters.get(option)
    if param is None:
        raise ValueError(f"relaxation {name!r}: its partial_channels_option {option!r} is not an option of its "
                         "factory")
    default = param.default
    if default is inspect.Parameter.empty:
        raise ValueError(f"relaxation {name!r} needs the option {option!r}")
    return int(default)


def get_relaxation(name: str, space=None, **options) -> Relaxation:
    """Build relaxation ``name`` with ``options``; ``space`` is passed to factories that take it.
    ``name``: a registered name, an entry point of group ``dnas.relaxations``, or an import spec
    ``"package.module:factory"`` (:mod:`dnas.plugins`)."""
    factory = relaxation_factory(name)
    options = _checked_options(factory, name, options)
    if "space" in inspect.signature(factory).parameters:
        if space is None:
            raise ValueError(f"relaxation {name!r} needs the search space (get_relaxation(..., space=...))")
        options["space"] = space
    relax = factory(**options)
    if not isinstance(relax, Relaxation):
        raise UnknownRelaxationError(f"relaxation {name!r}: its factory returned {type(relax).__name__}, "
                                     "not a dnas.relaxations.Relaxation")
    declared = _declared_partial_channels(factory, name, options)
    if relax.partial_channels != declared:
        raise ValueError(f"relaxation {name!r} runs its candidate ops on 1/{relax.partial_channels} of the channels, "
                         f"but its factory declares 1/{declared} before the space is built: its attribute "
                         "partial_channels_option must name the option that gives K (docs/relaxations.md)")
    return relax


__all__ = ["Relaxation", "REGISTRY", "get_relaxation", "partial_channels", "relaxation_factory", "dense_mix", "entropy", "init_alpha", "UnknownRelaxationError"]
