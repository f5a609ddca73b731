"""NAS-Bench-201 written as your own Flax NNX model with ``dnas.nnx`` choice points.

The NAS-Bench-201 supernet (Dong & Yang, ICLR 2020) in a user's primitives: every cell's six
edges are :class:`~dnas.nnx.Choice` points among the benchmark's five ops, and the edges of all
15 cells share the labels ``"0->1"`` ... ``"2->3"``, so that they are one architecture decision,
as in the benchmark. Copy it to search a variant of the cell (other ops, more nodes) without
writing a ``SearchSpace``:

    dnas search --space examples.nnx_nb201:space --space-option cells_per_stage=1 --epochs 5

(from the repository root). Given the built-in ``nb201`` space's weights
(:func:`load_builtin_weights`) it computes what the built-in space computes: logits, the
gradient with respect to the architecture weights, BatchNorm statistics
(``tests/test_nnx_nb201.py``). The kernel policy reaches its ``nnx.Conv`` and
``nnx.BatchNorm`` layers as it reaches the built-in module's (:mod:`dnas.supernet.nnx_kernels`);
``scan_cells=True`` stacks each stage's cells and runs them with :func:`dnas.nnx.scan`, as the
built-in module can; the built-in module adds a backward pass for sampled ops that starts from
their saved output. ``docs/benchmarks.md`` ("NAS-Bench-201 as an NNX model") measures the forms.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

import dnas.nnx
from dnas.nnx import Choice, Identity, Zero, node_sum
from dnas.supernet.genotype import NB201_EDGES, NB201_OPS, edge_label


def _bn(c, affine, rngs):
    # PyTorch's momentum 0.1 is Flax's 0.9; affine=False as DARTS-style search cells
    return nnx.BatchNorm(c, momentum=0.9, epsilon=1e-5, use_bias=affine, use_scale=affine, rngs=rngs)


class ReLUConvBN(nnx.Module):
    def __init__(self, c_in, c_out, k, stride, affine, rngs):
        self.conv = nnx.Conv(c_in, c_out, (k, k), strides=stride, padding=[(k // 2, k // 2)] * 2, use_bias=False,
                             rngs=rngs)
        self.bn = _bn(c_out, affine, rngs)

    def __call__(self, x):
        return self.bn(self.conv(jax.nn.relu(x)))


def avg_pool_3x3(x):
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


class Cell(nnx.Module):
    """Node d sums its incoming edges; each edge chooses one of NAS-Bench-201's five ops. The
    edges are marked with their node (``node=str(d)``, no ``keep``: every edge derives its own
    best op, ``none`` included), so PC-DARTS weighs a node's edges against each other.
    ``partial_channels=K`` builds the candidates for ``C/K`` channels: PC-DARTS (Xu et al., ICLR
    2020, eq. 2) runs them on that part of the node and passes the rest by them."""

    def __init__(self, c, rngs, partial_channels=1):
        c //= partial_channels
        self.edges = nnx.List([Choice({"none": Zero(), "skip_connect": Identity(),
                                       "nor_conv_1x1": ReLUConvBN(c, c, 1, 1, False, rngs),
                                       "nor_conv_3x3": ReLUConvBN(c, c, 3, 1, False, rngs),
                                       "avg_pool_3x3": avg_pool_3x3}, label=edge_label(s, d), node=str(d))
                               for s, d in NB201_EDGES])

    def __call__(self, x):
        nodes = [x]
        for d in range(1, 4):
            nodes.append(node_sum([self.edges[e](nodes[s]) for e, (s, dd) in enumerate(NB201_EDGES) if dd == d]))
        return nodes[3]


class Reduction(nnx.Module):
    """NAS-Bench-201's residual reduction block."""

    def __init__(self, c_in, c_out, rngs):
        self.a = ReLUConvBN(c_in, c_out, 3, 2, True, rngs)
        self.b = ReLUConvBN(c_out, c_out, 3, 1, True, rngs)
        self.short = nnx.Conv(c_in, c_out, (1, 1), use_bias=False, rngs=rngs)

    def __call__(self, x):
        return self.b(self.a(x)) + self.short(nn.avg_pool(x, (2, 2), strides=(2, 2)))


