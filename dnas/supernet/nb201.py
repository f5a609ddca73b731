"""The NAS-Bench-201 search space (Dong & Yang, ICLR 2020), declared once as a Flax NNX model.

:class:`NB201Net` is the network: a 3x3 convolution stem to C channels and BN, three stages of N
cells with C, 2C, 4C channels joined by residual reduction blocks, BN + ReLU, global average
pooling and a linear classifier. Each cell's six edges ``s->d`` (:data:`NB201_EDGES`) are
:class:`~dnas.nnx.Choice` points among the five ops of :data:`NB201_OPS`, labelled ``"0->1"`` ..
``"2->3"`` and shared by every cell (one architecture decision for all cells, as in the
benchmark) and grouped as the rows of one α matrix, ``cell`` (6 x 5). Everything else follows
from it:

* the supernet :class:`NB201Space` (:class:`~dnas.supernet.nnx_space.NNXSpace` of the model:
  the cells of a stage unrolled on XLA:CPU, scanned with stacked weights elsewhere or under
  ``--loops scan``/``scan-cells``);
* the stand-alone network a genotype names (:func:`nb201_network`): :func:`dnas.fix` of the
  model with affine BatchNorm in the cells, what ``dnas train`` trains and the benchmark's table
  scores;
* the latency walk (:meth:`NB201Space.latency_walk`), every use of every choice point with its
  shape, its parts built from the model's own modules.

The genotype is the label -> op mapping ``{"0->1": op, ..}`` printed as the benchmark's arch
string (:class:`dnas.supernet.genotype.NB201Genotype`).
"""
from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import dnas.nnx
from dnas.backend import resolve
from dnas.nnx import Choice, Identity, Zero, node_sum
from dnas.supernet.context import loop_mode
from dnas.supernet.genotype import NB201_EDGES, NB201_OPS, NB201Genotype, edge_label
from dnas.supernet.network import Network, check_options
from dnas.supernet.nnx_kernels import HE_NORMAL, ReLUConvBN, TorchBatchNorm, torch_linear
from dnas.supernet.nnx_space import NNXSpace, module_layer
from dnas.supernet.space_base import check_partial

#: The NAS-Bench-201 evaluation network's size (the benchmark trains every cell in it).
NETWORK_DEFAULTS = {"channels": 16, "cells_per_stage": 5}


@dataclasses.dataclass(frozen=True)
class NB201Config:
    """NAS-Bench-201 supernet (Dong & Yang, ICLR 2020): stem, 3 stages of ``cells_per_stage``
    cells with ``channels``, 2x, 4x channels, separated by residual reduction blocks.
    ``affine``: the cells' BatchNorm has a scale and bias (off in the search, as in the
    benchmark's search code; on in the evaluation network). ``unroll``: the cells of a stage
    unrolled (``True``) or scanned with stacked weights (``False`` / ``"scan_cells"``; the six
    edges of a cell are unrolled either way), ``None`` the kernel policy's choice
    (:func:`dnas.supernet.context.loop_mode`). ``impl`` is accepted for a uniform interface: the
    space has no depthwise convolution."""

    channels: int = 16
    cells_per_stage: int = 5
    num_classes: int = 10
    in_channels: int = 3
    impl: str | None = None
    affine: bool = False
    unroll: bool | str | None = None     # see dnas.supernet.context.loop_mode
    partial_channels: int = 1
    kernels: str = "auto"                # dnas.backend kernel policy: auto, xla_cpu or native

    @property
    def widths(self) -> tuple[int, int, int]:
        """The three stages' widths: C, 2C, 4C."""
        return (self.channels, 2 * self.channels, 4 * self.channels)


