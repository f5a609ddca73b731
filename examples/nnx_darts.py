"""The DARTS cell search space written as your own Flax NNX model with ``dnas.nnx`` choice points.

DARTS's CNN search network (Liu, Simonyan & Yang, ICLR 2019, §2 and App. A.1): a 3x3
convolution stem, ``layers`` cells with reduction cells at 1/3 and 2/3 of the depth (channels
doubled there), global average pooling and a linear classifier. A cell preprocesses its two
inputs (the outputs of the two cells before it), then its four intermediate nodes each sum one
edge from every node before them, and the cell's output concatenates the four nodes.

Every edge is a :class:`~dnas.nnx.Choice` among DARTS's eight ops, labelled
``"normal/s->d"`` or ``"reduce/s->d"`` (nodes 0 and 1 the inputs, 2..5 the intermediate
nodes), so all normal cells share one decision per edge and all reduction cells another, as in
DARTS. Each edge is marked as an incoming edge of its node (``node="normal/d"``, ``keep=2``):
the derived cell keeps each node's two strongest edges with their best op other than ``none``,
DARTS's derivation. The genotype maps the 28 labels to ops (``none`` on the dropped edges), and
``genotype.png`` draws the two cells from the labels. Copy it to search a variant of the cell
without writing a ``SearchSpace``:

    dnas search --space examples.nnx_darts:space --space-option layers=3 --space-option channels=8 --epochs 5

(from the repository root). The widths and the reduction positions come from the built-in
``darts`` space's plan (:func:`dnas.supernet.darts.darts_plan`), and the ops follow its search
form: affine-free BatchNorm, pooling followed by an affine-free BatchNorm, a factorized reduce
for a skip at stride 2. Given the built-in space's weights (:func:`load_builtin_weights`) it
computes what the built-in space computes: logits, the gradient with respect to both cells'
architecture weights, BatchNorm statistics (``tests/test_nnx_darts.py``, ``pytest -m slow``).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from dnas.nnx import Choice, Identity, node_sum
from dnas.supernet.darts import _DARTS_IN, _DARTS_INNER, darts_plan
from dnas.supernet.genotype import DARTS_EDGES, DARTS_OPS, edge_label


def _bn(c, rngs, affine=False):
    # PyTorch's momentum 0.1 is Flax's 0.9; the search cells' BatchNorm has no affine parameters
    return nnx.BatchNorm(c, momentum=0.9, epsilon=1e-5, use_bias=affine, use_scale=affine, rngs=rngs)


def _conv(c_in, c_out, k, rngs, stride=1, dilation=1, groups=1):
    pad = dilation * (k - 1) // 2
    return nnx.Conv(c_in, c_out, (k, k), strides=stride, padding=[(pad, pad)] * 2, kernel_dilation=dilation,
                    feature_group_count=groups, use_bias=False, rngs=rngs)


class ReLUConvBN(nnx.Module):
    def __init__(self, c_in, c_out, k, rngs, stride=1):
        self.conv, self.bn = _conv(c_in, c_out, k, rngs, stride), _bn(c_out, rngs)

    def __call__(self, x):
        return self.bn(self.conv(jax.nn.relu(x)))


class DilConv(nnx.Module):
    """ReLU, depthwise ``k``x``k`` convolution (dilation ``d``), pointwise convolution, BN."""

    def __init__(self, c, k, rngs, stride=1, dilation=1):
        self.dw = _conv(c, c, k, rngs, stride, dilation, groups=c)
        self.pw, self.bn = _conv(c, c, 1, rngs), _bn(c, rngs)

    def __call__(self, x):
        return self.bn(self.pw(self.dw(jax.nn.relu(x))))


class SepConv(nnx.Module):
    """DARTS's separable convolution: the dilation-1 :class:`DilConv` unit twice, the first at
    ``stride``."""

    def __init__(self, c, k, rngs, stride=1):
        self.a, self.b = DilConv(c, k, rngs, stride), DilConv(c, k, rngs)

    def __call__(self, x):
        return self.b(self.a(x))


class FactorizedReduce(nnx.Module):
    """ReLU, two 1x1 stride-2 convolutions on grids offset by one pixel, concatenated, BN."""

    def __init__(self, c_in, c_out, rngs):
        self.a, self.b = _conv(c_in, c_out // 2, 1, rngs, 2), _conv(c_in, c_out // 2, 1, rngs, 2)
        self.bn = _bn(c_out, rngs)

    def __call__(self, x):
        x = jax.nn.relu(x)
        return self.bn(jnp.concatenate([self.a(x), self.b(jnp.pad(x[:, 1:, 1:], ((0, 0), (0, 1), (0, 1), (0, 0))))],
                                       axis=-1))


class Pool(nnx.Module):
    """3x3 max or average pooling (padding 1, the average over the window's pixels inside the
    image), then an affine-free BN, as in DARTS's search code."""

    def __init__(self, kind, c, rngs, stride=1):
        self.kind, self.stride, self.bn = kind, stride, _bn(c, rngs)

    def __call__(self, x):
        s, pad = (self.stride,) * 2, ((1, 1), (1, 1))
        if self.kind == "max":
            y = nn.max_pool(x, (3, 3), strides=s, padding=pad)
        else:
            y = nn.avg_pool(x, (3, 3), strides=s, padding=pad, count_include_pad=False)
        return self.bn(y)


class Zero(nnx.Module):
    """DARTS's ``none`` at ``stride``: zeros of the output's shape."""

    def __init__(self, stride=1):
        self.stride = stride

    def __call__(self, x):
        return jnp.zeros_like(x[:, ::self.stride, ::self.stride])


