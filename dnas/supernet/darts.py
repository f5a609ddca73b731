"""The DARTS CNN search space (Liu, Simonyan & Yang, ICLR 2019), described once.

A 3x3 convolution stem to ``stem_multiplier * C`` channels, ``layers`` cells with reduction cells
(channels doubled, stride 2 on the edges from the cell inputs) at 1/3 and 2/3 of the depth, global
average pooling and a linear classifier. The stem and the cell plan (every cell's input and
output widths, which cells reduce) are built by one pair of functions (:func:`darts_stem`,
:func:`darts_plan`), and three things follow from them:

* the supernet :class:`DartsSpace`: a cell's 14 edges (:data:`DARTS_EDGES`) each mix the 8 ops of
  :data:`DARTS_OPS`, two groups of α (``normal``, ``reduce``) shared by the cells of each kind;
  runs of equal cells are stacked and scanned, and a cell's edges too;
* the evaluation network a genotype names (:func:`darts_network`, ``DartsSpace.network``), what
  ``dnas train`` trains;
* the latency walk (``DartsSpace.latency_walk``).

The genotype is the label -> op mapping over the 28 edges (``"normal/0->2"`` .., ``none`` for an
edge not kept), printed as the paper's ``Genotype`` (:class:`dnas.supernet.genotype.DartsGenotype`).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dnas.backend import resolve
from dnas.loop_plan import LoopCost, work
from dnas.supernet import layers as L
from dnas.supernet.genotype import DARTS_EDGES, DARTS_OPS, DartsGenotype, derive_darts, edge_label
from dnas.supernet.mixed import MixedOp, scan_edges, take_edges, unrolled_edges
from dnas.supernet.network import Network, Output, check_options, drop_key, drop_path
from dnas.supernet.ops import candidate_ops, darts_op
from dnas.supernet.space_base import SearchSpace, check_partial

#: The DARTS paper's CIFAR-10 evaluation network.
NETWORK_DEFAULTS = {"channels": 36, "layers": 20, "stem_multiplier": 3}


class CellPlan(NamedTuple):
    """One cell's place in the network: its inputs' widths (``c_pp``: the cell before the
    previous one, ``c_p``: the previous one), its node width ``c``, whether it reduces, whether
    the previous one did, and its output width (nodes concatenated x ``c``)."""

    c_pp: int
    c_p: int
    c: int
    reduction: bool
    reduction_prev: bool
    c_out: int


def darts_stem(in_channels: int, channels: int, stem_multiplier: int) -> L.Layer:
    """3x3 convolution to ``stem_multiplier * channels`` and BN."""
    c = stem_multiplier * channels
    return L.sequential(L.conv(in_channels, c, 3, 1, 1), L.batchnorm(c, True))


def darts_plan(channels: int, layers: int, stem_multiplier: int, concat: tuple[int, int] = (4, 4)) -> list[CellPlan]:
    """The widths of every cell: reduction cells at ``layers // 3`` and ``2 * layers // 3`` (when
    ``layers >= 3``) double the node width; ``concat``: how many nodes the normal and the
    reduction cell concatenate (the supernet: all 4)."""
    c_pp = c_p = stem_multiplier * channels
    c, reduction_prev, plan = channels, False, []
    for i in range(layers):
        reduction = layers >= 3 and i in (layers // 3, 2 * layers // 3)
        if reduction:
            c *= 2
        c_out = concat[1 if reduction else 0] * c
        plan.append(CellPlan(c_pp, c_p, c, reduction, reduction_prev, c_out))
        reduction_prev = reduction
        c_pp, c_p = c_p, c_out
    return plan


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
    honours_compute_dtype = True   # every convolution through dnas.supernet.layers._conv
    name = "darts"
    op_names = DARTS_OPS
    search_defaults = {"--channels": 8, "--cells": 5}
    bench_defaults = {"--channels": 16}
    cells_option = "layers"
    #: DARTS's CIFAR evaluation (App. A.2): SGD, momentum 0.9, learning rate 0.025 cosine to 0,
    #: weight decay 3e-4, gradient-norm clip 5, batch 96, drop path 0.2 (raised linearly from 0
    #: over the epochs), cutout 16 px (DeVries & Taylor 2017) at 32x32, auxiliary head weight
    #: 0.4; 600 epochs, C=36, 20 layers
    train_protocol = {"batch_size": 96, "lr": 0.025, "nesterov": False, "weight_decay": 3e-4, "grad_clip": 5.0,
                      "drop_path": 0.2, "cutout": 16, "auxiliary_weight": 0.4, "label_smoothing": 0.0,
                      "network": NETWORK_DEFAULTS}
    has_auxiliary_head = True
    has_drop_path = True
    #: the derivation keeps two edges per node; the others read as ``none``
    dropped_op = "none"

    #: C=16, 8 cells, B=64, 32x32 on the 2-core CPU, jaxlib 0.10.2 (docs/benchmarks.md, "A short
    #: run starts stepping"): unrolled compile 540.7 s, step 12.0 s; scanned 81.6 s, 15.4 s
    cpu_loop_cost = LoopCost(work(64, (32, 32), 16, 8), fast=(540.7, 12.0), short=(81.6, 15.4),
                             measured="dnas bench --space darts --cells 8 --loops unroll|scan")

    @classmethod
    def loop_size(cls, options: dict) -> tuple[int, int]:
        return int(options.get("channels", DartsConfig.channels)), int(options.get("layers", DartsConfig.layers))

    def random_indices(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Derived-genotype-like: every intermediate node keeps two incoming edges with ops other
        than ``none``, uniformly; the other edges are ``none``."""
        out = {}
        for g, (n, k) in self.groups.items():
            none = self.group_op_names(g).index("none")
            ops = [j for j in range(k) if j != none]
            idx = np.full(n, none, np.int64)
            for d in range(2, 6):
                edges = [e for e, (_, dd) in enumerate(DARTS_EDGES) if dd == d]
                for e in rng.choice(edges, 2, replace=False):
                    idx[e] = rng.choice(ops)
            out[g] = idx
        return out

    @classmethod
    def train_protocol_for(cls, image_side: int) -> dict:
        """No auxiliary head below 24 px: it pools 5x5 windows of the maps at 2/3 depth, which
        must be at least 6x6."""
        proto = dict(cls.train_protocol)
        if image_side < 24:
            proto["auxiliary_weight"] = 0.0
        return proto

    def __init__(self, config: DartsConfig = DartsConfig()):
        self.config = cfg = config
        self.kernels = resolve(cfg.kernels)
        self.unroll_cells, self.unroll_edges, self.loop_convs = L.loop_mode(cfg.unroll, self.kernels)
        self.groups = {"normal": (len(DARTS_EDGES), len(DARTS_OPS)), "reduce": (len(DARTS_EDGES), len(DARTS_OPS))}
        self.stem = darts_stem(cfg.in_channels, cfg.channels, cfg.stem_multiplier)
        plan = darts_plan(cfg.channels, cfg.layers, cfg.stem_multiplier)
        self.cells = [_DartsCell(p.c_pp, p.c_p, p.c, p.reduction, p.reduction_prev, cfg.impl, cfg.affine,
                                 self.unroll_edges, cfg.partial_channels) for p in plan]
        check_partial([p.c for p in plan], cfg.partial_channels)
        self.classifier = L.dense(plan[-1].c_out, cfg.num_classes)
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
        return [edge_label(s, d) for s, d in DARTS_EDGES]

    def choice_point_nodes(self, group):
        return [(group, d) for _, d in DARTS_EDGES]   # a normal cell's node d is not a reduction cell's

    def derive(self, scores):
        return derive_darts(jnp.asarray(scores["normal"]), jnp.asarray(scores["reduce"]))

    @staticmethod
    def network(genotype: DartsGenotype, **options) -> Network:
        """The stand-alone network of ``genotype`` (:func:`darts_network`)."""
        check_options("darts", options, darts_network)
        return darts_network(genotype, **options)

    def latency_walk(self, input_size: int) -> tuple[list, list]:
        """Every use of every choice point with its candidates' signatures, and the fixed parts
        (:mod:`dnas.latency.space_latency`): a ``normal`` edge is used by every normal cell, the
        edges from the cell inputs of a reduction cell run at stride 2; each cell also costs its
        two preprocessing convolutions and its four node sums."""
        from dnas.latency.space_latency import ChoicePoint, fixed_part, head_layer, node_sum_part

        space, cfg = self, self.config
        hw = (input_size, input_size)
        stem = fixed_part("darts/stem", space.stem, hw + (cfg.in_channels,), (("kernel", 3),))
        fixed, points = [stem], []
        hw_pp = hw_p = stem.output_shape[:2]
        for i, cell in enumerate(space.cells):
            c_pp, c_p, c, reduction, reduction_prev = cell.signature
            group = "reduce" if reduction else "normal"
            pre0 = fixed_part("darts/preprocess_reduce" if reduction_prev else "darts/preprocess",
                              cell.pre0, hw_pp + (c_pp,), (("stride", 2 if reduction_prev else 1),))
            pre1 = fixed_part("darts/preprocess", cell.pre1, hw_p + (c_p,), (("stride", 1),))
            fixed += [pre0, pre1]
            hw_in = pre1.output_shape[:2]
            hw_out = (-(-hw_in[0] // 2), -(-hw_in[1] // 2)) if reduction else hw_in
            from_input = _darts_candidates(space, group, c, hw_in, 2 if reduction else 1)
            inner = _darts_candidates(space, group, c, hw_out, 1)
            for e, (s, d) in enumerate(DARTS_EDGES):
                points.append(ChoicePoint(group, e, f"cell{i}/edge{s}->{d}", from_input if s < 2 else inner))
            fixed += [node_sum_part("darts", hw_out + (c,), sum(1 for _, dd in DARTS_EDGES if dd == d),
                                    f"cell{i}/node{d}") for d in range(2, 6)]
            hw_pp, hw_p = hw_p, hw_out
        c_last = space.cells[-1].signature[2] * 4
        fixed.append(fixed_part("darts/head", head_layer(None, space.classifier, False), hw_p + (c_last,)))
        return points, fixed

    def running_parts(self, model, indices, runs, fixed):
        """Every intermediate node of a derived DARTS cell is part of its output, so every chosen
        op runs, except a pooling shared by two edges of a cell, which runs once."""
        from dnas.latency.space_latency import shared_pooling

        return shared_pooling(model, indices, runs), fixed


# ------------------------------------------------------------------------------ evaluation network

class _EvalCell:
    """One cell of the DARTS evaluation network (its genotype's normal or reduction cell)."""

    def __init__(self, g: DartsGenotype, c_pp: int, c_p: int, c: int, reduction: bool, reduction_prev: bool,
                 impl: str | None):
        kind = "reduce" if reduction else "normal"
        self.pairs, self.concat = g.cell(kind), g.concat(kind)
        self.pre0 = L.factorized_reduce(c_pp, c, True) if reduction_prev else L.relu_conv_bn(c_pp, c, 1, 1, 0)
        self.pre1 = L.relu_conv_bn(c_p, c, 1, 1, 0)
        strides = [2 if reduction and idx < 2 else 1 for _, idx in self.pairs]
        self.ops = [darts_op(op, c, st, affine=True, impl=impl, pool_bn=False)
                    for (op, _), st in zip(self.pairs, strides)]
        self.dropped = [not (op == "skip_connect" and st == 1) for (op, _), st in zip(self.pairs, strides)]
        self.c_out = len(self.concat) * c

    def init(self, key):
        k0, k1, k2 = jax.random.split(key, 3)
        (p0, s0), (p1, s1) = self.pre0.init(k0), self.pre1.init(k1)
        ops = [op.init(k) for op, k in zip(self.ops, jax.random.split(k2, len(self.ops)))]
        return ({"pre0": p0, "pre1": p1, "ops": tuple(p for p, _ in ops)},
                {"pre0": s0, "pre1": s1, "ops": tuple(s for _, s in ops)})

    def apply(self, p, s, s0, s1, ctx, drop, index: int):
        h0, st0 = self.pre0.apply(p["pre0"], s["pre0"], s0, ctx)
        h1, st1 = self.pre1.apply(p["pre1"], s["pre1"], s1, ctx)
        nodes, new_ops = [h0, h1], []
        for k in range(len(self.pairs) // 2):
            ys = []
            for j in (2 * k, 2 * k + 1):
                y, sj = self.ops[j].apply(p["ops"][j], s["ops"][j], nodes[self.pairs[j][1]], ctx)
                if drop is not None and self.dropped[j]:
                    y = drop_path(y, drop_key(drop, ctx, index * len(self.pairs) + j), drop.prob)
                ys.append(y)
                new_ops.append(sj)
            nodes.append(ys[0] + ys[1])
        out = jnp.concatenate([nodes[i] for i in self.concat], axis=-1)
        return out, {"pre0": st0, "pre1": st1, "ops": tuple(new_ops)}


def _aux_head(c: int, num_classes: int) -> L.Layer:
    """DARTS's CIFAR auxiliary classifier: ReLU, 5x5 average pooling at stride 3, 1x1 conv to 128
    + BN + ReLU, 2x2 conv to 768 + BN + ReLU, linear (on 8x8 maps, i.e. 32x32 inputs, the 2x2 conv
    leaves 1x1; larger maps are averaged)."""
    body = L.sequential(L.relu(), L.avg_pool(5, 3, 0), L.conv(c, 128, 1, 1, 0), L.batchnorm(128, True), L.relu(),
                        L.conv(128, 768, 2, 1, 0), L.batchnorm(768, True), L.relu())
    fc = L.dense(768, num_classes)

    def init(key):
        kb, kf = jax.random.split(key)
        (pb, sb), (pf, _) = body.init(kb), fc.init(kf)
        return {"body": pb, "fc": pf}, sb

    def apply(p, s, x, ctx):
        if min(x.shape[1:3]) < 6:
            raise ValueError(f"the auxiliary head needs feature maps of at least 6x6 after the second reduction "
                             f"cell (DARTS: 8x8 from 32x32 images); this input gives {x.shape[1]}x{x.shape[2]}: "
                             "train without it (--auxiliary-weight 0) or on larger images")
        y, s = body.apply(p["body"], s, x, ctx)
        logits, _ = fc.apply(p["fc"], (), jnp.mean(y, axis=(1, 2)), ctx)
        return logits, s

    return L.Layer(init, apply)


def darts_network(g: DartsGenotype, *, channels: int = 36, layers: int = 20, num_classes: int = 10,
                  in_channels: int = 3, stem_multiplier: int = 3, auxiliary: bool = False,
                  impl: str | None = None) -> Network:
    """The DARTS CIFAR evaluation network of ``g`` (Liu, Simonyan & Yang, ICLR 2019, Sec. 3.3 and
    App. A.2), on the supernet's stem and cell plan (:func:`darts_stem`, :func:`darts_plan`):
    L cells, reduction cells (stride 2 on the edges from the cell inputs, channels doubled) at
    L/3 and 2L/3. A cell brings its two inputs to C channels (ReLU-conv 1x1-BN, or a factorized
    reduce after a reduction cell); each intermediate node is the sum of its two genotype pairs'
    ops; the output concatenates the concat nodes. Pooling is plain pooling (the supernet's BN
    after pooling is a search-time device), BatchNorm is affine. Training regularisers of the
    paper: drop path on every op but the identity, and the auxiliary classifier after the cell at
    2L/3 (Szegedy et al. 2015; DARTS weighs it 0.4). The paper's CIFAR-10 network is C=36,
    L=20 (:data:`NETWORK_DEFAULTS`: 3.3 M parameters for DARTS-V2)."""
    stem = darts_stem(in_channels, channels, stem_multiplier)
    plan = darts_plan(channels, layers, stem_multiplier, (len(g.normal_concat), len(g.reduce_concat)))
    cells = [_EvalCell(g, p.c_pp, p.c_p, p.c, p.reduction, p.reduction_prev, impl) for p in plan]
    aux_at = 2 * layers // 3
    aux = _aux_head(plan[aux_at].c_out, num_classes) if auxiliary else None
    classifier = L.dense(plan[-1].c_out, num_classes)

    def init(key):
        keys = jax.random.split(key, layers + 3)
        params, state = {}, {}
        params["stem"], state["stem"] = stem.init(keys[0])
        inits = [cell.init(k) for cell, k in zip(cells, keys[1:])]
        params["cells"], state["cells"] = [p for p, _ in inits], [s for _, s in inits]
        if aux is not None:
            params["aux"], state["aux"] = aux.init(keys[-2])
        params["classifier"], _ = classifier.init(keys[-1])
        return params, state

    def apply(params, state, x, ctx, drop=None):
        new = {}
        x, new["stem"] = stem.apply(params["stem"], state["stem"], x, ctx)
        s0 = s1 = x
        new["cells"], aux_logits = [], None
        for i, (cell, p, s) in enumerate(zip(cells, params["cells"], state["cells"])):
            out, st = cell.apply(p, s, s0, s1, ctx, drop, i)
            s0, s1 = s1, out
            new["cells"].append(st)
            if aux is not None and i == aux_at:
                if ctx.train:
                    aux_logits, new["aux"] = aux.apply(params["aux"], state["aux"], s1, ctx)
                else:
                    new["aux"] = state["aux"]
        logits, _ = classifier.apply(params["classifier"], (), jnp.mean(s1, axis=(1, 2)), ctx)
        return Output(logits, aux_logits, new)

    config = {"space": "darts", "channels": channels, "layers": layers, "num_classes": num_classes,
              "in_channels": in_channels, "stem_multiplier": stem_multiplier, "auxiliary": auxiliary}
    return Network(init, apply, g, config)


# ------------------------------------------------------------------------------ latency

_DARTS_ATTRS = {"max_pool_3x3": (("kernel", 3),), "avg_pool_3x3": (("kernel", 3),),
                "sep_conv_3x3": (("kernel", 3),), "sep_conv_5x5": (("kernel", 5),),
                "dil_conv_3x3": (("kernel", 3), ("dilation", 2)), "dil_conv_5x5": (("kernel", 5), ("dilation", 2))}


def _darts_candidates(space, group: str, c: int, hw: tuple, stride: int) -> tuple:
    from dnas.latency.space_latency import cell_candidates
    return cell_candidates(space, "darts", group, _DARTS_ATTRS, darts_op, c, hw, stride)
