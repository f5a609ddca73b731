"""Search spaces: the registry of built-in spaces and the way a name, an import spec or an object
becomes a :class:`SearchSpace`.

A :class:`SearchSpace` exposes

* ``groups``: ``{group_name: (num_choice_points, num_ops)}`` — one architecture matrix per
  group (DARTS: ``normal`` and ``reduce``, 14x8 each; NAS-Bench-201: ``cell``, 6x5);
* ``init(key) -> (params, state)``;
* ``apply(params, state, x, samples, mix, ctx) -> (logits, state)`` where ``samples`` maps
  each group to a pytree with a leading choice-point axis (what the relaxation produced)
  and ``mix`` is the relaxation's combination rule;
* ``derive(scores)`` -> a genotype from per-group (choice point x op) score matrices;
* optionally ``network(genotype, **options)`` (the stand-alone network ``dnas train`` trains)
  and ``latency_walk(input_size)`` (the latency model's walk).

Each built-in space is one module that states its network once and derives the supernet, the
stand-alone network and the latency walk from it: :mod:`dnas.supernet.nb201`,
:mod:`dnas.supernet.darts`, :mod:`dnas.supernet.chain` (``docs/spaces.md``).
"""
from __future__ import annotations

import dataclasses


from dnas.supernet.chain import ChainConfig, ChainSpace
from dnas.supernet.darts import DartsConfig, DartsSpace  # noqa: F401 (re-exported)
from dnas.supernet.nb201 import NB201Config, NB201Space  # noqa: F401 (re-exported)
from dnas.supernet.space_base import SearchSpace, UnknownSpaceError  # noqa: F401 (re-exported)


# ------------------------------------------------------------------------------ registry

SPACES = {"nb201": (NB201Space, NB201Config), "darts": (DartsSpace, DartsConfig),
          "chain": (ChainSpace, ChainConfig)}


def build_space(name, **options) -> SearchSpace:
    """Build a search space with config overrides (unknown options are errors).

    ``name`` is a built-in name (:data:`SPACES`), a name registered from user code or published
    under the ``dnas.spaces`` entry points, an import spec ``"pkg.module:attribute"``
    (:mod:`dnas.plugins`), or an object: a :class:`SearchSpace`, a Flax NNX model with choice
    points or a factory ``rngs -> model`` (:class:`~dnas.supernet.nnx_space.NNXSpace`). For
    objects only the data's ``in_channels`` / ``num_classes`` may be given (as checks)."""
    if not isinstance(name, str):
        return as_space(name, options)
    if name in SPACES:
        cls, config_cls = SPACES[name]
        fields = {f.name for f in dataclasses.fields(config_cls)}
        bad = sorted(set(options) - fields)
        if bad:
            raise ValueError(f"search space {name!r} has no option(s) {bad}; options: {sorted(fields)}")
        return cls(config_cls(**options))
    factory = space_factory(name)
    if isinstance(factory, SearchSpace) or _is_nnx_module(factory):
        return as_space(factory, options, name)
    from dnas import plugins
    built = plugins.call_with_options(factory, dict(options), f"search space {name!r}")
    data = {k: v for k, v in options.items() if k in ("in_channels", "num_classes")}
    return as_space(built, data, name)


def space_factory(name: str):
    """What a space name that is not built in stands for: a space registered from user code, an
    import spec's object, or an installed package's ``dnas.spaces`` entry point (a factory, a
    :class:`SearchSpace` or a model); an unknown name is an :class:`UnknownSpaceError`."""
    from dnas import plugins
    factory = plugins.USER_SPACES.get(name)
    if factory is None and plugins.is_spec(name):
        factory = plugins.load_spec(name, "search space")
    if factory is None:
        factory = plugins.entry_point(plugins.SPACE_GROUP, name)
    if factory is None:
        known = sorted(SPACES) + sorted(plugins.USER_SPACES) + plugins.entry_point_names(plugins.SPACE_GROUP)
        raise UnknownSpaceError(f"unknown search space {name!r}; available: {', '.join(known)} "
                                "(or an import spec 'package.module:attribute')")
    return factory


def takes_option(space, option: str) -> bool:
    """Whether ``space`` can be built with ``option``: a config field of a built-in space, a
    parameter of a user's factory (named, or passed as an object: a model factory
    ``rngs -> model`` that takes ``partial_channels``, say)."""
    if isinstance(space, str) and space in SPACES:
        return option in {f.name for f in dataclasses.fields(SPACES[space][1])}
    factory = space_factory(space) if isinstance(space, str) else space
    if isinstance(factory, SearchSpace) or _is_nnx_module(factory):
        return False
    return _has_parameter(factory, option)


def _has_parameter(fn, name: str) -> bool:
    """Whether ``fn`` (a function, or a class: its ``__init__``, as Flax's module metaclass hides
    the constructor's signature) names the parameter ``name``."""
    import inspect
    try:
        return callable(fn) and name in inspect.signature(fn.__init__ if isinstance(fn, type) else fn).parameters
    except (TypeError, ValueError):
        return False


def _is_nnx_module(obj) -> bool:
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover - flax is a dependency
        return False
    return isinstance(obj, nnx.Module)


def as_space(obj, options: dict | None = None, name: str | None = None) -> SearchSpace:
    """``obj`` as a :class:`SearchSpace`: itself, or a Flax NNX model (or a factory ``rngs ->
    model``) wrapped in :class:`~dnas.supernet.nnx_space.NNXSpace`."""
    options = dict(options or {})
    allowed = {"in_channels", "num_classes"}
    if takes_option(obj, "partial_channels"):   # a model factory that builds PC-DARTS's narrow candidates
        allowed.add("partial_channels")
    bad = sorted(set(options) - allowed)
    if bad:
        raise ValueError(f"space options {bad} apply to spaces built by name; a {type(obj).__name__} object "
                         "is already built")
    if isinstance(obj, SearchSpace):
        return obj
    if _is_nnx_module(obj) or callable(obj):
        from dnas.supernet.nnx_space import NNXSpace
        if "partial_channels" in options:   # a factory rngs -> model that builds PC-DARTS's narrow candidates
            import functools
            obj = functools.partial(obj, partial_channels=options["partial_channels"])
        return NNXSpace(obj, num_classes=options.get("num_classes"))   # in_channels: the model's own layers
    raise TypeError(f"{name or 'the space'}: expected a SearchSpace, a Flax NNX model or a factory of one, "
                    f"got {type(obj).__name__}")


def space_label(space) -> str:
    """A name for a space argument, for configs and titles: the name itself, or the object's
    class name."""
    if isinstance(space, str):
        return space
    return getattr(space, "name", None) or getattr(space, "__name__", None) or type(space).__name__
