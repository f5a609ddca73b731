"""The DARTS CNN search space (Liu, Simonyan & Yang, ICLR 2019), declared once as a Flax NNX model.

:class:`DartsNet` is the network: a 3x3 convolution stem to ``stem_multiplier * C`` channels,
``layers`` cells with reduction cells (channels doubled, stride 2 on the edges from the cell
inputs) at 1/3 and 2/3 of the depth, global average pooling and a linear classifier. A cell
brings its two inputs (the two cells before it) to C channels; each of its four intermediate
nodes sums one edge from every node before it; its output concatenates the nodes. Each of a
cell's 14 edges ``s->d`` (:data:`DARTS_EDGES`) is a :class:`~dnas.nnx.Choice` among the 8 ops of
:data:`DARTS_OPS`, labelled ``"normal/s->d"`` or ``"reduce/s->d"`` (shared by the cells of a
kind, as in DARTS), a row of the α matrix ``normal`` or ``reduce``, and an incoming edge of its
node that keeps two edges (DARTS's derivation). The widths of every cell come from
:func:`darts_plan`. Everything else follows from the model:

* the supernet :class:`DartsSpace` (:class:`~dnas.supernet.nnx_space.NNXSpace` of the model;
  under ``--loops scan`` or natively a cell's edges run as loops,
  :func:`dnas.nnx.edge_loop`);
* the evaluation network a genotype names (:func:`darts_network`): :func:`dnas.fix` of the
  model built for evaluation (affine BatchNorm, plain pooling, drop path, the auxiliary head),
  what ``dnas train`` trains;
* the latency walk (:meth:`DartsSpace.latency_walk`), its parts built from the model's modules.

The genotype is the label -> op mapping over the 28 edges (``none`` for an edge not kept),
printed as the paper's ``Genotype`` (:class:`dnas.supernet.genotype.DartsGenotype`).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dnas.backend import resolve
from dnas.loop_plan import LoopCost, work
from dnas.nnx import Choice, DropPath, Identity, Zero, edge_loop, node_sum
from dnas.supernet.context import loop_mode
from dnas.supernet.genotype import DARTS_EDGES, DARTS_OPS, DartsGenotype, derive_darts, edge_label
from dnas.supernet.network import Network, check_options
from dnas.supernet.nnx_kernels import HE_NORMAL, PooledLinear, ReLUConvBN, TorchBatchNorm, torch_linear
from dnas.supernet.nnx_space import NNXSpace, fixed_network, module_layer
from dnas.supernet.space_base import check_partial

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
    (channels doubled there), 4 intermediate nodes per cell concatenated as the output.
    ``affine``: the cells' BatchNorm has a scale and bias (off in the search, as in DARTS's
    search code). ``unroll``: a cell's edges unrolled (``True``) or run as loops (``False``;
    ``"scan_cells"`` unrolls them too: the cells are never scanned), ``None`` the kernel
    policy's choice (:func:`dnas.supernet.context.loop_mode`). ``impl`` is accepted for a
    uniform interface: the convolutions' formulation is the kernel policy's."""

    channels: int = 16
    layers: int = 8
    num_classes: int = 10
    in_channels: int = 3
    stem_multiplier: int = 3
    impl: str | None = None
    affine: bool = False
    unroll: bool | str | None = None     # see dnas.supernet.context.loop_mode
    partial_channels: int = 1
    kernels: str = "auto"                # dnas.backend kernel policy: auto, xla_cpu or native


# ------------------------------------------------------------------------------ the model

def _conv(c_in, c_out, k, rngs, stride=1, dilation=1, groups=1, padding=None) -> nnx.Conv:
    """A bias-free ``k``x``k`` convolution, He-initialised, padded to keep the size at stride 1."""
    pad = dilation * (k - 1) // 2 if padding is None else padding
    return nnx.Conv(c_in, c_out, (k, k), strides=stride, padding=[(pad, pad)] * 2, kernel_dilation=dilation,
                    feature_group_count=groups, use_bias=False, kernel_init=HE_NORMAL, rngs=rngs)