class AvgPool3x3(nnx.Module):
    """3x3 average pooling, stride 1, padding 1, the padding not counted (PyTorch's
    ``count_include_pad=False``, as the benchmark's ``POOLING``)."""

    def __call__(self, x):
        return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def nb201_op(name: str, c: int, rngs: nnx.Rngs, affine: bool = False) -> nnx.Module:
    """One NAS-Bench-201 candidate op (``c`` -> ``c`` channels, stride 1)."""
    if name == "none":
        return Zero()
    if name == "skip_connect":
        return Identity()
    if name in ("nor_conv_1x1", "nor_conv_3x3"):
        return ReLUConvBN(c, c, int(name[-1]), rngs, affine=affine)
    if name == "avg_pool_3x3":
        return AvgPool3x3()
    from dnas.supernet.ops import UnknownOpError
    raise UnknownOpError(f"unknown NAS-Bench-201 operation {name!r}; valid operations are: {', '.join(NB201_OPS)}")


class Cell(nnx.Module):
    """Node ``d`` sums its incoming edges (:func:`~dnas.nnx.node_sum`); each edge ``s->d`` is a
    choice among NAS-Bench-201's five ops, labelled ``"s->d"``, marked with its node (PC-DARTS
    weighs a node's edges against each other; no ``keep``: every edge derives its own best op,
    ``none`` included, the benchmark's rule) and a row of the ``cell`` group.
    ``partial_channels=K`` builds the candidates for ``C/K`` channels: PC-DARTS (Xu et al., ICLR
    2020, eq. 2) runs them on that part of the node and passes the rest by them."""

    def __init__(self, c, rngs, affine=False, partial_channels=1):
        c //= partial_channels
        self.edges = nnx.List([Choice({op: nb201_op(op, c, rngs, affine) for op in NB201_OPS},
                                      label=edge_label(s, d), node=str(d), group="cell")
                               for s, d in NB201_EDGES])

    def __call__(self, x):
        nodes = [x]
        for d in range(1, 4):
            nodes.append(node_sum([self.edges[e](nodes[s]) for e, (s, dd) in enumerate(NB201_EDGES) if dd == d]))
        return nodes[3]


class ResNetBlock(nnx.Module):
    """NAS-Bench-201's residual reduction block: two ReLU-conv-BN 3x3 (the first at stride 2)
    plus a shortcut of 2x2 average pooling and a 1x1 convolution."""

    def __init__(self, c_in, c_out, rngs):
        self.a = ReLUConvBN(c_in, c_out, 3, rngs, stride=2)
        self.b = ReLUConvBN(c_out, c_out, 3, rngs)
        self.short = nnx.Conv(c_in, c_out, (1, 1), use_bias=False, kernel_init=HE_NORMAL, rngs=rngs)

    def __call__(self, x):
        return self.b(self.a(x)) + self.short(nn.avg_pool(x, (2, 2), strides=(2, 2)))


class Head(nnx.Module):
    """BN, ReLU, global average pooling and the linear classifier."""

    def __init__(self, c, num_classes, rngs):
        self.bn = TorchBatchNorm(c, rngs)
        self.linear = torch_linear(c, num_classes, rngs)

    def __call__(self, x):
        return self.linear(jnp.mean(jax.nn.relu(self.bn(x)), axis=(1, 2)))


class NB201Net(nnx.Module):
    """The supernet (the model with every cell's choice points) under ``config``: stem, three
    stages of cells (C, 2C, 4C channels) with the residual reduction blocks between them, and
    the head. With ``scan_cells`` each stage is one :class:`Cell` whose weights are stacked over
    its cells, run by :func:`dnas.nnx.scan` (one traced cell per stage)."""

    def __init__(self, rngs: nnx.Rngs, config: NB201Config = NB201Config(), scan_cells: bool = False):
        c, n, widths = config.channels, config.cells_per_stage, config.widths
        check_partial(widths, config.partial_channels)
        self.scan_cells = scan_cells
        self.stem = ReLUConvBN(config.in_channels, c, 3, rngs, relu=False)
        make = functools.partial(Cell, affine=config.affine, partial_channels=config.partial_channels)
        if scan_cells:
            self.stages = nnx.List([_stacked(make, w, n, rngs) for w in widths])
        else:
            self.stages = nnx.List([nnx.List([make(w, rngs) for _ in range(n)]) for w in widths])
        self.reductions = nnx.List([ResNetBlock(widths[i], widths[i + 1], rngs) for i in range(2)])
        self.head = Head(widths[-1], config.num_classes, rngs)

    def __call__(self, x):
        x = self.stem(x)
        for i, stage in enumerate(self.stages):
            if self.scan_cells:
                x = dnas.nnx.scan(lambda cell, h: cell(h), in_axes=(0, nnx.Carry), out_axes=nnx.Carry)(stage, x)
            else:
                for cell in stage:
                    x = cell(x)
            if i < 2:
                x = self.reductions[i](x)
        return self.head(x)


