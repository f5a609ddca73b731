"""Derived networks: the architecture a search chose, as a stand-alone network trained from scratch.

:func:`build_network` turns a genotype into a :class:`Network` (pure ``init``/``apply``, the
layer kit of :mod:`dnas.supernet.layers`), following each space's evaluation protocol:

* ``nb201`` — the NAS-Bench-201 evaluation network (Dong & Yang, ICLR 2020, Sec. 2.1): a 3x3
  convolution stem to C channels and BN, three stages of N cells with C, 2C, 4C channels joined
  by the residual reduction blocks, BN + ReLU, global average pooling, a linear classifier.
  Node ``j`` of a cell is ``Σ_{i<j} op_ij(node_i)`` over the genotype's ops (``none`` edges are
  left out; a node without inputs is zero), every BatchNorm with affine parameters. The
  benchmark's networks are C=16, N=5 (:data:`NB201_DEFAULTS`).
* ``darts`` — the DARTS CIFAR evaluation network (Liu, Simonyan & Yang, ICLR 2019, Sec. 3.3 and
  App. A.2): a 3x3 convolution stem to 3C channels and BN, L cells with reduction cells (stride
  2 on the edges from the cell inputs, channels doubled) at L/3 and 2L/3. A cell brings its two
  inputs to C channels (ReLU-conv 1x1-BN, or a factorized reduce after a reduction cell); each
  intermediate node is the sum of its two genotype pairs' ops; the output concatenates the
  concat nodes. Pooling is plain pooling (the supernet's BN after pooling is a search-time
  device), BatchNorm is affine. Training regularisers of the paper: drop path (FractalNet,
  Larsson et al., ICLR 2017) on every op but the identity, and the auxiliary classifier after
  the cell at 2L/3 (Szegedy et al. 2015; DARTS weighs it 0.4). The paper's CIFAR-10 network
  is C=36, L=20 (:data:`DARTS_DEFAULTS`: 3.3 M parameters for DARTS-V2).
* ``chain`` — the ProxylessNAS chain (Cai, Zhu & Han, ICLR 2019) with every searchable block
  replaced by its chosen MBConv; ``zero`` blocks are left out (their residual connection makes
  the block the identity). Built with the options of the space it was searched in (the block
  layout depends on them).

``apply(params, state, x, ctx, drop=None)`` returns an :class:`Output` (logits, auxiliary
logits or ``None``, new BatchNorm state); ``drop`` is a :class:`DropPath` (key and
probability) during training, ``None`` otherwise.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from dnas.supernet import layers as L
from dnas.supernet.genotype import (ChainGenotype, DartsGenotype, Genotype, GenotypeError,
                                    NB201Genotype)
from dnas.supernet.ops import darts_op, nb201_op

#: The NAS-Bench-201 evaluation network's size (the benchmark trains every cell in it).
NB201_DEFAULTS = {"channels": 16, "cells_per_stage": 5}
#: The DARTS paper's CIFAR-10 evaluation network.
DARTS_DEFAULTS = {"channels": 36, "layers": 20, "stem_multiplier": 3}


class Output(NamedTuple):
    logits: jax.Array
    aux_logits: jax.Array | None
    state: Any


class DropPath(NamedTuple):
    """Drop path during training: each op's output (identity ops excepted) is zeroed per example
    with probability ``prob`` and scaled by ``1 / (1 - prob)`` otherwise (DARTS's schedule raises
    ``prob`` linearly from 0 over the epochs). ``key``: the step's PRNG key."""

    key: jax.Array
    prob: Any


class Network(NamedTuple):
    init: Callable[[jax.Array], tuple[Any, Any]]
    apply: Callable[..., Output]
    genotype: Genotype
    config: dict


def drop_path(x: jax.Array, key: jax.Array, prob) -> jax.Array:
    """Zero each example of ``x`` with probability ``prob``; survivors scaled by ``1/(1-prob)``,
    so the expectation is ``x`` (FractalNet's drop path as DARTS applies it, per op)."""
    keep = 1.0 - jnp.asarray(prob, x.dtype)
    mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, jnp.zeros((), x.dtype))


