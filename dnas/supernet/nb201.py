"""The NAS-Bench-201 search space (Dong & Yang, ICLR 2020), described once.

The network's fixed parts, a 3x3 convolution stem to C channels and BN, three stages of N cells
with C, 2C, 4C channels joined by residual reduction blocks, BN + ReLU, global average pooling
and a linear classifier, are built by one function (:func:`nb201_macro`). Three things follow
from it:

* the supernet :class:`NB201Space`: each cell's 6 edges (:data:`NB201_EDGES`) mix the 5 ops of
  :data:`NB201_OPS`, one ``cell`` group of α shared by every cell; the cells of a stage are stacked
  and scanned, and the edges of a cell too (:func:`dnas.supernet.mixed.scan_edges`);
* the stand-alone network a genotype names (:func:`nb201_network`, ``NB201Space.network``), what
  ``dnas train`` trains and the benchmark's table scores;
* the latency walk (``NB201Space.latency_walk``), every use of every choice point with its shape.

The genotype is the label -> op mapping ``{"0->1": op, ..}`` printed as the benchmark's arch
string (:class:`dnas.supernet.genotype.NB201Genotype`).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dnas.backend import resolve
from dnas.supernet import layers as L
from dnas.supernet.genotype import NB201_EDGES, NB201_OPS, NB201Genotype, derive_nb201, nb201_labels, parse_nb201
from dnas.supernet.mixed import MixedOp, scan_edges, unrolled_edges
from dnas.supernet.network import Network, Output, check_options
from dnas.supernet.ops import candidate_ops, nb201_op
from dnas.supernet.space_base import SearchSpace, check_partial

#: The NAS-Bench-201 evaluation network's size (the benchmark trains every cell in it).
NETWORK_DEFAULTS = {"channels": 16, "cells_per_stage": 5}


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


class NB201Macro(NamedTuple):
    """The fixed parts of a NAS-Bench-201 network, the same in the supernet and in a derived one."""

    widths: tuple[int, int, int]
    stem: L.Layer
    reductions: list
    head_bn: L.Layer
    classifier: L.Layer


def nb201_macro(channels: int, in_channels: int, num_classes: int) -> NB201Macro:
    """Stem (3x3 conv + BN), the two residual reduction blocks between the stages (C -> 2C -> 4C),
    the head's BN and the classifier."""
    widths = (channels, 2 * channels, 4 * channels)
    return NB201Macro(widths,
                      L.sequential(L.conv(in_channels, channels, 3, 1, 1), L.batchnorm(channels, True)),
                      [_resnet_block(widths[i], widths[i + 1], 2) for i in range(2)],
                      L.batchnorm(widths[-1], True), L.dense(widths[-1], num_classes))