def _stack_cells(tree: dict) -> dict:
    """A pure dict of :class:`NB201Net` with unrolled cells -> its scanned form's: each stage's
    cells' leaves stacked on a leading axis."""
    stages = {i: jax.tree_util.tree_map(lambda *a: jnp.stack(a), *[stage[c] for c in sorted(stage)])
              for i, stage in tree["stages"].items()}
    return {**tree, "stages": stages}


def _unstack_cells(tree: dict) -> dict:
    """The inverse of :func:`_stack_cells`."""
    def cells(stage):
        n = jax.tree_util.tree_leaves(stage)[0].shape[0]
        return {c: jax.tree_util.tree_map(lambda a: a[c], stage) for c in range(n)}
    return {**tree, "stages": {i: cells(stage) for i, stage in tree["stages"].items()}}


def _stacked(make, c, n, rngs) -> Cell:
    """``n`` cells as one :class:`Cell` whose weights have a leading axis of length ``n``
    (``nnx.vmap`` of the constructor, each cell its own initialisation), for ``nnx.scan``."""
    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def build(rngs):
        return make(c, rngs)
    return build(rngs)


class NB201Space(NNXSpace):
    """NAS-Bench-201 as a search space: :class:`NB201Net` searched as any NNX model is (its six
    edge labels the rows of the ``cell`` group), with the space's defaults and the benchmark's
    training protocol, the genotype's stand-alone network (:func:`nb201_network`), derivation
    to an :class:`~dnas.supernet.genotype.NB201Genotype` and the latency model
    (:meth:`latency_walk`, :meth:`running_parts`)."""

    name = "nb201"
    op_names = NB201_OPS
    #: the default ``dnas search``: a real but short search on the embedded digits
    search_defaults = {"--channels": 16, "--cells": 2}
    bench_defaults = {"--channels": 16}
    cells_option = "cells_per_stage"
    #: NAS-Bench-201's training (Sec. 2.3): SGD with Nesterov momentum 0.9, learning rate 0.1
    #: cosine to 0, weight decay 5e-4, batch 256, no cutout, no drop path; 200 epochs, C=16, N=5
    train_protocol = {"batch_size": 256, "lr": 0.1, "nesterov": True, "weight_decay": 5e-4, "grad_clip": None,
                      "drop_path": 0.0, "cutout": 0, "auxiliary_weight": 0.0, "label_smoothing": 0.0,
                      "network": NETWORK_DEFAULTS}

    @classmethod
    def loop_size(cls, options: dict) -> tuple[int, int]:
        return (int(options.get("channels", NB201Config.channels)),
                3 * int(options.get("cells_per_stage", NB201Config.cells_per_stage)))

    def __init__(self, config: NB201Config = NB201Config()):
        unroll_cells, _, _ = loop_mode(config.unroll, resolve(config.kernels))
        self.scan_cells = not unroll_cells
        super().__init__(functools.partial(NB201Net, config=config, scan_cells=self.scan_cells), name="nb201",
                         kernels=config.kernels)
        self.config = config

    def init(self, key):
        """The weights and BatchNorm statistics of the model initialised from ``key`` with its
        cells unrolled, stacked per stage when they are scanned: the same numbers in every loop
        mode, so that a seed means one network whatever ``--loops`` runs it."""
        model = NB201Net(nnx.Rngs(key), self.config, scan_cells=False)
        params, stats = (nnx.to_pure_dict(s) for s in nnx.state(model, nnx.Param, nnx.BatchStat))
        if self.scan_cells:
            params, stats = _stack_cells(params), _stack_cells(stats)
        return self.stacked(params, stats)

    def unrolled(self, params, stats):
        """``(params, stats)`` (:meth:`init`'s layout; gradients too) as the pure dicts of the
        model with its cells unrolled, whatever the loop mode: one layout to compare or carry
        weights across loop modes."""
        params, stats = self.unstacked(params, stats)
        if self.scan_cells:
            params, stats = _unstack_cells(params), _unstack_cells(stats)
        return params, stats

    def derive(self, scores) -> NB201Genotype:
        """Every edge's best-scored op, ``none`` included (ties: the earlier), as the benchmark's
        cell."""
        return NB201Genotype.from_choices(super().derive(scores).choices)

    @staticmethod
    def network(genotype: NB201Genotype, **options) -> Network:
        """The stand-alone network of ``genotype`` (:func:`nb201_network`)."""
        check_options("nb201", options, nb201_network)
        return nb201_network(genotype, **options)

    def latency_walk(self, input_size: int) -> tuple[list, list]:
        """Every use of every choice point with its candidates' signatures, and the fixed parts
        (:mod:`dnas.latency.space_latency`): edge ``e`` of the ``cell`` group is used by every
        cell of the three stages, at the stage's width; nodes with several inputs cost a sum.
        What a signature builds (to profile it) is the model's own module
        (:func:`~dnas.supernet.nnx_space.module_layer`)."""
        from dnas.latency.space_latency import ChoicePoint, cell_candidates, fixed_part, node_sum_part

        cfg = self.config
        hw = (input_size, input_size)
        stem = module_layer(lambda rngs: ReLUConvBN(cfg.in_channels, cfg.channels, 3, rngs, relu=False))
        fixed = [fixed_part("nb201/stem", stem, hw + (cfg.in_channels,), (("kernel", 3),), where="stem")]
        points = []
        terms = {d: sum(1 for _, dd in NB201_EDGES if dd == d) for d in (1, 2, 3)}
        make_op = (lambda op, c, stride, affine, impl:
                   module_layer(lambda rngs: nb201_op(op, c, rngs, affine)))
        for stage, width in enumerate(cfg.widths):
            cands = cell_candidates(self, "nb201", "cell", _NB201_ATTRS, make_op, width, hw, 1)
            for cell in range(cfg.cells_per_stage):
                for e, (s, d) in enumerate(NB201_EDGES):
                    points.append(ChoicePoint("cell", e, f"stage{stage}/cell{cell}/edge{s}->{d}", cands))
                fixed += [node_sum_part("nb201", hw + (width,), terms[d], f"stage{stage}/cell{cell}/node{d}")
                          for d in (2, 3) if terms[d] > 1]
            if stage < 2:
                block = module_layer(lambda rngs, i=stage: ResNetBlock(cfg.widths[i], cfg.widths[i + 1], rngs))
                red = fixed_part("nb201/resblock", block, hw + (width,), (("stride", 2),), where=f"reduce{stage}")
                fixed.append(red)
                hw = red.output_shape[:2]
        head = module_layer(lambda rngs: Head(cfg.widths[-1], cfg.num_classes, rngs))
        fixed.append(fixed_part("nb201/head", head, hw + (cfg.widths[-1],), where="head"))
        return points, fixed

    def running_parts(self, model, indices, runs, fixed):
        """Every cell shares the architecture, so :func:`nb201_running_edges` of the cell says
        which edges run in each; a node sum runs when its node is computed; when the cell output
        does not depend on its input, only the last cell's running parts and the head remain.
        A pooling shared by two edges of a cell runs once."""
        from dnas.latency.space_latency import shared_pooling

        ops = [self.group_op_names("cell")[int(i)] for i in np.asarray(indices["cell"])]
        edges, connected, nodes = nb201_running_edges(ops)
        last = model.choice_points[-1].where.rsplit("/", 1)[0]            # "stage2/cell4"
        cell_runs = lambda where: connected or where.startswith(last + "/")  # noqa: E731
        runs = [r and edges[cp.row] and cell_runs(cp.where) for r, cp in zip(runs, model.choice_points)]
        fixed = list(fixed)
        for j, sig in enumerate(model.fixed):
            if sig.op == "nb201/node_sum":
                fixed[j] = cell_runs(sig.where) and int(sig.where.rsplit("node", 1)[1]) in nodes
            elif sig.op != "nb201/head":
                fixed[j] = connected
        return shared_pooling(model, indices, runs), fixed


