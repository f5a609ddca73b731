"""A PyTorch DARTS-space search network, the reference side of ``bench_vs_pytorch.py``.

Written for this benchmark from the description in the DARTS paper (Liu, Simonyan & Yang,
"DARTS: Differentiable Architecture Search", ICLR 2019, Sec. 2 and App. A.1), with the same
layout as dnas's ``darts`` space so that both sides compute the same network:

* stem: 3x3 convolution to ``stem_multiplier * C`` channels, BatchNorm;
* ``layers`` cells; the cells at 1/3 and 2/3 of the depth are reduction cells (stride 2 on
  the edges that read the cell inputs) and double the channels;
* a cell preprocesses its two inputs (the outputs of the two previous cells) to ``C``
  channels, by ReLU-conv1x1-BN, or by a factorized reduce for the older input when the
  previous cell reduced; 4 intermediate nodes each sum a mixed op on every predecessor
  (2 inputs + earlier nodes: 14 edges); the output concatenates the 4 nodes (4C channels);
* mixed op: ``sum_k softmax(alpha)_k * op_k(x)`` over the 8 candidates ``none``,
  ``max_pool_3x3``, ``avg_pool_3x3``, ``skip_connect`` (identity, a factorized reduce at
  stride 2), ``sep_conv_3x3``/``sep_conv_5x5`` (ReLU-depthwise-pointwise-BN, twice),
  ``dil_conv_3x3``/``dil_conv_5x5`` (ReLU-depthwise with dilation 2-pointwise-BN); pooling
  is followed by an affine-free BN; during search every BN in the cells is affine-free;
* head: global average pooling and a linear classifier;
* architecture parameters ``alpha_normal`` and ``alpha_reduce``, each (14, 8).

The stem BN keeps its affine parameters (as dnas's ``darts`` space and the paper's search
code do); everything in the cells is affine-free. Edge order (rows of alpha) is dnas's
``DARTS_EDGES``: node 2 <- (0, 1), node 3 <- (0, 1, 2), node 4 <- (0..3), node 5 <- (0..4).

``python benchmarks/torch_darts_reference.py [--channels C --cells L --batch-size B]`` runs
self-checks: parameter count, output shape, and that one first-order DARTS step changes alpha
(the alpha step) and the weights (the weight step).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

OPS = ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect",
       "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5")
STEPS = 4  # intermediate nodes per cell
EDGES = [(j, i + 2) for i in range(STEPS) for j in range(i + 2)]  # (source, destination), 14 edges


def bn(c: int, affine: bool = False) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, affine=affine)


class Zero(nn.Module):
    """The ``none`` op: zeros of the (strided) output shape."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x):
        if self.stride == 1:
            return torch.zeros_like(x)
        return torch.zeros_like(x[:, :, ::self.stride, ::self.stride])


class ReLUConvBN(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int, affine: bool = False):
        super().__init__(nn.ReLU(), nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=False), bn(c_out, affine))


