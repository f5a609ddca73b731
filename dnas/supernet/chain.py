"""The ProxylessNAS / MobileNetV2-style chain space (Cai, Zhu & Han, ICLR 2019, Sec. 4 / Fig. 4).

A fixed stem (3x3 conv, stride 2, 32 channels; an MBConv with expansion 1 and kernel 3 to 16
channels), then stages of searchable MBConv blocks (widths 24/40/80/96/192/320, depths
4/4/4/4/4/1, first-block strides 2/2/2/1/2/1), a 1x1 conv to 1280 channels, global pooling
and the classifier. Each searchable block chooses among MBConv with kernel {3, 5, 7} x
expansion {3, 6} (``mb_k{k}_e{e}``); a block that keeps its shape (stride 1, same width)
has a residual connection and may also choose ``zero`` (the block is skipped).

The two kinds of block are two groups of choice points, so every relaxation works on plain
matrices: ``reshape`` (first block of a stage, 6 ops) and ``keep`` (7 ops, ``zero`` last).
``width_mult``, the stage depths and the input size scale it down to search on 32x32 data on
a CPU; the defaults are the ProxylessNAS mobile supernet at 224x224, which the published
Pixel-1 latency table covers block by block.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dnas.backend import resolve
from dnas.supernet import layers as L
from dnas.supernet.genotype import ChainGenotype, GenotypeError, derive_chain
from dnas.supernet.mixed import MixedOp
from dnas.supernet.network import Network, Output, check_options
from dnas.supernet.space_base import SearchSpace, refuse_flags

MB_OPS = ("mb_k3_e3", "mb_k3_e6", "mb_k5_e3", "mb_k5_e6", "mb_k7_e3", "mb_k7_e6")
KEEP_OPS = MB_OPS + ("zero",)


def make_divisible(v: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of ``divisor`` (MobileNetV2's rule, never -10 %)."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


def _conv_bn(c_in, c_out, kernel, stride, groups=1, act=True) -> L.Layer:
    conv = L.conv(c_in, c_out, kernel, stride, groups=groups)
    bn = L.batchnorm(c_out, True)

    def init(key):
        (pc, _), (pb, sb) = conv.init(key), bn.init(None)
        return {"conv": pc, "bn": pb}, sb

    def apply(p, s, x, ctx):
        y, _ = conv.apply(p["conv"], (), x, ctx)
        y, s = bn.apply(p["bn"], s, y, ctx)
        return (jnp.clip(y, 0.0, 6.0) if act else y), s

    return L.Layer(init, apply)


def mbconv(c_in: int, c_out: int, kernel: int, stride: int, expand: int) -> L.Layer:
    """Inverted residual body (Sandler et al. 2018): 1x1 expand, depthwise kxk, 1x1 project,
    BN after each, ReLU6 after the first two (no expansion conv when ``expand == 1``)."""
    mid = c_in * expand
    parts = ([] if expand == 1 else [_conv_bn(c_in, mid, 1, 1)]) + [
        _conv_bn(mid, mid, kernel, stride, groups=mid), _conv_bn(mid, c_out, 1, 1, act=False)]
    return L.sequential(*parts)


def chain_op(name: str, c_in: int, c_out: int, stride: int) -> L.Layer:
    """One candidate of a chain block: ``mb_k{3,5,7}_e{3,6}`` or ``zero``."""
    if name not in KEEP_OPS:
        from dnas.supernet.ops import UnknownOpError
        raise UnknownOpError(f"unknown chain operation {name!r}; valid operations are: {', '.join(KEEP_OPS)}")
    if name == "zero":
        return L.zero(stride)
    _, k, e = name.split("_")
    return mbconv(c_in, c_out, int(k[1:]), stride, int(e[1:]))


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
    MobileNetV2's rule). The built-in space and a model written with ``dnas.nnx``
    (``examples/nnx_chain.py``) both build from it."""
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