#: NAS-Bench-201 ops with parameters: on a constant (all-zero) input they still run; the
#: parameter-free ones (pooling, identity) are constant-folded by the compiler.
_PARAM_OPS = frozenset({"nor_conv_1x1", "nor_conv_3x3"})


def nb201_running_edges(ops: list[str]) -> tuple[list[bool], bool, set]:
    """Which edges of a NAS-Bench-201 cell a compiler that removes dead code (XLA) runs,
    whether the cell's output depends on its input, and which nodes it computes.

    An edge runs when its op is not ``none``, its destination node reaches the cell output
    through non-``none`` edges (else its result is dead code), and its input is not a
    constant — a node all of whose inputs are ``none`` is zeros, and pooling or the identity of
    zeros is folded away at compile time (convolutions keep running: their weights are
    arguments). A node is computed (its sum materialised) when it is live and not constant.
    A cell whose output does not depend on its input makes everything before it dead
    (``connected`` False). Returns ``(runs per edge, connected, computed nodes)``."""
    if len(ops) != len(NB201_EDGES):
        raise ValueError(f"a NAS-Bench-201 cell has {len(NB201_EDGES)} edges, got {len(ops)} ops")
    nz = [op != "none" for op in ops]
    live = {3}
    for e in reversed(range(len(NB201_EDGES))):          # edges are ordered by destination
        s, d = NB201_EDGES[e]
        if nz[e] and d in live:
            live.add(s)
    variable, reach, runs = {0}, {0}, []
    for e, (s, d) in enumerate(NB201_EDGES):
        out_var = nz[e] and (s in variable or ops[e] in _PARAM_OPS)
        if out_var:
            variable.add(d)
        if nz[e] and s in reach:
            reach.add(d)
        runs.append(out_var and d in live)
    return runs, 3 in reach, live & variable


