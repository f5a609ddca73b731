"""The ProxylessNAS / MobileNetV2-style chain space (Cai, Zhu & Han, ICLR 2019, Sec. 4 / Fig. 4).

A fixed stem (3x3 conv, stride 2, 32 channels; an MBConv with expansion 1 and kernel 3 to 16
channels), then stages of searchable MBConv blocks (widths 24/40/80/96/192/320, depths
4/4/4/4/4/1, first-block strides 2/2/2/1/2/1), a 1x1 conv to 1280 channels, global pooling
and the classifier. Each searchable block chooses among MBConv with kernel {3, 5, 7} x
expansion {3, 6} (``mb_k{k}_e{e}``); a block that keeps its shape (stride 1, same width)
has a residual connection and may also choose ``zero`` (the block is skipped).

The space is declared once, as a Flax NNX model with ``dnas.nnx`` choice points
(:class:`ChainNet`: every searchable block a :class:`~dnas.nnx.Choice` labelled ``block{b}``,
with ``zero`` last where the block keeps its shape): the supernet, the stand-alone network
``dnas train`` trains (:func:`chain_network`, :func:`dnas.fix` of it) and the latency model's
parts (:meth:`ChainSpace.latency_walk`) are built from its modules. ``width_mult``, the stage
depths and the input size scale it down to search on 32x32 data on a CPU; the defaults are the
ProxylessNAS mobile supernet at 224x224, which the published Pixel-1 latency table covers
block by block.
"""
from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
from flax import nnx

from dnas.nnx import Choice, Zero
from dnas.supernet.genotype import ChainGenotype, GenotypeError
from dnas.supernet.network import Network, check_options
from dnas.supernet.nnx_kernels import HE_NORMAL, PooledLinear, TorchBatchNorm
from dnas.supernet.nnx_space import NNXSpace, module_layer
from dnas.supernet.space_base import refuse_flags

MB_OPS = ("mb_k3_e3", "mb_k3_e6", "mb_k5_e3", "mb_k5_e6", "mb_k7_e3", "mb_k7_e6")
KEEP_OPS = MB_OPS + ("zero",)