class DilConv(nnx.Module):
    """ReLU, depthwise ``k``x``k`` convolution (dilation ``dilation``), pointwise convolution,
    BatchNorm: DARTS's ``dil_conv`` (and half of its ``sep_conv``)."""

    def __init__(self, c, k, rngs, stride=1, dilation=1, affine=False):
        self.dw = _conv(c, c, k, rngs, stride, dilation, groups=c)
        self.pw, self.bn = _conv(c, c, 1, rngs), TorchBatchNorm(c, rngs, affine=affine)

    def __call__(self, x):
        return self.bn(self.pw(self.dw(jax.nn.relu(x))))


class SepConv(nnx.Module):
    """DARTS's separable convolution: the dilation-1 :class:`DilConv` unit twice, the first at
    ``stride``."""

    def __init__(self, c, k, rngs, stride=1, affine=False):
        self.a, self.b = DilConv(c, k, rngs, stride, affine=affine), DilConv(c, k, rngs, affine=affine)

    def __call__(self, x):
        return self.b(self.a(x))


class FactorizedReduce(nnx.Module):
    """ReLU, two 1x1 stride-2 convolutions on grids offset by one pixel, concatenated, BatchNorm:
    a skip connection at stride 2, and the preprocessing of a cell after a reduction cell."""

    def __init__(self, c_in, c_out, rngs, affine=False):
        self.a, self.b = _conv(c_in, c_out // 2, 1, rngs, 2), _conv(c_in, c_out // 2, 1, rngs, 2)
        self.bn = TorchBatchNorm(c_out, rngs, affine=affine)

    def __call__(self, x):
        x = jax.nn.relu(x)
        shifted = jnp.pad(x[:, 1:, 1:], ((0, 0), (0, 1), (0, 1), (0, 0)))
        return self.bn(jnp.concatenate([self.a(x), self.b(shifted)], axis=-1))


class Pool(nnx.Module):
    """3x3 max or average pooling (padding 1; the average over the window's pixels inside the
    image), followed in the search cells by an affine-free BatchNorm (DARTS's search code; the
    evaluation network pools plainly: ``bn=False``)."""

    def __init__(self, kind, c, rngs, stride=1, bn=True):
        self.kind, self.stride = kind, stride
        self.bn = TorchBatchNorm(c, rngs, affine=False) if bn else None

    def __call__(self, x):
        s, pad = (self.stride,) * 2, ((1, 1), (1, 1))
        if self.kind == "max":
            y = nn.max_pool(x, (3, 3), strides=s, padding=pad)
        else:
            y = nn.avg_pool(x, (3, 3), strides=s, padding=pad, count_include_pad=False)
        return y if self.bn is None else self.bn(y)


def darts_op(name: str, c: int, stride: int, rngs: nnx.Rngs, affine: bool = False, pool_bn: bool = True) -> nnx.Module:
    """One DARTS candidate op on ``c`` channels at ``stride`` (a skip at stride 2 is a
    factorized reduce); ``affine``: the BatchNorms' scale and bias (the evaluation network's);
    ``pool_bn``: pooling followed by a BatchNorm (the search cells')."""
    if name == "none":
        return Zero(stride)
    if name in ("max_pool_3x3", "avg_pool_3x3"):
        return Pool(name[:3], c, rngs, stride, bn=pool_bn)
    if name == "skip_connect":
        return Identity() if stride == 1 else FactorizedReduce(c, c, rngs, affine)
    if name in ("sep_conv_3x3", "sep_conv_5x5"):
        return SepConv(c, int(name[-1]), rngs, stride, affine)
    if name in ("dil_conv_3x3", "dil_conv_5x5"):
        return DilConv(c, int(name[-1]), rngs, stride, 2, affine)
    from dnas.supernet.ops import UnknownOpError
    raise UnknownOpError(f"unknown DARTS operation {name!r}; valid operations are: {', '.join(DARTS_OPS)}")


class Evaluation(NamedTuple):
    """What the evaluation network adds to the search network: the nodes each kind of cell
    concatenates (the genotype's), the auxiliary head, and the chosen op of every edge label
    (``choices``: the cells then hold these ops where the search network holds its choice
    points, which is what :func:`dnas.fix` of the search form gives, built without the
    candidates that are not chosen)."""

    concat: tuple[tuple[int, ...], tuple[int, ...]] = ((2, 3, 4, 5), (2, 3, 4, 5))
    auxiliary: bool = False
    choices: Mapping[str, str] | None = None


class Cell(nnx.Module):
    """A DARTS cell of ``plan``: both inputs preprocessed to ``c`` channels (a factorized reduce
    after a reduction cell), the 14 edges (stride 2 from the inputs of a reduction cell), the
    concat nodes concatenated. Each edge is a :class:`~dnas.nnx.Choice` among the DARTS ops,
    built for ``c / partial_channels`` channels (PC-DARTS, Xu et al., ICLR 2020, eq. 2, runs
    them on that part of the node), labelled ``"<kind>/s->d"``, a row of the group ``<kind>``,
    an edge of node ``"<kind>/d"`` that keeps 2 edges. ``loop_edges``: a normal cell's 14 edges
    run as one loop, a reduction cell's as two (those from the inputs at stride 2, the others),
    :func:`dnas.nnx.edge_loop`. ``evaluation``: affine BatchNorm, plain pooling and drop path
    on every op but the identity (the evaluation network, DARTS App. A.2)."""

    def __init__(self, plan: "CellPlan", rngs: nnx.Rngs, affine: bool = False, partial_channels: int = 1,
                 loop_edges: bool = False, evaluation: Evaluation | None = None, concat: tuple = (2, 3, 4, 5)):
        kind = "reduce" if plan.reduction else "normal"
        c, ev = plan.c, evaluation is not None
        self.reduction, self.loop_edges = plan.reduction, loop_edges
        self.concat = concat
        self.pre0 = (FactorizedReduce(plan.c_pp, c, rngs, affine) if plan.reduction_prev
                     else ReLUConvBN(plan.c_pp, c, 1, rngs, affine=affine))
        self.pre1 = ReLUConvBN(plan.c_p, c, 1, rngs, affine=affine)
        def op(name, s):
            return darts_op(name, c // partial_channels, 2 if plan.reduction and s < 2 else 1, rngs, affine,
                            pool_bn=not ev)

        if ev and evaluation.choices is not None:
            self.edges = nnx.List([op(evaluation.choices[f"{kind}/{edge_label(s, d)}"], s) for s, d in DARTS_EDGES])
        else:
            self.edges = nnx.List([Choice({name: op(name, s) for name in DARTS_OPS}, label=f"{kind}/{edge_label(s, d)}",
                                          node=f"{kind}/{d}", keep=2, group=kind) for s, d in DARTS_EDGES])
        self.drop = DropPath(rngs) if ev else None

    def _edge(self, e: int, x):
        op = self.edges[e]
        y = op(x)
        if self.drop is not None and not isinstance(op, (Identity, Zero, Choice)):
            y = self.drop(y)
        return y

    def __call__(self, s0, s1):
        h0, h1 = self.pre0(s0), self.pre1(s1)
        if self.loop_edges:
            return self._looped(h0, h1)
        nodes = [h0, h1]
        for d in range(2, 6):
            nodes.append(node_sum([self._edge(e, nodes[s]) for e, (s, dd) in enumerate(DARTS_EDGES) if dd == d]))
        return jnp.concatenate([nodes[i] for i in self.concat], axis=-1)

    def _looped(self, h0, h1):
        edges = list(self.edges)
        if not self.reduction:   # in their natural order on a buffer whose nodes 0 and 1 are the inputs
            buf = jnp.zeros((6,) + h1.shape, h1.dtype).at[0].set(h0).at[1].set(h1)
            buf = edge_loop(edges, [s for s, _ in DARTS_EDGES], [d for _, d in DARTS_EDGES], buf)
            return jnp.concatenate([buf[i] for i in self.concat], axis=-1)
        b, h, w, c = h1.shape
        buf = jnp.zeros((4, b, (h + 1) // 2, (w + 1) // 2, c), h1.dtype)
        buf = edge_loop([edges[e] for e in _FROM_INPUTS], [DARTS_EDGES[e][0] for e in _FROM_INPUTS],
                        [DARTS_EDGES[e][1] - 2 for e in _FROM_INPUTS], buf, inputs=jnp.stack([h0, h1]))
        buf = edge_loop([edges[e] for e in _INNER], [DARTS_EDGES[e][0] - 2 for e in _INNER],
                        [DARTS_EDGES[e][1] - 2 for e in _INNER], buf)
        return jnp.concatenate([buf[i - 2] for i in self.concat], axis=-1)


_FROM_INPUTS = [e for e, (s, _) in enumerate(DARTS_EDGES) if s < 2]    # edges reading the cell inputs
_INNER = [e for e, (s, _) in enumerate(DARTS_EDGES) if s >= 2]         # edges between intermediate nodes


class AuxHead(nnx.Module):
    """DARTS's CIFAR auxiliary classifier (Szegedy et al. 2015): ReLU, 5x5 average pooling at
    stride 3, 1x1 convolution to 128 + BN + ReLU, 2x2 convolution to 768 + BN + ReLU, global
    average pooling, linear (on 8x8 maps, i.e. 32x32 inputs, the 2x2 convolution leaves 1x1)."""

    def __init__(self, c, num_classes, rngs):
        self.conv1, self.bn1 = _conv(c, 128, 1, rngs), TorchBatchNorm(128, rngs)
        self.conv2, self.bn2 = _conv(128, 768, 2, rngs, padding=0), TorchBatchNorm(768, rngs)
        self.linear = torch_linear(768, num_classes, rngs)

    def __call__(self, x):
        if min(x.shape[1:3]) < 6:
            raise ValueError(f"the auxiliary head needs feature maps of at least 6x6 after the second reduction "
                             f"cell (DARTS: 8x8 from 32x32 images); this input gives {x.shape[1]}x{x.shape[2]}: "
                             "train without it (--auxiliary-weight 0) or on larger images")
        y = nn.avg_pool(jax.nn.relu(x), (5, 5), strides=(3, 3))
        y = jax.nn.relu(self.bn1(self.conv1(y)))
        y = jax.nn.relu(self.bn2(self.conv2(y)))
        return self.linear(jnp.mean(y, axis=(1, 2)))


class DartsNet(nnx.Module):
    """The search network under ``config`` (every cell's edges choice points): stem, the cells of
    :func:`darts_plan`, global average pooling, classifier. ``evaluation``: the evaluation
    network's form (:class:`Evaluation`; :func:`darts_network` fixes its choices), whose
    auxiliary head reads the cell at 2/3 of the depth: in training the model then returns
    ``(logits, auxiliary logits)``."""

    def __init__(self, rngs: nnx.Rngs, config: DartsConfig = DartsConfig(), loop_edges: bool = False,
                 evaluation: Evaluation | None = None):
        concat = evaluation.concat if evaluation is not None else ((2, 3, 4, 5),) * 2
        plan = darts_plan(config.channels, config.layers, config.stem_multiplier, tuple(len(c) for c in concat))
        check_partial([p.c for p in plan], config.partial_channels)
        self.stem = ReLUConvBN(config.in_channels, config.stem_multiplier * config.channels, 3, rngs, relu=False)
        self.cells = nnx.List([Cell(p, rngs, config.affine, config.partial_channels, loop_edges, evaluation,
                                    concat[int(p.reduction)]) for p in plan])
        self.aux_at = 2 * config.layers // 3
        self.aux = (AuxHead(plan[self.aux_at].c_out, config.num_classes, rngs)
                    if evaluation is not None and evaluation.auxiliary else None)
        self.classifier = torch_linear(plan[-1].c_out, config.num_classes, rngs)

    def __call__(self, x):
        s0 = s1 = self.stem(x)
        aux = None
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1)
            if i == self.aux_at and self.aux is not None and not self.aux.bn1.use_running_average:
                aux = self.aux(s1)
        logits = self.classifier(jnp.mean(s1, axis=(1, 2)))
        return logits if aux is None else (logits, aux)


class DartsSpace(NNXSpace):
    """The DARTS cell space as a search space: :class:`DartsNet` searched as any NNX model is
    (its edges the rows of the ``normal`` and ``reduce`` groups), with the space's defaults and
    DARTS's training protocol, the genotype's evaluation network (:func:`darts_network`),
    derivation to a :class:`~dnas.supernet.genotype.DartsGenotype` and the latency model
    (:meth:`latency_walk`, :meth:`running_parts`).

    Loop modes (``unroll``, :func:`dnas.supernet.context.loop_mode`): the cells are unrolled
    in every mode (consecutive cells of one shape are rare in the search network: none at 8
    cells); a cell's edges are unrolled (``True``, XLA:CPU's default: the fastest steps) or
    run as loops (``False``, the native default and the short runs' choice on XLA:CPU:
    :func:`dnas.nnx.edge_loop`). The model and its weights are the same in both."""

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

    #: C=16, 8 cells, B=64, 32x32 on the 2-core CPU, jaxlib 0.10.2 (docs/benchmarks.md, "The
    #: DARTS space declared as an NNX model" and "Looped edges read their weights as one block"):
    #: edges unrolled, compile 509.9 s, step 8.96 s; edges looped (dnas.nnx.edge_loop), 73.6 s, 16.27 s
    cpu_loop_cost = LoopCost(work(64, (32, 32), 16, 8), fast=(509.9, 8.96), short=(73.6, 16.27),
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
        _, unroll_edges, _ = loop_mode(config.unroll, resolve(config.kernels))
        self.loop_edges = not unroll_edges
        super().__init__(functools.partial(DartsNet, config=config, loop_edges=self.loop_edges), name="darts",
                         kernels=config.kernels)
        self.config = config

    def choice_point_names(self, group):
        """The edges of a cell, ``"s->d"`` (the rows of ``alphas.json``; the genotype's labels
        carry the group: ``"normal/s->d"``)."""
        return [edge_label(s, d) for s, d in DARTS_EDGES]

    def derive(self, scores) -> DartsGenotype:
        """DARTS's derivation (Liu et al., §2.4): every intermediate node keeps its two edges with
        the strongest op other than ``none``, with that op (the choice points' ``keep=2`` rule),
        printed as DARTS's code prints it: a node's two pairs strongest first. A network of
        fewer than 3 cells has no reduction cell, so no ``reduce`` α: its genotype's reduction
        cell (which it never runs) is derived from equal scores."""
        normal = jnp.asarray(scores["normal"])
        return derive_darts(normal, jnp.asarray(scores["reduce"]) if "reduce" in scores else jnp.zeros_like(normal))

    @staticmethod
    def network(genotype: DartsGenotype, **options) -> Network:
        """The stand-alone network of ``genotype`` (:func:`darts_network`)."""
        check_options("darts", options, darts_network)
        return darts_network(genotype, **options)

    def latency_walk(self, input_size: int) -> tuple[list, list]:
        """Every use of every choice point with its candidates' signatures, and the fixed parts
        (:mod:`dnas.latency.space_latency`): a ``normal`` edge is used by every normal cell, the
        edges from the cell inputs of a reduction cell run at stride 2; each cell also costs its
        two preprocessing convolutions and its four node sums. What a signature builds (to
        profile it) is the model's own module (:func:`~dnas.supernet.nnx_space.module_layer`)."""
        from dnas.latency.space_latency import ChoicePoint, cell_candidates, fixed_part, node_sum_part

        cfg = self.config
        hw = (input_size, input_size)
        c_stem = cfg.stem_multiplier * cfg.channels
        stem = fixed_part("darts/stem", module_layer(lambda rngs: ReLUConvBN(cfg.in_channels, c_stem, 3, rngs,
                                                                               relu=False)),
                          hw + (cfg.in_channels,), (("kernel", 3),))
        fixed, points = [stem], []
        make_op = (lambda op, c, stride, affine, impl:
                   module_layer(lambda rngs: darts_op(op, c, stride, rngs, affine)))
        hw_pp = hw_p = stem.output_shape[:2]
        plan = darts_plan(cfg.channels, cfg.layers, cfg.stem_multiplier)
        for i, p in enumerate(plan):
            group = "reduce" if p.reduction else "normal"
            pre0 = module_layer(lambda rngs, p=p: FactorizedReduce(p.c_pp, p.c, rngs) if p.reduction_prev
                                else ReLUConvBN(p.c_pp, p.c, 1, rngs, affine=False))
            pre0 = fixed_part("darts/preprocess_reduce" if p.reduction_prev else "darts/preprocess", pre0,
                              hw_pp + (p.c_pp,), (("stride", 2 if p.reduction_prev else 1),))
            pre1 = module_layer(lambda rngs, p=p: ReLUConvBN(p.c_p, p.c, 1, rngs, affine=False))
            pre1 = fixed_part("darts/preprocess", pre1,
                              hw_p + (p.c_p,), (("stride", 1),))
            fixed += [pre0, pre1]
            hw_in = pre1.output_shape[:2]
            hw_out = (-(-hw_in[0] // 2), -(-hw_in[1] // 2)) if p.reduction else hw_in
            from_input = cell_candidates(self, "darts", group, _DARTS_ATTRS, make_op, p.c, hw_in,
                                         2 if p.reduction else 1)
            inner = cell_candidates(self, "darts", group, _DARTS_ATTRS, make_op, p.c, hw_out, 1)
            for e, (s, d) in enumerate(DARTS_EDGES):
                points.append(ChoicePoint(group, e, f"cell{i}/edge{s}->{d}", from_input if s < 2 else inner))
            fixed += [node_sum_part("darts", hw_out + (p.c,), sum(1 for _, dd in DARTS_EDGES if dd == d),
                                    f"cell{i}/node{d}") for d in range(2, 6)]
            hw_pp, hw_p = hw_p, hw_out
        head = module_layer(lambda rngs: PooledLinear(plan[-1].c_out, cfg.num_classes, rngs))
        fixed.append(fixed_part("darts/head", head, hw_p + (plan[-1].c_out,)))
        return points, fixed

    def running_parts(self, model, indices, runs, fixed):
        """Every intermediate node of a derived DARTS cell is part of its output, so every chosen
        op runs, except a pooling shared by two edges of a cell, which runs once."""
        from dnas.latency.space_latency import shared_pooling

        return shared_pooling(model, indices, runs), fixed


# ------------------------------------------------------------------------------ evaluation network

def darts_network(g: DartsGenotype, *, channels: int = 36, layers: int = 20, num_classes: int = 10,
                  in_channels: int = 3, stem_multiplier: int = 3, auxiliary: bool = False,
                  impl: str | None = None) -> Network:
    """The DARTS CIFAR evaluation network of ``g`` (Liu, Simonyan & Yang, ICLR 2019, Sec. 3.3 and
    App. A.2): :class:`DartsNet` built for evaluation (:class:`Evaluation`) with the genotype's
    choices, i.e. :func:`dnas.fix` of its search form, so it has the search network's stem,
    cell plan and ops: L cells, reduction cells at L/3 and
    2L/3; each intermediate node the sum of its two kept edges (the others are ``none``, whose
    zeros the compiler removes); the output the genotype's concat nodes. Pooling is plain
    pooling (the search cells' BN after pooling is a search-time device), BatchNorm is affine.
    Training regularisers of the paper: drop path on every op but the identity
    (:class:`~dnas.nnx.DropPath`, at the probability ``dnas train`` schedules) and the
    auxiliary classifier after the cell at 2L/3 (Szegedy et al. 2015; DARTS weighs it 0.4;
    ``params["aux"]``, neither counted nor exported). The paper's CIFAR-10 network is C=36,
    L=20 (:data:`NETWORK_DEFAULTS`: 3.3 M parameters for DARTS-V2)."""
    config = DartsConfig(channels=channels, layers=layers, num_classes=num_classes, in_channels=in_channels,
                         stem_multiplier=stem_multiplier, impl=impl, affine=True)
    evaluation = Evaluation((tuple(g.normal_concat), tuple(g.reduce_concat)), auxiliary, g.choices)
    return fixed_network(lambda key: DartsNet(nnx.Rngs(key), config, evaluation=evaluation), "darts", g,
                         {"space": "darts", "channels": channels, "layers": layers, "num_classes": num_classes,
                          "in_channels": in_channels, "stem_multiplier": stem_multiplier, "auxiliary": auxiliary})


# ------------------------------------------------------------------------------ latency

_DARTS_ATTRS = {"max_pool_3x3": (("kernel", 3),), "avg_pool_3x3": (("kernel", 3),),
                "sep_conv_3x3": (("kernel", 3),), "sep_conv_5x5": (("kernel", 5),),
                "dil_conv_3x3": (("kernel", 3), ("dilation", 2)), "dil_conv_5x5": (("kernel", 5), ("dilation", 2))}