class NB201Space(SearchSpace):
    honours_compute_dtype = True   # every convolution through dnas.supernet.layers._conv
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
        self.config = c = config
        self.kernels = resolve(c.kernels)
        self.unroll_cells, self.unroll_edges, self.loop_convs = L.loop_mode(c.unroll, self.kernels)
        self.groups = {"cell": (len(NB201_EDGES), len(NB201_OPS))}
        macro = nb201_macro(c.channels, c.in_channels, c.num_classes)
        self.widths, self.stem, self.reductions = macro.widths, macro.stem, macro.reductions
        self.head_bn, self.classifier = macro.head_bn, macro.classifier
        k = check_partial(self.widths, c.partial_channels)
        self.mixed = [MixedOp(candidate_ops("nb201", NB201_OPS, w // k, 1, c.affine, c.impl)) for w in self.widths]
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
        return nb201_labels()

    def choice_point_nodes(self, group):
        return [(group, d) for _, d in NB201_EDGES]

    def derive(self, scores):
        return parse_nb201(derive_nb201(jnp.asarray(scores["cell"])))

    @staticmethod
    def network(genotype: NB201Genotype, **options) -> Network:
        """The stand-alone network of ``genotype`` (:func:`nb201_network`)."""
        check_options("nb201", options, nb201_network)
        return nb201_network(genotype, **options)

    def latency_walk(self, input_size: int) -> tuple[list, list]:
        """Every use of every choice point with its candidates' signatures, and the fixed parts
        (:mod:`dnas.latency.space_latency`): edge ``e`` of the ``cell`` group is used by every
        cell of the three stages, at the stage's width; nodes with several inputs cost a sum."""
        from dnas.latency.space_latency import ChoicePoint, fixed_part, head_layer, node_sum_part

        space, cfg = self, self.config
        hw = (input_size, input_size)
        fixed = [fixed_part("nb201/stem", space.stem, hw + (cfg.in_channels,), (("kernel", 3),), where="stem")]
        points = []
        terms = {d: sum(1 for _, dd in NB201_EDGES if dd == d) for d in (1, 2, 3)}
        for stage, width in enumerate(space.widths):
            cands = _nb201_candidates(space, width, hw)
            for cell in range(cfg.cells_per_stage):
                for e, (s, d) in enumerate(NB201_EDGES):
                    points.append(ChoicePoint("cell", e, f"stage{stage}/cell{cell}/edge{s}->{d}", cands))
                fixed += [node_sum_part("nb201", hw + (width,), terms[d], f"stage{stage}/cell{cell}/node{d}")
                          for d in (2, 3) if terms[d] > 1]
            if stage < 2:
                red = fixed_part("nb201/resblock", space.reductions[stage], hw + (width,), (("stride", 2),),
                                 where=f"reduce{stage}")
                fixed.append(red)
                hw = red.output_shape[:2]
        fixed.append(fixed_part("nb201/head", head_layer(space.head_bn, space.classifier, True),
                                hw + (space.widths[-1],), where="head"))
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

def nb201_network(g: NB201Genotype, *, channels: int = 16, cells_per_stage: int = 5, num_classes: int = 10,
                  in_channels: int = 3, impl: str | None = None) -> Network:
    """The NAS-Bench-201 evaluation network of ``g`` (Dong & Yang, ICLR 2020, Sec. 2.1): the
    supernet's stem, stages, reduction blocks and head (:func:`nb201_macro`, built once for
    both), each cell's node ``j`` the sum ``Σ_{i<j} op_ij(node_i)`` over the genotype's ops
    (``none`` edges left out; a node without inputs is zero), every BatchNorm affine. The
    benchmark trains C=16, N=5 (:data:`NETWORK_DEFAULTS`)."""
    macro = nb201_macro(channels, in_channels, num_classes)
    widths, stem, reductions, head_bn, classifier = macro
    edges = [(s, d, op) for s, d, op in g.edges() if op != "none"]
    cell_ops = [[nb201_op(op, w, 1, affine=True, impl=impl) for _, _, op in edges] for w in widths]

    def init(key):
        keys = iter(jax.random.split(key, 8))
        params, state = {}, {}
        params["stem"], state["stem"] = stem.init(next(keys))
        for i in range(3):
            if i:
                params[f"reduce{i - 1}"], state[f"reduce{i - 1}"] = reductions[i - 1].init(next(keys))
            cells = [tuple(op.init(k) for op, k in zip(cell_ops[i], jax.random.split(ck, max(len(edges), 1))))
                     for ck in jax.random.split(next(keys), cells_per_stage)]
            params[f"stage{i}"] = [tuple(p for p, _ in c) for c in cells]
            state[f"stage{i}"] = [tuple(s for _, s in c) for c in cells]
        params["head_bn"], state["head_bn"] = head_bn.init(next(keys))
        params["classifier"], _ = classifier.init(next(keys))
        return params, state

    def cell(i, p, s, x, ctx):
        terms: list[list] = [[x], [], [], []]
        nodes: dict[int, jax.Array] = {}

        def node(j):   # summed once, when first read (edges are ordered by destination)
            if j not in nodes:
                nodes[j] = sum(terms[j][1:], terms[j][0]) if terms[j] else jnp.zeros_like(x)
            return nodes[j]

        new_s = []
        for (src, dst, _), op, pe, se in zip(edges, cell_ops[i], p, s):
            y, se = op.apply(pe, se, node(src), ctx)
            terms[dst].append(y)
            new_s.append(se)
        return node(3), tuple(new_s)

    def apply(params, state, x, ctx, drop=None):
        new = {}
        x, new["stem"] = stem.apply(params["stem"], state["stem"], x, ctx)
        for i in range(3):
            if i:
                r = f"reduce{i - 1}"
                x, new[r] = reductions[i - 1].apply(params[r], state[r], x, ctx)
            new[f"stage{i}"] = []
            for p, s in zip(params[f"stage{i}"], state[f"stage{i}"]):
                x, s = cell(i, p, s, x, ctx)
                new[f"stage{i}"].append(s)
        x, new["head_bn"] = head_bn.apply(params["head_bn"], state["head_bn"], x, ctx)
        logits, _ = classifier.apply(params["classifier"], (), jnp.mean(jax.nn.relu(x), axis=(1, 2)), ctx)
        return Output(logits, None, new)

    config = {"space": "nb201", "channels": channels, "cells_per_stage": cells_per_stage,
              "num_classes": num_classes, "in_channels": in_channels}
    return Network(init, apply, g, config)


# ------------------------------------------------------------------------------ latency

_NB201_ATTRS = {"none": (), "skip_connect": (), "nor_conv_1x1": (("kernel", 1),), "nor_conv_3x3": (("kernel", 3),),
                "avg_pool_3x3": (("kernel", 3),)}


def _nb201_candidates(space, c: int, hw: tuple, stride: int = 1) -> tuple:
    from dnas.latency.space_latency import cell_candidates
    return cell_candidates(space, "nb201", "cell", _NB201_ATTRS, nb201_op, c, hw, stride)