class NB201(nnx.Module):
    """The supernet: stem, three stages of ``n`` cells (C, 2C, 4C channels) with the residual
    reduction blocks between them, and the head; every cell's edge ``s->d`` is the choice
    point labelled ``"s->d"``, one decision for all cells."""

    def __init__(self, rngs, c=16, n=5, in_channels=3, num_classes=10, partial_channels=1, scan_cells=False):
        widths = (c, 2 * c, 4 * c)
        if c % partial_channels:
            raise ValueError(f"partial_channels={partial_channels} must divide the channels {c}")
        self.scan_cells = scan_cells
        self.stem = nnx.Conv(in_channels, c, (3, 3), padding=[(1, 1)] * 2, use_bias=False, rngs=rngs)
        self.stem_bn = _bn(c, True, rngs)
        if scan_cells:   # one Cell per stage whose weights are stacked over its n cells
            self.stages = nnx.List([_stacked_cells(w, n, partial_channels, rngs) for w in widths])
        else:
            self.stages = nnx.List([nnx.List([Cell(w, rngs, partial_channels) for _ in range(n)]) for w in widths])
        self.reductions = nnx.List([Reduction(widths[i], widths[i + 1], rngs) for i in range(2)])
        self.head_bn = _bn(widths[-1], True, rngs)
        self.classifier = nnx.Linear(widths[-1], num_classes, rngs=rngs)

    def __call__(self, x):
        x = self.stem_bn(self.stem(x))
        for i, stage in enumerate(self.stages):
            if self.scan_cells:
                x = dnas.nnx.scan(lambda cell, h: cell(h), in_axes=(0, nnx.Carry), out_axes=nnx.Carry)(stage, x)
            else:
                for cell in stage:
                    x = cell(x)
            if i < 2:
                x = self.reductions[i](x)
        return self.classifier(jnp.mean(jax.nn.relu(self.head_bn(x)), axis=(1, 2)))


def _stacked_cells(c, n, partial_channels, rngs) -> Cell:
    """``n`` cells as one :class:`Cell` whose weights have a leading axis of length ``n``
    (``nnx.vmap`` of the constructor), for ``nnx.scan``: the stage then traces and compiles
    one cell instead of ``n``. The choice points are one each, so all ``n`` cells share them."""
    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
        return Cell(c, rngs, partial_channels)
    return make(rngs)


def load_builtin_weights(model: NB201, params) -> None:
    """Write the built-in ``nb201`` space's weights (``build_space("nb201", ...).init(key)[0]``,
    same channels and cells) into ``model``: the two then compute the same supernet."""
    def conv_bn(m, p):   # relu_conv_bn: (relu, conv, bn)
        m.conv.kernel[...] = p[1]["w"]
        if p[2]:
            m.bn.scale[...], m.bn.bias[...] = p[2]["scale"], p[2]["bias"]

    model.stem.kernel[...] = params["stem"][0]["w"]
    model.stem_bn.scale[...], model.stem_bn.bias[...] = params["stem"][1]["scale"], params["stem"][1]["bias"]
    for i, stage in enumerate(model.stages):
        ops = params[f"stage{i}"]   # per op: leaves stacked over (cell, edge)
        # a scanned stage is one Cell holding every cell's weights: it takes them all at once
        cells = [(slice(None), stage)] if model.scan_cells else list(enumerate(stage))
        for k, cell in cells:
            for e, edge in enumerate(cell.edges):
                for j, name in enumerate(NB201_OPS):
                    if name.startswith("nor_conv"):
                        conv_bn(edge.candidates[j], jax.tree_util.tree_map(lambda a: a[k, e], ops[j]))
        if i < 2:
            r = params[f"reduce{i}"]
            conv_bn(model.reductions[i].a, r["a"])
            conv_bn(model.reductions[i].b, r["b"])
            model.reductions[i].short.kernel[...] = r["short"][1]["w"]
    model.head_bn.scale[...], model.head_bn.bias[...] = params["head_bn"]["scale"], params["head_bn"]["bias"]
    model.classifier.kernel[...], model.classifier.bias[...] = params["classifier"]["w"], params["classifier"]["b"]


def space(in_channels: int = 3, num_classes: int = 10, channels: int = 16, cells_per_stage: int = 5,
          partial_channels: int = 1, scan_cells: bool = False) -> NB201:
    """The supernet as a space factory for the command line (``--space examples.nnx_nb201:space``).
    ``partial_channels`` is set by the search for PC-DARTS (``--relaxation pc_darts``);
    ``--space-option scan_cells=true`` scans each stage's cells (``nnx.scan``)."""
    return NB201(nnx.Rngs(0), c=channels, n=cells_per_stage, in_channels=in_channels, num_classes=num_classes,
                 partial_channels=partial_channels, scan_cells=scan_cells)
