"""Search spaces: supernets whose choice points are mixed operations.

A :class:`SearchSpace` exposes

* ``groups``: ``{group_name: (num_choice_points, num_ops)}`` — one architecture matrix per
  group (DARTS: ``normal`` and ``reduce``, 14x8 each; NAS-Bench-201: ``cell``, 6x5);
* ``init(key) -> (params, state)``;
* ``apply(params, state, x, samples, mix, ctx) -> (logits, state)`` where ``samples`` maps
  each group to a pytree with a leading choice-point axis (what the relaxation produced)
  and ``mix`` is the relaxation's combination rule;
* ``derive(scores)`` -> a genotype from per-group (choice point x op) score matrices.

Cells of equal shape that follow each other are stacked and run under ``lax.scan`` (the
NAS-Bench-201 stages), and inside a cell equal edges are scanned (:func:`scan_edges`), so
the traced graph holds a handful of mixed ops instead of one per edge and cell.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dnas.backend import resolve
from dnas.supernet import layers as L
from dnas.supernet.genotype import (DARTS_EDGES, DARTS_OPS, NB201_EDGES, NB201_OPS,
                                    derive_darts, derive_nb201, parse_nb201)
from dnas.supernet.mixed import MixedOp, scan_edges, take_edges, unrolled_edges
from dnas.supernet.ops import candidate_ops
from dnas.supernet.space_base import SearchSpace, UnknownSpaceError  # noqa: F401 (re-exported)


def _check_partial(widths, k: int) -> int:
    """Validate a partial-channel factor (PC-DARTS) against the widths of the mixed edges."""
    if k < 1 or any(w % k for w in widths):
        raise ValueError(f"partial_channels={k} must divide every cell width {sorted(set(widths))}")
    return k


# ------------------------------------------------------------------------------ NAS-Bench-201

@dataclasses.dataclass(frozen=True)
class NB201Config:
    """NAS-Bench-201 supernet (Dong & Yang, ICLR 2020): stem, 3 stages of ``cells_per_stage``
    cells with ``channels``, 2x, 4x channels, separated by residual reduction blocks."""

    channels: int = 16
    cells_per_stage: int = 5
    num_classes: int = 10
    in_channels: int = 3
    impl: str | None = None
    affine: bool = False
    unroll: bool | str | None = None     # see dnas.supernet.layers.loop_mode
    partial_channels: int = 1
    kernels: str = "auto"                # dnas.backend kernel policy: auto, xla_cpu or native


def _resnet_block(c_in: int, c_out: int, stride: int) -> L.Layer:
    """NAS-Bench-201's residual reduction block: two ReLU-conv-BN 3x3 + avg-pool/1x1 shortcut."""
    conv_a = L.relu_conv_bn(c_in, c_out, 3, stride, 1, affine=True)
    conv_b = L.relu_conv_bn(c_out, c_out, 3, 1, 1, affine=True)
    short = L.sequential(L.avg_pool(2, 2, 0), L.conv(c_in, c_out, 1, 1, 0))

    def init(key):
        ka, kb, ks = jax.random.split(key, 3)
        (pa, sa), (pb, sb), (ps, ss) = conv_a.init(ka), conv_b.init(kb), short.init(ks)
        return {"a": pa, "b": pb, "short": ps}, {"a": sa, "b": sb, "short": ss}

    def apply(p, s, x, ctx):
        y, sa = conv_a.apply(p["a"], s["a"], x, ctx)
        y, sb = conv_b.apply(p["b"], s["b"], y, ctx)
        r, ss = short.apply(p["short"], s["short"], x, ctx)
        return y + r, {"a": sa, "b": sb, "short": ss}

    return L.Layer(init, apply)