class FactorizedReduce(nn.Module):
    """Halve the resolution without losing every other pixel: ReLU, two 1x1 stride-2
    convolutions (the second on the grid shifted by one pixel), concatenated, BN."""

    def __init__(self, c_in: int, c_out: int, affine: bool = False):
        super().__init__()
        if c_out % 2:
            raise ValueError(f"FactorizedReduce needs an even number of output channels, got {c_out}")
        self.conv_a = nn.Conv2d(c_in, c_out // 2, 1, 2, 0, bias=False)
        self.conv_b = nn.Conv2d(c_in, c_out // 2, 1, 2, 0, bias=False)
        self.bn = bn(c_out, affine)

    def forward(self, x):
        x = F.relu(x)
        a, b = self.conv_a(x), self.conv_b(x[:, :, 1:, 1:])
        if b.shape[2:] != a.shape[2:]:  # odd sizes: pad the shifted branch
            b = F.pad(b, (0, a.shape[3] - b.shape[3], 0, a.shape[2] - b.shape[2]))
        return self.bn(torch.cat([a, b], dim=1))


def _dw_pw(c: int, kernel: int, stride: int, dilation: int) -> list[nn.Module]:
    """Depthwise ``kernel``x``kernel`` convolution then a pointwise 1x1, no bias."""
    pad = dilation * (kernel - 1) // 2
    return [nn.Conv2d(c, c, kernel, stride, pad, dilation=dilation, groups=c, bias=False),
            nn.Conv2d(c, c, 1, 1, 0, bias=False)]


class SepConv(nn.Sequential):
    def __init__(self, c: int, kernel: int, stride: int, affine: bool = False):
        super().__init__(nn.ReLU(), *_dw_pw(c, kernel, stride, 1), bn(c, affine),
                         nn.ReLU(), *_dw_pw(c, kernel, 1, 1), bn(c, affine))


class DilConv(nn.Sequential):
    def __init__(self, c: int, kernel: int, stride: int, affine: bool = False):
        super().__init__(nn.ReLU(), *_dw_pw(c, kernel, stride, 2), bn(c, affine))


def make_op(name: str, c: int, stride: int, affine: bool = False) -> nn.Module:
    if name == "none":
        return Zero(stride)
    if name == "max_pool_3x3":
        return nn.Sequential(nn.MaxPool2d(3, stride, 1), bn(c, False))
    if name == "avg_pool_3x3":
        return nn.Sequential(nn.AvgPool2d(3, stride, 1, count_include_pad=False), bn(c, False))
    if name == "skip_connect":
        return nn.Identity() if stride == 1 else FactorizedReduce(c, c, affine)
    if name.startswith("sep_conv_"):
        return SepConv(c, int(name[-1]), stride, affine)
    if name.startswith("dil_conv_"):
        return DilConv(c, int(name[-1]), stride, affine)
    raise ValueError(f"unknown op {name!r}; ops: {OPS}")


class MixedOp(nn.Module):
    def __init__(self, c: int, stride: int):
        super().__init__()
        self.ops = nn.ModuleList(make_op(name, c, stride) for name in OPS)

    def forward(self, x, weights):
        return sum(w * op(x) for w, op in zip(weights, self.ops, strict=True))


class SearchCell(nn.Module):
    def __init__(self, c_pp: int, c_p: int, c: int, reduction: bool, reduction_prev: bool):
        super().__init__()
        self.reduction = reduction
        self.pre0 = FactorizedReduce(c_pp, c) if reduction_prev else ReLUConvBN(c_pp, c, 1, 1, 0)
        self.pre1 = ReLUConvBN(c_p, c, 1, 1, 0)
        self.edges = nn.ModuleList(MixedOp(c, 2 if reduction and src < 2 else 1) for src, _ in EDGES)

    def forward(self, s0, s1, weights):
        states = [self.pre0(s0), self.pre1(s1)]
        e = 0
        for node in range(STEPS):
            total = 0
            for src in range(node + 2):
                total = total + self.edges[e](states[src], weights[e])
                e += 1
            states.append(total)
        return torch.cat(states[2:], dim=1)


class DartsSearchNetwork(nn.Module):
    """The DARTS search supernet: ``forward(x) -> logits`` (NCHW input)."""

    def __init__(self, channels: int = 16, layers: int = 8, num_classes: int = 10, in_channels: int = 3,
                 stem_multiplier: int = 3):
        super().__init__()
        c_curr = stem_multiplier * channels
        self.stem = nn.Sequential(nn.Conv2d(in_channels, c_curr, 3, 1, 1, bias=False), bn(c_curr, True))
        c_pp, c_p, c_curr = c_curr, c_curr, channels
        self.cells = nn.ModuleList()
        reduction_prev = False
        for i in range(layers):
            reduction = layers >= 3 and i in (layers // 3, 2 * layers // 3)
            if reduction:
                c_curr *= 2
            self.cells.append(SearchCell(c_pp, c_p, c_curr, reduction, reduction_prev))
            reduction_prev = reduction
            c_pp, c_p = c_p, STEPS * c_curr
        self.classifier = nn.Linear(c_p, num_classes)
        self.alpha_normal = nn.Parameter(1e-3 * torch.randn(len(EDGES), len(OPS)))
        self.alpha_reduce = nn.Parameter(1e-3 * torch.randn(len(EDGES), len(OPS)))

    def alphas(self) -> list[nn.Parameter]:
        return [self.alpha_normal, self.alpha_reduce]

    def weights(self) -> list[nn.Parameter]:
        arch = {id(a) for a in self.alphas()}
        return [p for p in self.parameters() if id(p) not in arch]

    def forward(self, x):
        w_normal = F.softmax(self.alpha_normal, dim=-1)
        w_reduce = F.softmax(self.alpha_reduce, dim=-1)
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, w_reduce if cell.reduction else w_normal)
        return self.classifier(F.adaptive_avg_pool2d(s1, 1).flatten(1))


def _self_check(channels: int, cells: int, batch_size: int, image_size: int = 32) -> dict:
    torch.manual_seed(0)
    net = DartsSearchNetwork(channels, cells).train()
    x = torch.randn(batch_size, 3, image_size, image_size)
    y = torch.randint(0, 10, (batch_size,))
    logits = net(x)
    assert logits.shape == (batch_size, 10), logits.shape
    a_opt = torch.optim.Adam(net.alphas(), lr=3e-4, betas=(0.5, 0.999), weight_decay=1e-3)
    w_opt = torch.optim.SGD(net.weights(), lr=0.025, momentum=0.9, weight_decay=3e-4)
    a0 = [a.detach().clone() for a in net.alphas()]
    w0 = [w.detach().clone() for w in net.weights()]
    a_opt.zero_grad(set_to_none=True)
    F.cross_entropy(net(x), y).backward(inputs=net.alphas())
    a_grad = float(torch.sqrt(sum((a.grad ** 2).sum() for a in net.alphas())))
    assert all(w.grad is None for w in net.weights()), "the alpha step computed weight gradients"
    a_opt.step()
    w_opt.zero_grad(set_to_none=True)
    F.cross_entropy(net(x), y).backward(inputs=net.weights())
    nn.utils.clip_grad_norm_(net.weights(), 5.0)
    w_opt.step()
    alpha_change = max(float((a.detach() - b).abs().max()) for a, b in zip(net.alphas(), a0, strict=True))
    weight_change = max(float((a.detach() - b).abs().max()) for a, b in zip(net.weights(), w0, strict=True))
    assert a_grad > 0 and alpha_change > 0 and weight_change > 0
    reductions = [i for i, c in enumerate(net.cells) if c.reduction]
    return {"params": sum(p.numel() for p in net.weights()), "alpha_shapes": [list(a.shape) for a in net.alphas()],
            "logits_shape": list(logits.shape), "reduction_cells": reductions,
            "cell_output_channels": [c.pre1[1].in_channels for c in net.cells[1:]] + [net.classifier.in_features],
            "alpha_grad_norm": a_grad, "max_alpha_change": alpha_change, "max_weight_change": weight_change}


if __name__ == "__main__":
    import argparse
    import json

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--channels", type=int, default=4)
    ap.add_argument("--cells", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--image-size", type=int, default=32)
    a = ap.parse_args()
    print(json.dumps(_self_check(a.channels, a.cells, a.batch_size, a.image_size)))