# ------------------------------------------------------------------------------ derived network

def nb201_network(g, *, channels: int = 16, cells_per_stage: int = 5, num_classes: int = 10,
                  in_channels: int = 3, impl: str | None = None) -> Network:
    """The NAS-Bench-201 evaluation network of ``g`` (Dong & Yang, ICLR 2020, Sec. 2.1; an
    :class:`~dnas.supernet.genotype.NB201Genotype` or a mapping edge label -> op): :func:`dnas.fix`
    of :class:`NB201Net` with every BatchNorm affine, each cell's node ``j`` the sum
    ``Σ_{i<j} op_ij(node_i)`` over the chosen ops (a ``none`` edge adds zeros, which the
    compiler removes). The benchmark trains C=16, N=5 (:data:`NETWORK_DEFAULTS`)."""
    genotype = g if isinstance(g, NB201Genotype) else NB201Genotype.from_choices(g)
    config = NB201Config(channels=channels, cells_per_stage=cells_per_stage, num_classes=num_classes,
                         in_channels=in_channels, impl=impl, affine=True)
    space = NNXSpace(functools.partial(NB201Net, config=config), name="nb201")
    net = space.network(genotype)
    return net._replace(genotype=genotype, config={"space": "nb201", "channels": channels,
                                                   "cells_per_stage": cells_per_stage, "num_classes": num_classes,
                                                   "in_channels": in_channels})


# ------------------------------------------------------------------------------ latency

_NB201_ATTRS = {"none": (), "skip_connect": (), "nor_conv_1x1": (("kernel", 1),), "nor_conv_3x3": (("kernel", 3),),
                "avg_pool_3x3": (("kernel", 3),)}