class NB201Space(SearchSpace):
    name = "nb201"
    op_names = NB201_OPS

    def __init__(self, config: NB201Config = NB201Config()):
        self.config = c = config
        self.kernels = resolve(c.kernels)
        self.unroll_cells, self.unroll_edges, self.loop_convs = L.loop_mode(c.unroll, self.kernels)
        self.groups = {"cell": (len(NB201_EDGES), len(NB201_OPS))}
        self.widths = (c.channels, 2 * c.channels, 4 * c.channels)
        self.stem = L.sequential(L.conv(c.in_channels, c.channels, 3, 1, 1), L.batchnorm(c.channels, True))
        k = _check_partial(self.widths, c.partial_channels)
        self.mixed = [MixedOp(candidate_ops("nb201", NB201_OPS, w // k, 1, c.affine, c.impl)) for w in self.widths]
        self.reductions = [_resnet_block(self.widths[i], self.widths[i + 1], 2) for i in range(2)]
        self.head_bn = L.batchnorm(self.widths[-1], True)
        self.classifier = L.dense(self.widths[-1], c.num_classes)
        self._src = [s for s, _ in NB201_EDGES]
        self._dst = [d for _, d in NB201_EDGES]

    def init(self, key):
        c = self.config
        keys = iter(jax.random.split(key, 16))
        params, state = {}, {}
        params["stem"], state["stem"] = self.stem.init(next(keys))
        for i in range(3):
            cell_keys = jax.random.split(next(keys), c.cells_per_stage)
            inits = [self.mixed[i].init_stacked(k, len(NB201_EDGES)) for k in cell_keys]
            params[f"stage{i}"] = L.stack_trees([p for p, _ in inits])
            state[f"stage{i}"] = L.stack_trees([s for _, s in inits])
            if i < 2:
                params[f"reduce{i}"], state[f"reduce{i}"] = self.reductions[i].init(next(keys))
        params["head_bn"], state["head_bn"] = self.head_bn.init(next(keys))
        params["classifier"], _ = self.classifier.init(next(keys))
        return params, state

    def _cell(self, stage, params, state, x, sample, mix, ctx):
        if self.unroll_edges:  # nodes as separate arrays (see unrolled_edges: no per-edge buffer copies)
            nodes, new_state = unrolled_edges(self.mixed[stage], params, state, sample, self._src, self._dst,
                                              [x, None, None, None], mix, ctx)
            return nodes[3], new_state
        buf = jnp.zeros((4,) + x.shape, x.dtype).at[0].set(x)
        buf, new_state = scan_edges(self.mixed[stage], params, state, sample, self._src, self._dst, buf, mix, ctx,
                                    unroll=self.unroll_edges)
        return buf[3], new_state

    def apply(self, params, state, x, samples, mix, ctx):
        sample = samples["cell"]
        new_state = {}
        ctx = L.loop_ctx(L.with_kernels(ctx, self.kernels), self.loop_convs, self.unroll_edges)
        x, new_state["stem"] = self.stem.apply(params["stem"], state["stem"], x, ctx)
        for i in range(3):
            def body(h, ps, i=i):
                h, s = self._cell(i, ps[0], ps[1], h, sample, mix, ctx)
                return h, s
            x, new_state[f"stage{i}"] = L.scan(body, x, (params[f"stage{i}"], state[f"stage{i}"]),
                                               self.unroll_cells)
            if i < 2:
                x, new_state[f"reduce{i}"] = self.reductions[i].apply(
                    params[f"reduce{i}"], state[f"reduce{i}"], x, ctx)
        x, new_state["head_bn"] = self.head_bn.apply(params["head_bn"], state["head_bn"], x, ctx)
        x = jnp.mean(jax.nn.relu(x), axis=(1, 2))
        logits, _ = self.classifier.apply(params["classifier"], (), x, ctx)
        return logits, new_state

    def choice_point_names(self, group):
        return [f"{s}->{d}" for s, d in NB201_EDGES]

    def choice_point_nodes(self, group):
        return [d for _, d in NB201_EDGES]

    def derive(self, scores):
        return parse_nb201(derive_nb201(jnp.asarray(scores["cell"])))


# ------------------------------------------------------------------------------ DARTS CNN

@dataclasses.dataclass(frozen=True)
class DartsConfig:
    """DARTS CNN search network (Liu et al., ICLR 2019): a 3x3 conv stem to
    ``stem_multiplier * channels``, ``layers`` cells with reductions at 1/3 and 2/3 depth
    (channels doubled there), 4 intermediate nodes per cell concatenated as the output."""

    channels: int = 16
    layers: int = 8
    num_classes: int = 10
    in_channels: int = 3
    stem_multiplier: int = 3
    impl: str | None = None
    affine: bool = False
    unroll: bool | str | None = None     # see dnas.supernet.layers.loop_mode
    partial_channels: int = 1
    kernels: str = "auto"                # dnas.backend kernel policy: auto, xla_cpu or native


_DARTS_IN = [e for e, (s, _) in enumerate(DARTS_EDGES) if s < 2]     # edges reading the cell inputs
_DARTS_INNER = [e for e, (s, _) in enumerate(DARTS_EDGES) if s >= 2]  # edges between intermediate nodes
# edge e's position in the two groups stacked (cell inputs first): the edges' natural order
_DARTS_NATURAL = [(_DARTS_IN + _DARTS_INNER).index(e) for e in range(len(DARTS_EDGES))]


class _DartsCell:
    """A DARTS search cell: preprocess both inputs, run its 14 mixed edges, concat 4 nodes."""

    def __init__(self, c_pp, c_p, c, reduction, reduction_prev, impl, affine, unroll, k=1):
        self.reduction, self.unroll = reduction, unroll
        stride = 2 if reduction else 1
        self.pre0 = (L.factorized_reduce(c_pp, c, False) if reduction_prev
                     else L.relu_conv_bn(c_pp, c, 1, 1, 0, affine=False))
        self.pre1 = L.relu_conv_bn(c_p, c, 1, 1, 0, affine=False)
        self.mixed_in = MixedOp(candidate_ops("darts", DARTS_OPS, c // k, stride, affine, impl))
        self.mixed_inner = MixedOp(candidate_ops("darts", DARTS_OPS, c // k, 1, affine, impl))
        self.signature = (c_pp, c_p, c, reduction, reduction_prev)

    def init(self, key):
        k0, k1, k2, k3 = jax.random.split(key, 4)
        (p0, s0), (p1, s1) = self.pre0.init(k0), self.pre1.init(k1)
        pin, sin = self.mixed_in.init_stacked(k2, len(_DARTS_IN))
        pinner, sinner = self.mixed_inner.init_stacked(k3, len(_DARTS_INNER))
        return ({"pre0": p0, "pre1": p1, "in": pin, "inner": pinner},
                {"pre0": s0, "pre1": s1, "in": sin, "inner": sinner})

    def apply(self, p, s, s0, s1, sample, mix, ctx):
        h0, st0 = self.pre0.apply(p["pre0"], s["pre0"], s0, ctx)
        h1, st1 = self.pre1.apply(p["pre1"], s["pre1"], s1, ctx)
        s_in, d_in = [DARTS_EDGES[e][0] for e in _DARTS_IN], [DARTS_EDGES[e][1] - 2 for e in _DARTS_IN]
        s_inner = [DARTS_EDGES[e][0] - 2 for e in _DARTS_INNER]
        d_inner = [DARTS_EDGES[e][1] - 2 for e in _DARTS_INNER]
        if self.unroll:  # nodes as separate arrays (see unrolled_edges: no per-edge buffer copies)
            nodes, sin = unrolled_edges(self.mixed_in, p["in"], s["in"], take_edges(sample, _DARTS_IN),
                                        s_in, d_in, [None] * 4, mix, ctx, inputs=[h0, h1])
            nodes, sinner = unrolled_edges(self.mixed_inner, p["inner"], s["inner"],
                                           take_edges(sample, _DARTS_INNER), s_inner, d_inner, nodes, mix, ctx)
            out = jnp.concatenate(nodes, axis=-1)
            return out, {"pre0": st0, "pre1": st1, "in": sin, "inner": sinner}
        b, hh, ww, c = h1.shape
        if not self.reduction:
            # all 14 edges have stride 1: one scan over them in their natural order (a node is
            # complete before an edge reads it) on a buffer whose nodes 0 and 1 are the cell's
            # inputs, so the cell traces one mixed op instead of two. On the 8-cell DARTS
            # network: XLA compile 102 -> 76 s on CPU, same step (docs/benchmarks.md)
            pe, se = take_edges(jax.tree_util.tree_map(lambda a, b_: jnp.concatenate([a, b_]),
                                                       (p["in"], s["in"]), (p["inner"], s["inner"])),
                                _DARTS_NATURAL)
            buf = jnp.zeros((6, b, hh, ww, c), h1.dtype).at[0].set(h0).at[1].set(h1)
            buf, snew = scan_edges(self.mixed_inner, pe, se, sample, [e[0] for e in DARTS_EDGES],
                                   [e[1] for e in DARTS_EDGES], buf, mix, ctx)
            out = jnp.concatenate([buf[i] for i in range(2, 6)], axis=-1)
            return out, {"pre0": st0, "pre1": st1, "in": take_edges(snew, _DARTS_IN),
                         "inner": take_edges(snew, _DARTS_INNER)}
        # a reduction cell: its input edges (stride 2) and inner edges (stride 1) scanned apart
        inputs = jnp.stack([h0, h1])
        hh, ww = (hh + 1) // 2, (ww + 1) // 2
        buf = jnp.zeros((4, b, hh, ww, c), h1.dtype)
        buf, sin = scan_edges(self.mixed_in, p["in"], s["in"], take_edges(sample, _DARTS_IN), s_in, d_in,
                              buf, mix, ctx, in_buf=inputs)
        buf, sinner = scan_edges(self.mixed_inner, p["inner"], s["inner"], take_edges(sample, _DARTS_INNER),
                                 s_inner, d_inner, buf, mix, ctx)
        out = jnp.concatenate([buf[i] for i in range(4)], axis=-1)
        return out, {"pre0": st0, "pre1": st1, "in": sin, "inner": sinner}


class DartsSpace(SearchSpace):
    name = "darts"
    op_names = DARTS_OPS

    def __init__(self, config: DartsConfig = DartsConfig()):
        self.config = cfg = config
        self.kernels = resolve(cfg.kernels)
        self.unroll_cells, self.unroll_edges, self.loop_convs = L.loop_mode(cfg.unroll, self.kernels)
        self.groups = {"normal": (len(DARTS_EDGES), len(DARTS_OPS)), "reduce": (len(DARTS_EDGES), len(DARTS_OPS))}
        c_curr = cfg.stem_multiplier * cfg.channels
        self.stem = L.sequential(L.conv(cfg.in_channels, c_curr, 3, 1, 1), L.batchnorm(c_curr, True))
        c_pp, c_p, c_curr = c_curr, c_curr, cfg.channels
        self.cells, reduction_prev = [], False
        for i in range(cfg.layers):
            reduction = cfg.layers >= 3 and i in (cfg.layers // 3, 2 * cfg.layers // 3)
            if reduction:
                c_curr *= 2
            self.cells.append(_DartsCell(c_pp, c_p, c_curr, reduction, reduction_prev, cfg.impl, cfg.affine,
                                         self.unroll_edges, cfg.partial_channels))
            reduction_prev = reduction
            c_pp, c_p = c_p, 4 * c_curr
        _check_partial([c.signature[2] for c in self.cells], cfg.partial_channels)
        self.classifier = L.dense(c_p, cfg.num_classes)
        # runs of consecutive cells with identical structure are scanned (traced once)
        self.runs: list[list[int]] = []
        for i, cell in enumerate(self.cells):
            if self.runs and self.cells[self.runs[-1][-1]].signature == cell.signature:
                self.runs[-1].append(i)
            else:
                self.runs.append([i])

    def init(self, key):
        keys = jax.random.split(key, len(self.cells) + 2)
        params, state = {}, {}
        params["stem"], state["stem"] = self.stem.init(keys[0])
        for r, run in enumerate(self.runs):
            inits = [self.cells[i].init(keys[1 + i]) for i in run]
            params[f"cells{r}"] = L.stack_trees([p for p, _ in inits])
            state[f"cells{r}"] = L.stack_trees([s for _, s in inits])
        params["classifier"], _ = self.classifier.init(keys[-1])
        return params, state

    def apply(self, params, state, x, samples, mix, ctx):
        new_state = {}
        ctx = L.loop_ctx(L.with_kernels(ctx, self.kernels), self.loop_convs, self.unroll_edges)
        x, new_state["stem"] = self.stem.apply(params["stem"], state["stem"], x, ctx)
        s0 = s1 = x
        for r, run in enumerate(self.runs):
            cell = self.cells[run[0]]
            sample = samples["reduce" if cell.reduction else "normal"]

            def body(carry, ps, cell=cell, sample=sample):
                a, b = carry
                out, st = cell.apply(ps[0], ps[1], a, b, sample, mix, ctx)
                return (b, out), st

            if len(run) == 1:
                one = jax.tree_util.tree_map(lambda a: a[0], (params[f"cells{r}"], state[f"cells{r}"]))
                (s0, s1), st = body((s0, s1), one)
                new_state[f"cells{r}"] = jax.tree_util.tree_map(lambda a: a[None], st)
            else:
                (s0, s1), new_state[f"cells{r}"] = L.scan(body, (s0, s1), (params[f"cells{r}"], state[f"cells{r}"]),
                                                         self.unroll_cells)
        x = jnp.mean(s1, axis=(1, 2))
        logits, _ = self.classifier.apply(params["classifier"], (), x, ctx)
        return logits, new_state

    def choice_point_names(self, group):
        return [f"{s}->{d}" for s, d in DARTS_EDGES]

    def choice_point_nodes(self, group):
        return [d for _, d in DARTS_EDGES]

    def derive(self, scores):
        return derive_darts(jnp.asarray(scores["normal"]), jnp.asarray(scores["reduce"]))


# ------------------------------------------------------------------------------ registry

from dnas.supernet.chain import ChainConfig, ChainSpace  # noqa: E402

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


def takes_option(space: str, option: str) -> bool:
    """Whether the space called ``space`` can be built with ``option`` (a config field of a
    built-in space, a parameter of a user's factory)."""
    if space in SPACES:
        return option in {f.name for f in dataclasses.fields(SPACES[space][1])}
    import inspect
    factory = space_factory(space)
    try:
        return callable(factory) and option in inspect.signature(factory).parameters
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
    bad = sorted(set(options) - {"in_channels", "num_classes"})
    if bad:
        raise ValueError(f"space options {bad} apply to spaces built by name; a {type(obj).__name__} object "
                         "is already built")
    if isinstance(obj, SearchSpace):
        return obj
    if _is_nnx_module(obj) or callable(obj):
        from dnas.supernet.nnx_space import NNXSpace
        return NNXSpace(obj, num_classes=options.get("num_classes"))   # in_channels: the model's own layers
    raise TypeError(f"{name or 'the space'}: expected a SearchSpace, a Flax NNX model or a factory of one, "
                    f"got {type(obj).__name__}")


def space_label(space) -> str:
    """A name for a space argument, for configs and titles: the name itself, or the object's
    class name."""
    if isinstance(space, str):
        return space
    return getattr(space, "name", None) or getattr(space, "__name__", None) or type(space).__name__
