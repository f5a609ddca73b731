"""The ProxylessNAS chain space written as your own Flax NNX model with ``dnas.nnx`` choice points.

ProxylessNAS's mobile supernet (Cai, Zhu & Han, ICLR 2019, §4 and Fig. 4), the MobileNetV2
backbone (Sandler et al., CVPR 2018): a 3x3 convolution stem and an MBConv of expansion 1, then
stages of searchable MBConv blocks, a 1x1 convolution, global average pooling and a linear
classifier. Every searchable block is a :class:`~dnas.nnx.Choice` labelled ``"block{b}"``
among MBConv with kernel {3, 5, 7} x expansion {3, 6} (``mb_k{k}_e{e}``); a block that keeps
its input's shape adds its input back (a residual connection) and may also choose ``zero``,
which leaves the block out. The genotype maps the block labels to ops. Copy it to search a
variant of the backbone (other kernels, a squeeze-and-excitation option) without writing a
``SearchSpace``:

    dnas search --space examples.nnx_chain:space --space-option width_mult=0.25 \\
        --space-option max_depth=2 --space-option stem_stride=1 --relaxation proxyless --epochs 5

(from the repository root). The widths and the block layout come from the built-in ``chain``
space's plan (:func:`dnas.supernet.chain.chain_plan`), so a ``space`` option has the built-in
space's flag's meaning (``max_depth`` is ``--cells``). Given the built-in space's weights
(:func:`load_builtin_weights`) it computes what the built-in space computes: logits, the
gradient with respect to every block's architecture weights, BatchNorm statistics
(``tests/test_nnx_chain.py``). The built-in space keys its latency model by the published
Pixel-1 table's keys; this model's latency table is profiled per choice point
(``dnas latency profile --space examples.nnx_chain:space``), as any user model's.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from dnas.nnx import Choice, Zero
from dnas.supernet.chain import KEEP_OPS, MB_OPS, ChainConfig, chain_plan


class ConvBN(nnx.Module):
    """Convolution (padding ``k // 2``, no bias), BatchNorm, ReLU6 unless ``act=False``."""

    def __init__(self, c_in, c_out, k, rngs, stride=1, groups=1, act=True):
        self.conv = nnx.Conv(c_in, c_out, (k, k), strides=stride, padding=[(k // 2, k // 2)] * 2,
                             feature_group_count=groups, use_bias=False, rngs=rngs)
        # PyTorch's momentum 0.1 is Flax's 0.9
        self.bn = nnx.BatchNorm(c_out, momentum=0.9, epsilon=1e-5, rngs=rngs)
        self.act = act

    def __call__(self, x):
        y = self.bn(self.conv(x))
        return jnp.clip(y, 0.0, 6.0) if self.act else y


class MBConv(nnx.Module):
    """MobileNetV2's inverted residual body: 1x1 expansion to ``expand`` times the channels
    (none when ``expand == 1``), depthwise ``k``x``k`` at ``stride``, linear 1x1 projection."""

    def __init__(self, c_in, c_out, k, stride, expand, rngs):
        mid = c_in * expand
        self.expand = ConvBN(c_in, mid, 1, rngs) if expand > 1 else None
        self.depthwise = ConvBN(mid, mid, k, rngs, stride, groups=mid)
        self.project = ConvBN(mid, c_out, 1, rngs, act=False)

    def __call__(self, x):
        if self.expand is not None:
            x = self.expand(x)
        return self.project(self.depthwise(x))


def block_ops(c_in, c_out, stride, keep, rngs) -> dict:
    """A searchable block's options in the built-in space's order (``zero`` last, where the
    block keeps its input's shape)."""
    ops = {}
    for name in KEEP_OPS if keep else MB_OPS:
        if name == "zero":
            ops[name] = Zero()
        else:
            _, k, e = name.split("_")
            ops[name] = MBConv(c_in, c_out, int(k[1:]), stride, int(e[1:]), rngs)
    return ops


class ChainNet(nnx.Module):
    """The supernet: stem, the plan's searchable blocks (a residual connection around those
    that keep their input's shape), head, classifier."""

    def __init__(self, rngs, config: ChainConfig = ChainConfig()):
        plan = chain_plan(config)
        self.stem = ConvBN(config.in_channels, plan.stem, 3, rngs, config.stem_stride)
        self.first = MBConv(plan.stem, plan.first, 3, 1, 1, rngs)
        self.residual = tuple(group == "keep" for group, *_ in plan.blocks)
        self.blocks = nnx.List([Choice(block_ops(c_in, c_out, stride, group == "keep", rngs), label=f"block{b}")
                                for b, (group, _, c_in, c_out, stride) in enumerate(plan.blocks)])
        self.head = ConvBN(plan.head_in, plan.last, 1, rngs)
        self.classifier = nnx.Linear(plan.last, config.num_classes, rngs=rngs)

    def __call__(self, x):
        x = self.first(self.stem(x))
        for residual, block in zip(self.residual, self.blocks):
            x = x + block(x) if residual else block(x)
        return self.classifier(jnp.mean(self.head(x), axis=(1, 2)))


def load_builtin_weights(model: ChainNet, params) -> None:
    """Write the built-in ``chain`` space's weights (``build_space("chain", ...).init(key)[0]``,
    same options) into ``model``: the two then compute the same supernet."""
    def conv_bn(m: ConvBN, p):   # the built-in's {"conv": {"w"}, "bn": {"scale", "bias"}}
        m.conv.kernel[...] = p["conv"]["w"]
        m.bn.scale[...], m.bn.bias[...] = p["bn"]["scale"], p["bn"]["bias"]

    def mbconv(m: MBConv, p):    # the built-in's parts in order: (expansion,) depthwise, projection
        parts = ([m.expand] if m.expand is not None else []) + [m.depthwise, m.project]
        for part, q in zip(parts, p, strict=True):
            conv_bn(part, q)

    conv_bn(model.stem, params["stem"][0])
    mbconv(model.first, params["stem"][1])
    for block, p in zip(model.blocks, params["blocks"], strict=True):
        for op, q in zip(block.candidates, p, strict=True):   # MixedOp: one entry per candidate
            if isinstance(op, MBConv):
                mbconv(op, q)
    conv_bn(model.head, params["head"])
    model.classifier.kernel[...], model.classifier.bias[...] = params["classifier"]["w"], params["classifier"]["b"]


def space(in_channels: int = 3, num_classes: int = 10, width_mult: float = 0.25, max_depth: int = 2,
          stem_stride: int = 1) -> ChainNet:
    """The supernet as a space factory for the command line (``--space examples.nnx_chain:space``).
    The defaults are the built-in space's search defaults (``--width-mult 0.25 --cells 2
    --stem-stride 1``): the mobile supernet scaled down for 32x32 images on a CPU."""
    depths = tuple(min(d, max_depth) for d in ChainConfig.stage_depths)
    config = dataclasses.replace(ChainConfig(), in_channels=in_channels, num_classes=num_classes,
                                 width_mult=width_mult, stem_stride=stem_stride, stage_depths=depths)
    return ChainNet(nnx.Rngs(0), config)
