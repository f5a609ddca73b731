"""What a search space costs: its choice points, the signature of every candidate op, the
fixed parts, and the latency matrices a table gives them.

:func:`describe_space` walks a built space (``dnas.supernet.spaces.build_space(name, ...)``)
through its public attributes only, and returns a :class:`SpaceLatencyModel`:

* one :class:`ChoicePoint` per *use* of a choice point: NAS-Bench-201's edge ``0->1`` is one
  row of the ``cell`` group but is used by every cell of every stage, at three widths; a DARTS
  ``normal`` edge is used by every normal cell; a chain block is used once;
* per candidate op an :class:`OpSignature` — the op, its per-example input and output shape,
  stride, kernel, expansion, ... and its table key (:func:`dnas.latency.table.signature_key`);
  ops that compute nothing (``none``, ``zero``) have key ``None`` and cost 0 ms;
* the fixed (non-searchable) parts: stems, reduction blocks, cell preprocessing, heads.

For the chain space the keys are the ProxylessNAS keys (``Conv-...``, ``expanded_conv-...``,
``Conv_1-...``, ``Logits-...``), so the default configuration (ProxylessNAS mobile, input
224, width 1.0) is covered by ``proxylessnas_mobile_trim.yaml`` key for key. NAS-Bench-201
and DARTS keys are qualified by the space (``nb201/nor_conv_3x3-input:32x32x16-...``).

:func:`latency_matrix` turns a model and a :class:`~dnas.latency.table.LatencyTable` into
``({group: (num_choice_points, num_ops) array in ms}, fixed_ms)``: entry ``[i, j]`` is the
summed latency of op ``j`` over every use of choice point ``i`` — exactly what
:func:`dnas.latency.loss.expected_latency` takes. A table lacking keys raises
:class:`~dnas.latency.table.MissingLatencyKeysError` naming all of them.

Tables learnt by :mod:`dnas.latency.fit` are not per signature but per choice point
(``meta["granularity"] == "choice_point"``: keys ``choice/<group>/<row>/<op>`` and ``fixed``)
or per op (``"op"``: keys ``op/<group>/<op>``, every use of a choice point costs the same);
:func:`latency_matrix` reads those too.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from dnas.latency.table import LatencyTable, LatencyTableError, MissingLatencyKeysError, signature_key  # noqa: F401 (re-exported)
from dnas.supernet import layers as L
from dnas.supernet.context import Ctx

#: Keys of tables learnt per choice point / per op (see :mod:`dnas.latency.fit`).
FIXED_KEY = "fixed"


def choice_key(group: str, row: int, op: str) -> str:
    return f"choice/{group}/{row}/{op}"


def op_key(group: str, op: str) -> str:
    return f"op/{group}/{op}"


@dataclasses.dataclass(frozen=True)
class OpSignature:
    """One candidate op (or fixed part) at one place in the network.

    ``key`` is ``None`` for ops that compute nothing (0 ms). ``build()`` returns the
    :class:`dnas.supernet.layers.Layer` to profile it (``residual``: profile ``op(x) + x``,
    the ProxylessNAS ``idskip:1`` convention). Shapes are per example (HWC, or ``(C,)``)."""

    op: str
    key: str | None
    input_shape: tuple
    output_shape: tuple
    attrs: tuple = ()
    build: Callable[[], L.Layer] | None = dataclasses.field(default=None, compare=False, repr=False)
    residual: bool = False
    where: str = ""          # for fixed parts: where in the network (e.g. ``stage0/cell2/node3``)

    def describe(self) -> dict:
        return {"op": self.op, "key": self.key, "input": list(self.input_shape), "output": list(self.output_shape),
                **{k: v for k, v in self.attrs}}


@dataclasses.dataclass(frozen=True)
class ChoicePoint:
    """One use of row ``row`` of group ``group``; ``candidates[j]`` is op column ``j``."""

    group: str
    row: int
    where: str
    candidates: tuple[OpSignature, ...]


@dataclasses.dataclass
class SpaceLatencyModel:
    space: str
    input_size: int
    in_channels: int
    groups: dict[str, tuple[int, int]]
    op_names: dict[str, tuple[str, ...]]
    choice_points: list[ChoicePoint]
    fixed: list[OpSignature]
    config: dict = dataclasses.field(default_factory=dict)
    #: the space's :meth:`~dnas.supernet.space_base.SearchSpace.running_parts` (None: everything runs)
    running: Callable | None = dataclasses.field(default=None, compare=False, repr=False)

    def keys(self) -> list[str]:
        """Every table key the space needs (unique, in network order)."""
        keys = [s.key for s in self.fixed] + [c.key for cp in self.choice_points for c in cp.candidates]
        return list(dict.fromkeys(k for k in keys if k is not None))

    def signatures(self) -> dict[str, OpSignature]:
        """The distinct signatures (one per key), fixed parts first."""
        out: dict[str, OpSignature] = {}
        for sig in self.fixed + [c for cp in self.choice_points for c in cp.candidates]:
            if sig.key is not None and sig.key not in out:
                out[sig.key] = sig
        return out

    def describe(self) -> dict:
        """JSON-ready description: groups, op names, every choice point with its candidates."""
        return {"space": self.space, "input_size": self.input_size, "groups": {g: list(v) for g, v in self.groups.items()},
                "op_names": {g: list(v) for g, v in self.op_names.items()},
                "fixed": [s.describe() for s in self.fixed],
                "choice_points": [{"group": cp.group, "row": cp.row, "where": cp.where,
                                   "candidates": [c.describe() for c in cp.candidates]} for cp in self.choice_points]}


# ------------------------------------------------------------------------------ shapes

def output_shape_of(layer: L.Layer, in_shape: tuple, residual: bool = False) -> tuple:
    """Per-example output shape of ``layer`` on a per-example input shape (traced, not run)."""
    def f(key, x):
        p, s = layer.init(key)
        return layer.apply(p, s, x, Ctx(train=False))[0]

    out = jax.eval_shape(f, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1,) + tuple(in_shape), jnp.float32))
    return tuple(int(d) for d in out.shape[1:])


def head_layer(bn: L.Layer | None, classifier: L.Layer, relu: bool) -> L.Layer:
    """[BN, ReLU,] global average pooling, classifier: one fixed part."""
    def init(key):
        kb, kc = jax.random.split(key)
        pb, sb = bn.init(kb) if bn is not None else ((), ())
        pc, _ = classifier.init(kc)
        return {"bn": pb, "cls": pc}, sb

    def apply(p, s, x, ctx):
        if bn is not None:
            x, s = bn.apply(p["bn"], s, x, ctx)
        if relu:
            x = jax.nn.relu(x)
        y, _ = classifier.apply(p["cls"], (), jnp.mean(x, axis=(1, 2)), ctx)
        return y, s

    return L.Layer(init, apply)


def fixed_part(op: str, layer: L.Layer, in_shape: tuple, attrs=(), key_op: str | None = None,
           where: str = "") -> OpSignature:
    out = output_shape_of(layer, in_shape)
    return OpSignature(op, signature_key(key_op or op, in_shape, out, attrs), tuple(in_shape), out, tuple(attrs),
                       build=lambda: layer, where=where)


def _node_sum_layer(terms: int) -> L.Layer:
    """The sum of ``terms`` inputs into one cell node, as the cells compute it
    (:func:`dnas.supernet.mixed.node_sum`: elementwise adds, then a product with the
    identity that materialises the node); profiled on ``terms`` scaled copies of one input."""
    from dnas.supernet.mixed import node_sum

    def apply(p, s, x, ctx):
        return node_sum([x * (1.0 + 0.5 * i) for i in range(terms)]), s

    return L.Layer(lambda key: ((), ()), apply)


def node_sum_part(prefix: str, shape: tuple, terms: int, where: str) -> OpSignature:
    """A fixed part: the sum into a cell node with ``terms`` incoming edges (every edge is a
    term, a ``none`` edge a zero one: the identity product runs whatever the ops)."""
    attrs = (("terms", terms),)
    return OpSignature(f"{prefix}/node_sum", signature_key(f"{prefix}/node_sum", shape, shape, attrs), tuple(shape),
                       tuple(shape), attrs, build=lambda: _node_sum_layer(terms), where=where)


# ------------------------------------------------------------------------------ walks

def cell_candidates(space, prefix: str, group: str, attrs_of: dict, make_op, c: int, hw: tuple,
                     stride: int) -> tuple[OpSignature, ...]:
    """The candidate-op signatures of one cell edge (``none`` is free: no key)."""
    cfg = space.config
    shape_in = hw + (c,)
    shape_out = (-(-hw[0] // stride), -(-hw[1] // stride), c)
    out = []
    for op in space.group_op_names(group):
        if op == "none":
            out.append(OpSignature(op, None, shape_in, shape_out))
            continue
        attrs = attrs_of.get(op, ()) + (("stride", stride),)
        build = (lambda op=op: make_op(op, c, stride, cfg.affine, cfg.impl))
        out.append(OpSignature(op, signature_key(f"{prefix}/{op}", shape_in, shape_out, attrs), shape_in, shape_out,
                               attrs, build=build))
    return tuple(out)



def describe_space(space, input_size: int | None = None) -> SpaceLatencyModel:
    """The latency model of a built search space at ``input_size`` (H = W; default: the
    space's ``latency_input_size``, 32 for nb201/darts, 224 for chain)."""
    if isinstance(space, SpaceLatencyModel):
        return space
    name = getattr(space, "name", None)
    if not hasattr(space, "latency_walk"):
        raise ValueError(f"no latency model for search space {name!r}: it has no latency_walk (the built-in "
                         "spaces have one; a user model's choice points are profiled with dnas latency profile)")
    input_size = int(input_size or getattr(space, "latency_input_size", 32))
    points, fixed = space.latency_walk(input_size)
    groups = dict(space.groups)
    op_names = {g: tuple(space.group_op_names(g)) for g in groups}
    for cp in points:   # the walk must cover every row of every group, with one candidate per column
        if len(cp.candidates) != groups[cp.group][1]:
            raise ValueError(f"{cp.where}: {len(cp.candidates)} candidates for group {cp.group!r} of {groups[cp.group]}")
    covered = {(cp.group, cp.row) for cp in points}
    rows = {(g, r) for g, (n, _) in groups.items() for r in range(n)}
    if covered != rows:
        raise ValueError(f"latency model of {name!r} misses choice points {sorted(rows - covered)}")
    cfg = dataclasses.asdict(space.config) if dataclasses.is_dataclass(getattr(space, "config", None)) else {}
    return SpaceLatencyModel(name, input_size, int(cfg.get("in_channels", 3)), groups, op_names, points, fixed, cfg,
                             running=getattr(space, "running_parts", None))


# ------------------------------------------------------------------------------ matrices

def _table_input_size(table: LatencyTable) -> int | None:
    v = table.meta.get("input_size")
    return int(v) if isinstance(v, (int, float)) and v else None


def latency_matrix(space, table: LatencyTable, input_size: int | None = None
                   ) -> tuple[dict[str, np.ndarray], float]:
    """``({group: (num_choice_points, num_ops) latencies in ms}, fixed_ms)`` of ``space`` (a
    built space or a :class:`SpaceLatencyModel`) under ``table``.

    ``input_size`` defaults to the table's ``meta["input_size"]`` when the table was made for
    this space (or says for none), else the space's default (:func:`describe_space`).
    Entry ``[i, j]`` sums op ``j``'s latency over every use of choice point ``i``; free ops
    (``none``/``zero``) are 0. Missing keys -> :class:`MissingLatencyKeysError` naming all.
    """
    granularity = table.meta.get("granularity")
    if granularity in ("choice_point", "op"):
        return _fitted_matrix(space, table, granularity)
    if input_size is None and not isinstance(space, SpaceLatencyModel) and table.meta.get("space") in (None, space.name):
        input_size = _table_input_size(table)
    model = describe_space(space, input_size)
    hint = _hint(model, table)
    table.require(model.keys(), hint)
    mats = {g: np.zeros(shape, np.float64) for g, shape in model.groups.items()}
    for cp in model.choice_points:
        mats[cp.group][cp.row] += np.asarray(table.lookup_many([c.key for c in cp.candidates]))
    fixed = float(sum(table.lookup(s.key) for s in model.fixed))
    return mats, fixed


def _hint(model: SpaceLatencyModel, table: LatencyTable) -> str:
    notes = []
    t_space, t_size = table.meta.get("space"), _table_input_size(table)
    if t_space and t_space != model.space:
        notes.append(f"the table was made for space {t_space!r}, not {model.space!r}")
    if t_size and t_size != model.input_size:
        notes.append(f"the table is for input size {t_size}, the space was described at {model.input_size}")
    if t_space == model.space and table.meta.get("space_config") and model.config:
        diff = {k: (v, model.config.get(k)) for k, v in table.meta["space_config"].items()
                if k in model.config and _norm(v) != _norm(model.config.get(k)) and k not in ("impl", "unroll")}
        if diff:
            notes.append(f"its space_config differs (table, space): {diff}")
    notes.append(f"measure this configuration with `dnas latency profile --space {model.space} ...`")
    return "hint: " + "; ".join(notes)


def _norm(v: Any):
    return list(v) if isinstance(v, (list, tuple)) else v


def _fitted_matrix(space, table: LatencyTable, granularity: str) -> tuple[dict[str, np.ndarray], float]:
    groups = dict(space.groups)
    names = space.op_names if isinstance(space, SpaceLatencyModel) else {g: tuple(space.group_op_names(g)) for g in groups}
    t_space = table.meta.get("space")
    name = getattr(space, "space", None) or getattr(space, "name", None)
    if t_space and t_space != name:
        raise LatencyTableError(f"{table.name} was fitted for space {t_space!r}, not {name!r}")
    keys = {}
    for g, (n, _) in groups.items():
        for r in range(n):
            for op in names[g]:
                keys[(g, r, op)] = choice_key(g, r, op) if granularity == "choice_point" else op_key(g, op)
    table.require(list(keys.values()) + [FIXED_KEY])
    mats = {g: np.zeros(shape, np.float64) for g, shape in groups.items()}
    for (g, r, op), k in keys.items():
        mats[g][r, names[g].index(op)] = table.entries[k]["mean_ms"]
    return mats, table.entries[FIXED_KEY]["mean_ms"]


def architecture_latency(indices: dict[str, Any], matrix: dict[str, np.ndarray], fixed_ms: float) -> float:
    """Table latency (ms) of one discrete architecture: ``indices[g][i]`` is the op column
    chosen at row ``i`` of group ``g``."""
    total = float(fixed_ms)
    for g, m in matrix.items():
        idx = np.asarray(indices[g], np.int64)
        total += float(m[np.arange(m.shape[0]), idx].sum())
    return total


# ------------------------------------------------------------------------------ what a compiled network runs

#: parameter-free poolings: two of them on one node are one computation for the compiler
POOL_OPS = frozenset({"avg_pool_3x3", "max_pool_3x3"})


def shared_pooling(model: SpaceLatencyModel, indices: dict[str, Any], runs: list[bool]) -> list[bool]:
    """``runs`` with a parameter-free pooling of the same node by two running edges of a cell
    counted once (XLA's common-subexpression elimination; the per-edge BatchNorm after it is
    negligible). A cell's edges are the choice points whose ``where`` shares the part before
    the last ``/``; an edge ``s->d`` reads node ``s``."""
    runs, seen = list(runs), set()
    for i, cp in enumerate(model.choice_points):
        op = cp.candidates[int(np.asarray(indices[cp.group])[cp.row])].op
        if runs[i] and op in POOL_OPS:
            cell, edge = cp.where.rsplit("/", 1)
            key = (cell, edge.split("->")[0], op)
            runs[i] = key not in seen
            seen.add(key)
    return runs


def running_parts(model: SpaceLatencyModel, indices: dict[str, Any]) -> tuple[list[bool], list[bool]]:
    """``(runs[i] for model.choice_points, runs[j] for model.fixed)``: which choice-point uses
    and fixed parts the compiled network of the discrete architecture ``indices`` executes.

    Every chosen op that computes something and every fixed part, less what the space's
    :meth:`~dnas.supernet.space_base.SearchSpace.running_parts` says a compiler removes
    (NAS-Bench-201: dead and constant edges; NAS-Bench-201 and DARTS: a pooling shared by two
    edges). A free op (``none``/``zero``) never runs."""
    chosen = [cp.candidates[int(np.asarray(indices[cp.group])[cp.row])] for cp in model.choice_points]
    runs, fixed = [c.key is not None for c in chosen], [True] * len(model.fixed)
    if model.running is None:
        return runs, fixed
    return model.running(model, indices, runs, fixed)


def deployed_latency(model: SpaceLatencyModel, table: LatencyTable, indices: dict[str, Any]) -> float:
    """Table latency (ms) of the compiled network of ``indices``: the sum over the parts it
    runs (:func:`running_parts`) — for NAS-Bench-201 cells with dead or constant edges less
    than :func:`architecture_latency`'s plain sum; equal to it for chain and derived DARTS
    architectures."""
    runs, fixed = running_parts(model, indices)
    total = sum(table.lookup(s.key) for s, r in zip(model.fixed, fixed) if r)
    for cp, r in zip(model.choice_points, runs):
        if r:
            total += table.lookup(cp.candidates[int(np.asarray(indices[cp.group])[cp.row])].key)
    return float(total)