class ChainSpace(SearchSpace):
    honours_compute_dtype = True   # every convolution through dnas.supernet.layers._conv
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
        self.config = c = config
        self.kernels = resolve(c.kernels)
        plan = self.plan = chain_plan(c)
        self.stem = L.sequential(_conv_bn(c.in_channels, plan.stem, 3, c.stem_stride),
                                 mbconv(plan.stem, plan.first, 3, 1, 1))
        self.blocks = list(plan.blocks)   # (group, index in group, c_in, c_out, stride)
        counts = {g: sum(b[0] == g for b in plan.blocks) for g in ("reshape", "keep")}
        self.groups = {g: (n, len(MB_OPS) + (g == "keep")) for g, n in counts.items() if n}
        self.mixed = [MixedOp([chain_op(o, ci, co, s) for o in self.group_op_names(g)])
                      for g, _, ci, co, s in self.blocks]
        self.head = _conv_bn(plan.head_in, plan.last, 1, 1)
        self.classifier = L.dense(plan.last, c.num_classes)

    def group_op_names(self, group: str) -> tuple[str, ...]:
        return KEEP_OPS if group == "keep" else MB_OPS

    def choice_point_names(self, group: str) -> list[str]:
        return [f"block{b}" for b, (g, *_rest) in enumerate(self.blocks) if g == group]

    def init(self, key):
        keys = jax.random.split(key, len(self.blocks) + 3)
        params, state = {}, {}
        params["stem"], state["stem"] = self.stem.init(keys[0])
        inits = [m.init(k) for m, k in zip(self.mixed, keys[1:])]
        params["blocks"], state["blocks"] = [p for p, _ in inits], [s for _, s in inits]
        params["head"], state["head"] = self.head.init(keys[-2])
        params["classifier"], _ = self.classifier.init(keys[-1])
        return params, state

    def apply(self, params, state, x, samples, mix, ctx):
        ctx = L.with_kernels(ctx, self.kernels)
        new_state = {}
        x, new_state["stem"] = self.stem.apply(params["stem"], state["stem"], x, ctx)
        block_states = []
        for b, (group, i, _, _, _) in enumerate(self.blocks):
            smp = jax.tree_util.tree_map(lambda a: a[i], samples[group])
            y, s = self.mixed[b].apply(params["blocks"][b], state["blocks"][b], x, smp, mix, ctx)
            x = x + y if group == "keep" else y
            block_states.append(s)
        new_state["blocks"] = block_states
        x, new_state["head"] = self.head.apply(params["head"], state["head"], x, ctx)
        logits, _ = self.classifier.apply(params["classifier"], (), jnp.mean(x, axis=(1, 2)), ctx)
        return logits, new_state

    def derive(self, scores) -> ChainGenotype:
        per_group = {g: derive_chain(jnp.asarray(scores[g]), self.group_op_names(g)) for g in self.groups}
        return ChainGenotype(tuple(per_group[g][i] for g, i, *_ in self.blocks))

    @staticmethod
    def network(genotype: ChainGenotype, **options) -> Network:
        """The stand-alone network of ``genotype`` (:func:`chain_network`)."""
        return chain_network(genotype, **options)

    def latency_walk(self, input_size: int) -> tuple[list, list]:
        """Every block with its candidates' signatures under the ProxylessNAS keys
        (``expanded_conv-...``; the default configuration is covered by the published Pixel-1
        table key for key), and the fixed stem, head and classifier."""
        from dnas.latency.space_latency import ChoicePoint, OpSignature, fixed_part, head_layer, output_shape_of

        space, cfg, plan = self, self.config, self.plan
        hw = (input_size, input_size)
        stem_conv = _conv_bn(cfg.in_channels, plan.stem, 3, cfg.stem_stride)
        conv = fixed_part("Conv", stem_conv, hw + (cfg.in_channels,))
        first = mbconv(plan.stem, plan.first, 3, 1, 1)
        first_out = output_shape_of(first, conv.output_shape)
        first_sig = OpSignature("expanded_conv", _mb_key(conv.output_shape, first_out, 1, 3, 1, False),
                                conv.output_shape, first_out,
                                (("expand", 1), ("kernel", 3), ("stride", 1), ("idskip", 0)),
                                build=lambda: first)
        fixed, points = [conv, first_sig], []
        shape = first_out
        for b, (group, row, c_in, c_out, stride) in enumerate(space.blocks):
            keep = group == "keep"
            out_shape = (-(-shape[0] // stride), -(-shape[1] // stride), c_out)
            cands = []
            for op in space.group_op_names(group):
                if op == "zero":
                    cands.append(OpSignature(op, None, shape, out_shape))
                    continue
                _, k, e = op.split("_")
                kernel, expand = int(k[1:]), int(e[1:])
                attrs = (("expand", expand), ("kernel", kernel), ("stride", stride), ("idskip", int(keep)))
                build = (lambda c_in=c_in, c_out=c_out, kernel=kernel, stride=stride, expand=expand:
                         mbconv(c_in, c_out, kernel, stride, expand))
                cands.append(OpSignature(op, _mb_key(shape, out_shape, expand, kernel, stride, keep), shape, out_shape,
                                         attrs, build=build, residual=keep))
            points.append(ChoicePoint(group, row, f"block{b}", tuple(cands)))
            shape = out_shape
        head = fixed_part("Conv_1", space.head, shape)
        logits = fixed_part("Logits", head_layer(None, space.classifier, False), head.output_shape)
        return points, fixed + [head, logits]


def _mb_key(c_in_shape: tuple, c_out_shape: tuple, expand: int, kernel: int, stride: int, idskip: bool) -> str:
    from dnas.latency.table import signature_key
    return signature_key("expanded_conv", c_in_shape, c_out_shape,
                         [("expand", expand), ("kernel", kernel), ("stride", stride), ("idskip", int(idskip))])


# ------------------------------------------------------------------------------ derived network

def chain_network(g: ChainGenotype, **options) -> Network:
    """The ProxylessNAS chain (Cai, Zhu & Han, ICLR 2019) with every searchable block replaced by
    its chosen MBConv, on the fixed parts of the :class:`ChainSpace` built with ``options`` (the
    block layout depends on them: build it with the options of the space it was searched in);
    ``zero`` blocks are left out (their residual connection makes the block the identity)."""
    check_options("chain", options, [f.name for f in dataclasses.fields(ChainConfig)])
    space = ChainSpace(ChainConfig(**options))
    if len(g.ops) != len(space.blocks):
        raise GenotypeError(f"chain genotype has {len(g.ops)} blocks but the chain space built with "
                            f"{options or 'its defaults'} has {len(space.blocks)}: build it with the options "
                            "of the space it was searched in")
    blocks = []
    for b, (op, (group, _, c_in, c_out, stride)) in enumerate(zip(g.ops, space.blocks)):
        valid = space.group_op_names(group)
        if op not in valid:
            raise GenotypeError(f"chain block {b} ({c_in}->{c_out} channels, stride {stride}) cannot be {op!r}; "
                                f"valid operations there are: {', '.join(valid)}")
        blocks.append((group == "keep", None if op == "zero" else chain_op(op, c_in, c_out, stride)))

    def init(key):
        keys = jax.random.split(key, len(blocks) + 3)
        params, state = {}, {}
        params["stem"], state["stem"] = space.stem.init(keys[0])
        inits = [((), ()) if layer is None else layer.init(k) for (_, layer), k in zip(blocks, keys[1:])]
        params["blocks"], state["blocks"] = [p for p, _ in inits], [s for _, s in inits]
        params["head"], state["head"] = space.head.init(keys[-2])
        params["classifier"], _ = space.classifier.init(keys[-1])
        return params, state

    def apply(params, state, x, ctx, drop=None):
        new = {}
        x, new["stem"] = space.stem.apply(params["stem"], state["stem"], x, ctx)
        new["blocks"] = []
        for (residual, layer), p, s in zip(blocks, params["blocks"], state["blocks"]):
            if layer is not None:
                y, s = layer.apply(p, s, x, ctx)
                x = x + y if residual else y
            new["blocks"].append(s)
        x, new["head"] = space.head.apply(params["head"], state["head"], x, ctx)
        logits, _ = space.classifier.apply(params["classifier"], (), jnp.mean(x, axis=(1, 2)), ctx)
        return Output(logits, None, new)

    return Network(init, apply, g, {"space": "chain", **dataclasses.asdict(space.config)})