def make_divisible(v: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of ``divisor`` (MobileNetV2's rule, never -10 %)."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


class ConvBN(nnx.Module):
    """Convolution (padding ``k // 2``, no bias, He-initialised as before the chain was an NNX
    model: :func:`~dnas.supernet.nnx_kernels.HE_NORMAL`), BatchNorm (PyTorch's conventions, as
    ProxylessNAS's code: :class:`~dnas.supernet.nnx_kernels.TorchBatchNorm`), ReLU6 unless
    ``act=False``."""

    def __init__(self, c_in, c_out, k, rngs, stride=1, groups=1, act=True):
        self.conv = nnx.Conv(c_in, c_out, (k, k), strides=stride, padding=[(k // 2, k // 2)] * 2,
                             feature_group_count=groups, use_bias=False, kernel_init=HE_NORMAL, rngs=rngs)
        self.bn = TorchBatchNorm(c_out, rngs)
        self.act = act

    def __call__(self, x):
        y = self.bn(self.conv(x))
        return jnp.clip(y, 0.0, 6.0) if self.act else y


class MBConv(nnx.Module):
    """MobileNetV2's inverted residual body (Sandler et al., CVPR 2018): 1x1 expansion to
    ``expand`` times the channels (none when ``expand == 1``), depthwise ``k``x``k`` at
    ``stride``, linear 1x1 projection; BatchNorm after each, ReLU6 after the first two."""

    def __init__(self, c_in, c_out, k, stride, expand, rngs):
        mid = c_in * expand
        self.expand = ConvBN(c_in, mid, 1, rngs) if expand > 1 else None
        self.depthwise = ConvBN(mid, mid, k, rngs, stride, groups=mid)
        self.project = ConvBN(mid, c_out, 1, rngs, act=False)

    def __call__(self, x):
        if self.expand is not None:
            x = self.expand(x)
        return self.project(self.depthwise(x))


def chain_op(name: str, c_in: int, c_out: int, stride: int, rngs: nnx.Rngs) -> nnx.Module:
    """One candidate of a chain block: ``mb_k{3,5,7}_e{3,6}`` or ``zero`` (the block left out:
    only where its residual connection keeps the input, stride 1 and the same width)."""
    if name not in KEEP_OPS:
        from dnas.supernet.ops import UnknownOpError
        raise UnknownOpError(f"unknown chain operation {name!r}; valid operations are: {', '.join(KEEP_OPS)}")
    if name == "zero":
        return Zero()
    _, k, e = name.split("_")
    return MBConv(c_in, c_out, int(k[1:]), stride, int(e[1:]), rngs)


@dataclasses.dataclass(frozen=True)
class ChainConfig:
    num_classes: int = 1000
    in_channels: int = 3
    width_mult: float = 1.0
    stem_channels: int = 32
    first_channels: int = 16
    stage_widths: tuple = (24, 40, 80, 96, 192, 320)
    stage_depths: tuple = (4, 4, 4, 4, 4, 1)
    stage_strides: tuple = (2, 2, 2, 1, 2, 1)
    stem_stride: int = 2
    last_channels: int = 1280
    impl: str | None = None       # accepted for a uniform interface; depthwise convs are native
    unroll: bool | None = None    # the chain is always a Python loop (every block differs)
    kernels: str = "auto"         # dnas.backend kernel policy: auto, xla_cpu or native


@dataclasses.dataclass(frozen=True)
class ChainPlan:
    """The chain's widths and block layout under a :class:`ChainConfig`: the stem convolution's
    and the first MBConv's channels, the searchable blocks as ``(group, index in group, c_in,
    c_out, stride)``, the channels entering the head and the head convolution's. ``group`` is ``"keep"`` for a block that
    keeps its input's shape (stride 1, same width: a residual connection, and ``zero`` among
    its options), ``"reshape"`` otherwise."""
    stem: int
    first: int
    blocks: tuple
    head_in: int
    last: int


def chain_plan(c: ChainConfig) -> ChainPlan:
    """Widths scaled by ``width_mult`` (:func:`make_divisible`), each stage's first block at the
    stage's stride, the head keeping 1280 channels unless the width grows (ProxylessNAS's and
    MobileNetV2's rule)."""
    w = lambda ch: make_divisible(ch * c.width_mult)  # noqa: E731
    blocks, c_in, counts = [], w(c.first_channels), {"reshape": 0, "keep": 0}
    for width, depth, stride in zip(c.stage_widths, c.stage_depths, c.stage_strides):
        for i in range(depth):
            s = stride if i == 0 else 1
            group = "keep" if (s == 1 and c_in == w(width)) else "reshape"
            blocks.append((group, counts[group], c_in, w(width), s))
            counts[group] += 1
            c_in = w(width)
    return ChainPlan(w(c.stem_channels), w(c.first_channels), tuple(blocks), c_in,
                     w(c.last_channels) if c.width_mult > 1 else c.last_channels)


class ChainNet(nnx.Module):
    """The supernet, declared with ``dnas.nnx``'s primitives: stem (a 3x3 convolution and an
    MBConv of expansion 1), the plan's searchable blocks (each a :class:`~dnas.nnx.Choice`
    labelled ``block{b}``; a residual connection around those that keep their input's shape),
    the 1x1 head convolution, pooling and the classifier."""

    def __init__(self, rngs: nnx.Rngs, config: ChainConfig = ChainConfig()):
        plan = chain_plan(config)
        self.stem = ConvBN(config.in_channels, plan.stem, 3, rngs, config.stem_stride)
        self.first = MBConv(plan.stem, plan.first, 3, 1, 1, rngs)
        self.residual = tuple(group == "keep" for group, *_ in plan.blocks)
        self.blocks = nnx.List([
            Choice({op: chain_op(op, c_in, c_out, stride, rngs) for op in (KEEP_OPS if group == "keep" else MB_OPS)},
                   label=f"block{b}")
            for b, (group, _, c_in, c_out, stride) in enumerate(plan.blocks)])
        self.head = ConvBN(plan.head_in, plan.last, 1, rngs)
        self.classifier = PooledLinear(plan.last, config.num_classes, rngs)

    def __call__(self, x):
        x = self.first(self.stem(x))
        for residual, block in zip(self.residual, self.blocks):
            x = x + block(x) if residual else block(x)
        return self.classifier(self.head(x))


class ChainSpace(NNXSpace):
    """The chain as a search space: :class:`ChainNet` searched as any NNX model is
    (:class:`~dnas.supernet.nnx_space.NNXSpace`: one choice point per block, its α a row of
    its own), with the space's defaults and evaluation protocol, the searched layout's
    stand-alone network (:func:`chain_network`) and the latency model keyed by the published
    ProxylessNAS tables' keys (:meth:`latency_walk`)."""

    name = "chain"
    op_names = KEEP_OPS
    latency_input_size = 224   # ProxylessNAS's mobile setting, which the published tables cover
    #: the ProxylessNAS mobile supernet scaled down for small images on a CPU
    search_defaults = {"--width-mult": 0.25, "--cells": 2, "--stem-stride": 1}
    bench_defaults = search_defaults
    #: SGD with Nesterov momentum 0.9, learning rate 0.05 cosine to 0, weight decay 4e-5, label
    #: smoothing 0.1, batch 128 (a small-batch version of ProxylessNAS's ImageNet recipe); the
    #: network is the searched chain's layout (:meth:`network_options_from_search`)
    train_protocol = {"batch_size": 128, "lr": 0.05, "nesterov": True, "weight_decay": 4e-5, "grad_clip": None,
                      "drop_path": 0.0, "cutout": 0, "auxiliary_weight": 0.0, "label_smoothing": 0.1,
                      "network": {}}

    @classmethod
    def options_from_flags(cls, flags: dict) -> dict:
        """``--width-mult``, ``--cells`` (at most that many blocks per stage), ``--stem-stride``
        and ``--conv-impl``; ``--channels`` and ``--loops`` are refused."""
        flags = dict(flags)
        if flags.pop("--channels", None):
            raise ValueError("--channels does not apply to the chain space; use --width-mult")
        if flags.pop("--loops", None) is not None:
            raise ValueError("--loops does not apply to the chain space (its blocks all differ: always unrolled)")
        opts = {"width_mult": flags.pop("--width-mult", None), "stem_stride": flags.pop("--stem-stride", None),
                "impl": flags.pop("--conv-impl", None)}
        cells = flags.pop("--cells", None)
        if cells is not None:
            opts["stage_depths"] = tuple(min(d, cells) for d in ChainConfig.stage_depths)
        refuse_flags(flags, cls.name)
        return {k: v for k, v in opts.items() if v is not None}

    @classmethod
    def network_options_from_search(cls, space_options: dict) -> dict:
        """The searched chain's layout (every config field but the data-given ones)."""
        fields = {f.name for f in dataclasses.fields(ChainConfig)} - {"num_classes", "in_channels", "unroll", "impl"}
        return {k: (tuple(v) if isinstance(v, list) else v) for k, v in space_options.items() if k in fields}

    def __init__(self, config: ChainConfig = ChainConfig()):
        super().__init__(functools.partial(ChainNet, config=config), name="chain", kernels=config.kernels)
        self.config = config
        self.plan = chain_plan(config)

    @property
    def blocks(self) -> tuple:
        """The searchable blocks, ``(group, index in group, c_in, c_out, stride)`` (the plan's)."""
        return self.plan.blocks

    def derive(self, scores) -> ChainGenotype:
        """Every block's best-scored option (ties: the earlier), as a :class:`ChainGenotype`."""
        return ChainGenotype.from_choices(super().derive(scores).choices)

    @classmethod
    def network(cls, genotype, **options) -> Network:
        """The stand-alone network of ``genotype`` (:func:`chain_network`)."""
        return chain_network(genotype, **options)

    def latency_walk(self, input_size: int) -> tuple[list, list]:
        """Every block with its candidates' signatures under the ProxylessNAS keys
        (``expanded_conv-...``; the default configuration is covered by the published Pixel-1
        table key for key), and the fixed stem, head and classifier. What a signature builds
        (to profile it) is the supernet's own module (:func:`~dnas.supernet.nnx_space.module_layer`)."""
        from dnas.latency.space_latency import ChoicePoint, OpSignature, fixed_part, output_shape_of

        cfg, plan = self.config, self.plan
        hw = (input_size, input_size)
        conv = fixed_part("Conv", module_layer(lambda rngs: ConvBN(cfg.in_channels, plan.stem, 3, rngs, cfg.stem_stride)),
                          hw + (cfg.in_channels,))
        first = module_layer(lambda rngs: MBConv(plan.stem, plan.first, 3, 1, 1, rngs))
        first_out = output_shape_of(first, conv.output_shape)
        first_sig = OpSignature("expanded_conv", _mb_key(conv.output_shape, first_out, 1, 3, 1, False),
                                conv.output_shape, first_out,
                                (("expand", 1), ("kernel", 3), ("stride", 1), ("idskip", 0)),
                                build=lambda: first)
        fixed, points = [conv, first_sig], []
        shape = first_out
        for b, (group, _, c_in, c_out, stride) in enumerate(self.blocks):
            keep = group == "keep"
            out_shape = (-(-shape[0] // stride), -(-shape[1] // stride), c_out)
            cands = []
            for op in (KEEP_OPS if keep else MB_OPS):
                if op == "zero":
                    cands.append(OpSignature(op, None, shape, out_shape))
                    continue
                _, k, e = op.split("_")
                kernel, expand = int(k[1:]), int(e[1:])
                attrs = (("expand", expand), ("kernel", kernel), ("stride", stride), ("idskip", int(keep)))
                build = (lambda op=op, c_in=c_in, c_out=c_out, stride=stride:
                         module_layer(lambda rngs: chain_op(op, c_in, c_out, stride, rngs)))
                cands.append(OpSignature(op, _mb_key(shape, out_shape, expand, kernel, stride, keep), shape, out_shape,
                                         attrs, build=build, residual=keep))
            points.append(ChoicePoint(f"block{b}", 0, f"block{b}", tuple(cands)))
            shape = out_shape
        head = fixed_part("Conv_1", module_layer(lambda rngs: ConvBN(plan.head_in, plan.last, 1, rngs)), shape)
        logits = fixed_part("Logits", module_layer(lambda rngs: PooledLinear(plan.last, cfg.num_classes, rngs)),
                            head.output_shape)
        return points, fixed + [head, logits]


def _mb_key(c_in_shape: tuple, c_out_shape: tuple, expand: int, kernel: int, stride: int, idskip: bool) -> str:
    from dnas.latency.table import signature_key
    return signature_key("expanded_conv", c_in_shape, c_out_shape,
                         [("expand", expand), ("kernel", kernel), ("stride", stride), ("idskip", int(idskip))])


# ------------------------------------------------------------------------------ derived network

def chain_network(g, **options) -> Network:
    """The ProxylessNAS chain (Cai, Zhu & Han, ICLR 2019) with every searchable block replaced by
    its chosen MBConv: :func:`dnas.fix` of the :class:`ChainNet` built with ``options`` (the
    block layout depends on them: build it with the options of the space it was searched in);
    a ``zero`` block leaves its residual connection, the identity. ``g``: a
    :class:`ChainGenotype` or a mapping ``"block{b}"`` -> op."""
    check_options("chain", options, [f.name for f in dataclasses.fields(ChainConfig)])
    space = ChainSpace(ChainConfig(**options))
    ops = (g if isinstance(g, ChainGenotype) else ChainGenotype.from_choices(g)).ops
    if len(ops) != len(space.blocks):
        raise GenotypeError(f"chain genotype has {len(ops)} blocks but the chain space built with "
                            f"{options or 'its defaults'} has {len(space.blocks)}: build it with the options "
                            "of the space it was searched in")
    for b, (op, (group, _, c_in, c_out, stride)) in enumerate(zip(ops, space.blocks)):
        valid = KEEP_OPS if group == "keep" else MB_OPS
        if op not in valid:
            raise GenotypeError(f"chain block {b} ({c_in}->{c_out} channels, stride {stride}) cannot be {op!r}; "
                                f"valid operations there are: {', '.join(valid)}")
    genotype = ChainGenotype(ops)
    net = NNXSpace.network(space, genotype)
    return net._replace(genotype=genotype, config={"space": "chain", **dataclasses.asdict(space.config)})
