"""Spaces and relaxations from user code: no edit of dnas needed.

A search space or a relaxation is found by

* a built-in name (``nb201``, ``darts``; see :mod:`dnas.supernet.spaces`, :mod:`dnas.relaxations`);
* a name registered from Python, :func:`register_space` / :func:`register_relaxation`;
* a name published by an installed package under the entry-point groups ``dnas.spaces`` /
  ``dnas.relaxations`` (``[project.entry-points."dnas.relaxations"] mine = "my_pkg.relax:factory"``);
* an import spec ``"my_pkg.module:attribute"`` (``dnas search --space my_pkg.spaces:net
  --relaxation my_pkg.relax:factory``); modules of the working directory are found too.

A space factory takes keyword options and returns a
:class:`~dnas.supernet.space_base.SearchSpace` or a Flax NNX model with choice points
(:mod:`dnas.nnx`); it receives ``in_channels`` and ``num_classes`` of the data if it accepts
them (or ``**options``), plus the user's ``--space-option`` values. A relaxation factory returns a
:class:`~dnas.relaxations.base.Relaxation`; it receives the space if it takes a ``space`` argument.
Candidate ops need no registry: in a user's space any Flax module is a candidate of a
:class:`dnas.nnx.Choice`.
"""
from __future__ import annotations

import importlib
import inspect
from importlib import metadata
from typing import Any, Callable

SPACE_GROUP, RELAXATION_GROUP = "dnas.spaces", "dnas.relaxations"

#: Spaces registered from Python (name -> factory).
USER_SPACES: dict[str, Callable[..., Any]] = {}


class PluginError(ValueError):
    """A spec or registered name that cannot be loaded, or that loads the wrong kind of object."""


def is_spec(name: Any) -> bool:
    """Whether ``name`` is an import spec ``module:attribute``."""
    return isinstance(name, str) and ":" in name


def load_spec(spec: str, what: str) -> Any:
    """Import ``module:attribute`` (dotted attribute paths allowed); errors name the spec."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise PluginError(f"{what} {spec!r}: expected 'package.module:attribute'")
    import os
    import sys
    if os.getcwd() not in sys.path and "" not in sys.path:   # as `python -m` would: modules of the working directory
        sys.path.append(os.getcwd())
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise PluginError(f"{what} {spec!r}: cannot import module {module_name!r} ({e})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise PluginError(f"{what} {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def entry_point(group: str, name: str) -> Any | None:
    """The object an installed package publishes as ``name`` in entry-point ``group``, or None."""
    for ep in metadata.entry_points(group=group):
        if ep.name == name:
            return ep.load()
    return None


def entry_point_names(group: str) -> list[str]:
    return sorted(ep.name for ep in metadata.entry_points(group=group))


def register_space(name: str, factory: Callable[..., Any]) -> None:
    """Make ``name`` a search space for :func:`dnas.searcher.make_searcher` and ``dnas search --space``."""
    from dnas.supernet.spaces import SPACES
    if not isinstance(name, str) or not name or is_spec(name):
        raise PluginError(f"space name {name!r} must be a non-empty string without ':'")
    if name in SPACES:
        raise PluginError(f"{name!r} is a built-in space; choose another name")
    if not callable(factory):
        raise PluginError(f"space {name!r}: the factory is not callable")
    USER_SPACES[name] = factory


def register_relaxation(name: str, factory: Callable[..., Any]) -> None:
    """Make ``name`` a relaxation for ``make_searcher`` and ``dnas search --relaxation``."""
    from dnas.relaxations import REGISTRY
    if not isinstance(name, str) or not name or is_spec(name):
        raise PluginError(f"relaxation name {name!r} must be a non-empty string without ':'")
    if not callable(factory):
        raise PluginError(f"relaxation {name!r}: the factory is not callable")
    REGISTRY[name] = factory


def call_with_options(factory: Callable, options: dict, what: str, data_options=("in_channels", "num_classes")):
    """``factory(**options)``, passing the data's options only if the factory takes them; an
    option the factory does not take is an error naming the options it does take."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return factory(**options)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return factory(**options)
    bad = sorted(set(options) - set(params) - set(data_options))
    if bad:
        raise PluginError(f"{what} has no option(s) {bad}; options: {sorted(params)}")
    from dnas.options import coerce_options
    return factory(**coerce_options(factory, {k: v for k, v in options.items() if k in params}, what))