def _drop_key(drop: DropPath, ctx: L.Ctx, index: int) -> jax.Array:
    key = jax.random.fold_in(drop.key, index)
    if ctx.axis_name is not None:   # data parallel: each device drops paths of its own examples
        key = jax.random.fold_in(key, lax.axis_index(ctx.axis_name))
    return key


def count_params(params) -> int:
    """Number of trainable parameters (BatchNorm running statistics are state, not counted)."""
    return int(sum(a.size for a in jax.tree_util.tree_leaves(params)))


def _check_options(space: str, options: dict, allowed) -> None:
    bad = sorted(set(options) - set(allowed))
    if bad:
        raise ValueError(f"derived {space} network has no option(s) {bad}; options: {sorted(allowed)}")


# ------------------------------------------------------------------------------ NAS-Bench-201

def nb201_network(g: NB201Genotype, *, channels: int = 16, cells_per_stage: int = 5, num_classes: int = 10,
                  in_channels: int = 3, impl: str | None = None) -> Network:
    from dnas.supernet.spaces import _resnet_block

    widths = (channels, 2 * channels, 4 * channels)
    stem = L.sequential(L.conv(in_channels, channels, 3, 1, 1), L.batchnorm(channels, True))
    edges = [(s, d, op) for s, d, op in g.edges() if op != "none"]
    cell_ops = [[nb201_op(op, w, 1, affine=True, impl=impl) for _, _, op in edges] for w in widths]
    reductions = [_resnet_block(widths[i], widths[i + 1], 2) for i in range(2)]
    head_bn = L.batchnorm(widths[-1], True)
    classifier = L.dense(widths[-1], num_classes)

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


# ------------------------------------------------------------------------------ DARTS

class _DartsCell:
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
                    y = drop_path(y, _drop_key(drop, ctx, index * len(self.pairs) + j), drop.prob)
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
    c_curr = stem_multiplier * channels
    stem = L.sequential(L.conv(in_channels, c_curr, 3, 1, 1), L.batchnorm(c_curr, True))
    c_pp, c_p, c_curr = c_curr, c_curr, channels
    cells, reduction_prev, aux_at, c_aux = [], False, None, None
    for i in range(layers):
        reduction = layers >= 3 and i in (layers // 3, 2 * layers // 3)   # as in the supernet
        if reduction:
            c_curr *= 2
        cell = _DartsCell(g, c_pp, c_p, c_curr, reduction, reduction_prev, impl)
        cells.append(cell)
        reduction_prev = reduction
        c_pp, c_p = c_p, cell.c_out
        if i == 2 * layers // 3:
            aux_at, c_aux = i, c_p
    aux = _aux_head(c_aux, num_classes) if auxiliary else None
    classifier = L.dense(c_p, num_classes)

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


# ------------------------------------------------------------------------------ chain

def chain_network(g: ChainGenotype, **options) -> Network:
    from dnas.supernet.chain import ChainConfig, ChainSpace, chain_op

    _check_options("chain", options, [f.name for f in dataclasses.fields(ChainConfig)])
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


# ------------------------------------------------------------------------------ registry

_OPTIONS = {"nb201": ("channels", "cells_per_stage", "num_classes", "in_channels", "impl"),
            "darts": ("channels", "layers", "num_classes", "in_channels", "stem_multiplier", "auxiliary", "impl")}


def build_network(genotype: Genotype, **options) -> Network:
    """The stand-alone network of ``genotype`` (any space), with the space's options
    (``channels``, ``cells_per_stage``/``layers``, ``num_classes``, ``in_channels``, ...;
    an unknown option is an error naming the valid ones)."""
    if isinstance(genotype, NB201Genotype):
        _check_options("nb201", options, _OPTIONS["nb201"])
        return nb201_network(genotype, **options)
    if isinstance(genotype, DartsGenotype):
        _check_options("darts", options, _OPTIONS["darts"])
        return darts_network(genotype, **options)
    if isinstance(genotype, ChainGenotype):
        return chain_network(genotype, **options)
    raise GenotypeError(f"build_network: not a genotype: {type(genotype).__name__} {genotype!r}")


__all__ = ["Network", "Output", "DropPath", "build_network", "nb201_network", "darts_network", "chain_network",
           "drop_path", "count_params", "NB201_DEFAULTS", "DARTS_DEFAULTS"]