def darts_ops(c, stride, rngs) -> dict:
    """DARTS's eight candidate ops on ``c`` channels at ``stride``, in :data:`DARTS_OPS` order."""
    ops = {"none": Zero(stride), "max_pool_3x3": Pool("max", c, rngs, stride),
           "avg_pool_3x3": Pool("avg", c, rngs, stride),
           "skip_connect": Identity() if stride == 1 else FactorizedReduce(c, c, rngs),
           "sep_conv_3x3": SepConv(c, 3, rngs, stride), "sep_conv_5x5": SepConv(c, 5, rngs, stride),
           "dil_conv_3x3": DilConv(c, 3, rngs, stride, 2), "dil_conv_5x5": DilConv(c, 5, rngs, stride, 2)}
    assert tuple(ops) == DARTS_OPS
    return ops


class Cell(nnx.Module):
    """A search cell: both inputs preprocessed to ``c`` channels, the 14 edges (those from the
    inputs at stride 2 in a reduction cell), the four nodes concatenated."""

    def __init__(self, plan, rngs):
        kind = "reduce" if plan.reduction else "normal"
        c = plan.c
        self.pre0 = FactorizedReduce(plan.c_pp, c, rngs) if plan.reduction_prev else ReLUConvBN(plan.c_pp, c, 1, rngs)
        self.pre1 = ReLUConvBN(plan.c_p, c, 1, rngs)
        self.edges = nnx.List([Choice(darts_ops(c, 2 if plan.reduction and s < 2 else 1, rngs),
                                      label=f"{kind}/{edge_label(s, d)}", node=f"{kind}/{d}", keep=2)
                               for s, d in DARTS_EDGES])

    def __call__(self, s0, s1):
        nodes = [self.pre0(s0), self.pre1(s1)]
        for d in range(2, 6):
            nodes.append(node_sum([self.edges[e](nodes[s]) for e, (s, dd) in enumerate(DARTS_EDGES) if dd == d]))
        return jnp.concatenate(nodes[2:], axis=-1)


class DartsNet(nnx.Module):
    """The search network: stem, ``layers`` cells, global pooling, classifier."""

    def __init__(self, rngs, channels=16, layers=8, in_channels=3, num_classes=10, stem_multiplier=3):
        plan = darts_plan(channels, layers, stem_multiplier)
        self.stem = _conv(in_channels, stem_multiplier * channels, 3, rngs)
        self.stem_bn = _bn(stem_multiplier * channels, rngs, affine=True)
        self.cells = nnx.List([Cell(p, rngs) for p in plan])
        self.classifier = nnx.Linear(plan[-1].c_out, num_classes, rngs=rngs)

    def __call__(self, x):
        s0 = s1 = self.stem_bn(self.stem(x))
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1)
        return self.classifier(jnp.mean(s1, axis=(1, 2)))


def load_builtin_weights(model: DartsNet, params, runs) -> None:
    """Write the built-in ``darts`` space's weights (``space.init(key)[0]`` of ``build_space(
    "darts", ...)`` with the same channels and layers; ``runs``: its ``space.runs``, the cells
    stacked together) into ``model``: the two then compute the same supernet."""
    def conv(m, w):
        m.kernel[...] = w

    def sep(m, p):      # separable convolution: depthwise, then pointwise
        conv(m.dw, p["dw"])
        conv(m.pw, p["pw"])

    def fr(m, p):       # factorized reduce
        conv(m.a, p["a"]["w"])
        conv(m.b, p["b"]["w"])

    def pre(m, p):
        if isinstance(m, FactorizedReduce):
            fr(m, p)
        else:           # (relu, conv, bn)
            conv(m.conv, p[1]["w"])

    conv(model.stem, params["stem"][0]["w"])
    model.stem_bn.scale[...], model.stem_bn.bias[...] = params["stem"][1]["scale"], params["stem"][1]["bias"]
    where = {i: (r, k) for r, run in enumerate(runs) for k, i in enumerate(run)}
    for i, cell in enumerate(model.cells):
        r, k = where[i]
        p = jax.tree_util.tree_map(lambda a: a[k], params[f"cells{r}"])
        pre(cell.pre0, p["pre0"])
        pre(cell.pre1, p["pre1"])
        for e, edge in enumerate(cell.edges):
            # the built-in stacks the edges reading the cell inputs ("in") apart from the others
            stack, j = ("in", _DARTS_IN.index(e)) if e in _DARTS_IN else ("inner", _DARTS_INNER.index(e))
            ops = jax.tree_util.tree_map(lambda a: a[j], p[stack])
            for name, op in zip(edge.names, edge.candidates):
                o = DARTS_OPS.index(name)
                if name.startswith("sep_conv"):          # (relu, sep, bn, relu, sep, bn)
                    sep(op.a, ops[o][1])
                    sep(op.b, ops[o][4])
                elif name.startswith("dil_conv"):        # (relu, sep, bn)
                    sep(op, ops[o][1])
                elif isinstance(op, FactorizedReduce):   # a skip at stride 2
                    fr(op, ops[o])
    model.classifier.kernel[...], model.classifier.bias[...] = params["classifier"]["w"], params["classifier"]["b"]


def space(in_channels: int = 3, num_classes: int = 10, channels: int = 16, layers: int = 8) -> DartsNet:
    """The supernet as a space factory for the command line (``--space examples.nnx_darts:space``)."""
    return DartsNet(nnx.Rngs(0), channels=channels, layers=layers, in_channels=in_channels, num_classes=num_classes)
