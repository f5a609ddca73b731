"""Choice points inside your own Flax NNX model, and the model with the choices made.

A researcher marks what is to be searched where it lives, in the model's own code:

* :class:`Choice` — a layer choice (NNI's ``LayerChoice``; a DARTS edge): the candidates are any
  Flax modules (or functions) mapping the same input to outputs of one shape, e.g. a 3x3 and a
  5x5 convolution, :class:`Identity` (skip) and :class:`Zero` (drop the layer);
* :class:`InputChoice` — pick ``n_chosen`` of ``n`` incoming tensors, summed (or averaged) in
  the chosen network.

A DARTS cell node is a :class:`Choice` per incoming edge marked with the node
(``node=``, ``keep=``): the derivation keeps the node's ``keep`` strongest edges (DARTS's rule)
and sets the others to ``none``. Sum the edges' outputs with :func:`node_sum`, which stores the
node once during a search on XLA:CPU.

:class:`TorchBatchNorm` is ``nnx.BatchNorm`` with PyTorch's conventions (momentum 0.1, an
unbiased running variance), which the built-in spaces use as the papers' code does.

A network that repeats a cell can stack the repeats' weights and loop over them with
:func:`scan` (Flax's ``nnx.scan`` with the kernel policy's loop convolutions), so that the
cell is traced and compiled once.

Every choice point has a ``label``; a genotype (:class:`dnas.supernet.genotype.ChoiceGenotype`)
maps labels to what was chosen. Choice points that share a label are one decision (a cell
repeated through the network: :func:`choice_point_uses`). :class:`dnas.supernet.nnx_space.NNXSpace`
turns such a model into a search space, so every relaxation, hypergradient estimator, latency loss,
multi-device and multi-seed search applies to it unchanged; :func:`fix` returns the model with
each choice point replaced by its choice.

How a choice point combines its candidates during the search is the relaxation's ``mix``
(:mod:`dnas.relaxations.base`): DARTS's ``Σ_o softmax(α)_o · o(x)`` (Liu et al., ICLR 2019,
eq. 2) evaluates every candidate, GDAS's hard sample evaluates one (``lax.switch``). Outside a
search (:func:`mixing`) a choice point has nothing to mix with and refuses to run: call the
model that :func:`fix` returns instead.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from dnas.kernels.cpu.pin import pinned
from dnas.supernet.context import policy
from dnas.supernet.mixed import node_sum as _stored_sum
from dnas.supernet.mixed import switch_sampled, varying_like
from dnas.supernet.nnx_kernels import OutputTail, TorchBatchNorm, in_branch, output_tail

__all__ = ["Choice", "InputChoice", "Identity", "Zero", "FixedInputs", "fix", "scan", "choice_points",
           "choice_point_uses", "node_sum", "edge_loop", "mixing", "first_candidates", "set_search_mode",
           "draws_random_numbers", "TorchBatchNorm", "DropPath"]


class Identity(nnx.Module):
    """``x ↦ x``: the skip connection candidate."""

    def __call__(self, x):
        return x


class Zero(nnx.Module):
    """``x ↦ 0`` (DARTS's ``none``): choosing it removes the layer's contribution. ``stride``:
    the zeros of an NHWC output ``stride`` times smaller (a ``none`` edge of a reduction cell)."""

    def __init__(self, stride: int = 1):
        self.stride = stride

    def __call__(self, x):
        return jnp.zeros_like(x if self.stride == 1 else x[:, ::self.stride, ::self.stride])


class _Function(nnx.Module):
    """A plain function (``jax.nn.relu``, a lambda) as a candidate without parameters."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, x):
        return self.fn(x)


class DropPath(nnx.Module):
    """Drop path (FractalNet's, Larsson et al., ICLR 2017, as DARTS applies it to every op but
    the identity): in training each example's output is zeroed with probability ``rate`` and
    scaled by ``1 / (1 - rate)`` otherwise, so its expectation is the input. ``rate`` is the
    probability ``dnas train`` schedules (``--drop-path``, raised linearly from 0 over the
    epochs), set on every ``DropPath`` of the model at each step (:func:`set_search_mode`); the
    masks come from the model's random stream ``drop_path``, reseeded from the step's key. Off
    (the identity) during a search and in inference."""

    def __init__(self, rngs: nnx.Rngs | None = None):
        self.rngs = nnx.Rngs(drop_path=0) if rngs is None else nnx.Rngs(drop_path=rngs.params())
        self.rate = 0.0
        self.deterministic = True

    def __call__(self, x):
        if self.deterministic:
            return x
        from dnas.supernet.network import drop_path
        return drop_path(x, self.rngs.drop_path(), self.rate)


def _check_label(label: Any, what: str) -> str:
    if not isinstance(label, str) or not label or label != label.strip():
        raise ValueError(f"{what}: label must be a non-empty string without surrounding spaces, got {label!r}")
    return label


class Choice(nnx.Module):
    """A layer choice: one of ``options`` (name -> Flax module or function) at this place.

    During a search the relaxation mixes the candidates; :func:`fix` replaces the choice point by
    the chosen candidate. All candidates must map an input to outputs of the same shape.

    ``node``: this choice point is one incoming edge of the cell node ``node``. PC-DARTS's edge
    normalisation (Xu et al., ICLR 2020, eq. 4) weighs the edges of one node against each other.
    ``keep`` (with ``node``): the derived architecture keeps that node's ``keep`` strongest
    edges, DARTS's rule (Liu et al., ICLR 2019, §2.4). An edge's strength is its largest score
    among the options other than ``none`` (the option that removes the edge, a :class:`Zero`),
    and a kept edge takes that option; every other edge of the node gets ``none`` (ties: the
    earlier edge in the model's graph order, the earlier option). Without ``keep`` a choice
    point derives its best option, ``none`` included (NAS-Bench-201's rule). Edges of one node
    must agree on ``keep`` and ``none``.

    ``group``: choice points with the same ``group`` are the rows of one architecture matrix α
    (in the model's graph order; they must offer the same options), as the edges of a
    NAS-Bench-201 or DARTS cell are: what the relaxations sample per group, the pictures and
    ``alphas.json`` then show as one matrix. Without it a choice point is a group of its own,
    named by its label. A genotype is keyed by labels either way.
    """

    def __init__(self, options: Mapping[str, Any], label: str, *, node: str | None = None,
                 keep: int | None = None, none: str = "none", group: str | None = None):
        self.label = _check_label(label, "Choice")
        self.group = label if group is None else _check_label(group, f"Choice {label!r}: group")
        if not isinstance(options, Mapping) or len(options) < 2:
            raise ValueError(f"Choice {label!r}: options must be a mapping name -> module with at least two "
                             f"candidates, got {options!r}")
        for name, op in options.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"Choice {label!r}: option name {name!r} is not a non-empty string")
            if not callable(op):
                raise ValueError(f"Choice {label!r}: option {name!r} is not callable ({type(op).__name__})")
        self.names = tuple(options)
        self.candidates = nnx.List([op if isinstance(op, nnx.Module) else _Function(op) for op in options.values()])
        if keep is not None and node is None:
            raise ValueError(f"Choice {label!r}: keep={keep!r} needs a node (an edge of node `node`, which keeps "
                             f"its `keep` strongest edges)")
        if node is not None:
            _check_label(node, f"Choice {label!r}: node")
        if keep is not None:
            if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
                raise ValueError(f"Choice {label!r}: keep must be a positive number of edges, got {keep!r}")
            if none not in self.names:
                raise ValueError(f"Choice {label!r}: an edge of node {node!r} needs a {none!r} option (the edge "
                                 f"removed; name it with none=...); its options are "
                                 f"{list(self.names)}")
        self.node, self.keep, self.none = node, keep, none

    def __call__(self, x):
        return _active(self.label).choose(self, x)


class FixedInputs(nnx.Module):
    """What an :class:`InputChoice` becomes in the chosen network: the sum (or mean) of the
    chosen inputs ``indices``."""

    def __init__(self, indices: Sequence[int], reduction: str = "sum"):
        self.indices, self.reduction = tuple(int(i) for i in indices), reduction

    def __call__(self, inputs: Sequence[jax.Array]):
        chosen = [inputs[i] for i in self.indices]
        out = sum(chosen[1:], chosen[0])
        return out / len(chosen) if self.reduction == "mean" else out


class InputChoice(nnx.Module):
    """Pick ``n_chosen`` of ``n_candidates`` incoming tensors (all of one shape).

    During a search the relaxation mixes the inputs as it mixes candidate ops (the inputs are
    the candidates' outputs); derivation keeps the ``n_chosen`` best-scored inputs, which the
    chosen network sums (``reduction="sum"``, as a DARTS cell node sums its two inputs) or
    averages (``"mean"``).
    """

    def __init__(self, n_candidates: int, n_chosen: int = 1, *, label: str, reduction: str = "sum"):
        self.label = _check_label(label, "InputChoice")
        if not isinstance(n_candidates, int) or n_candidates < 2:
            raise ValueError(f"InputChoice {label!r}: n_candidates must be an integer >= 2, got {n_candidates!r}")
        if not isinstance(n_chosen, int) or not 1 <= n_chosen < n_candidates:
            raise ValueError(f"InputChoice {label!r}: n_chosen must be in 1..{n_candidates - 1}, got {n_chosen!r}")
        if reduction not in ("sum", "mean"):
            raise ValueError(f"InputChoice {label!r}: reduction must be 'sum' or 'mean', got {reduction!r}")
        self.n_candidates, self.n_chosen, self.reduction = n_candidates, n_chosen, reduction
        self.names = tuple(f"in{i}" for i in range(n_candidates))

    def __call__(self, inputs: Sequence[jax.Array]):
        if len(inputs) != self.n_candidates:
            raise ValueError(f"InputChoice {self.label!r} expects {self.n_candidates} inputs, got {len(inputs)}")
        return _active(self.label).choose_input(self, list(inputs))


def node_sum(terms: Sequence[jax.Array]) -> jax.Array:
    """``Σ terms``: a cell node, where the outputs of several choice points (its incoming edges)
    meet. Use it for such sums in a searched model; it is the plain sum everywhere else.

    During a search under XLA:CPU's kernel policy (``pin_nodes``) the sum is stored once, as the
    built-in cells store theirs (:func:`dnas.supernet.mixed.node_sum`), and the choice points
    that read the node take it as stored. Without it, a choice point stores its input when it
    reads it, which covers the forward pass but not the backward one: the gradient a node
    gathers from its readers and from what else uses it (the cell's output concatenation) is
    then an unstored sum that XLA:CPU recomputes inside each of the node's terms' backward
    passes, and a node no choice point reads (DARTS's last node) is recomputed inside the
    concatenation's readers (``docs/benchmarks.md``, the DARTS space written with NNX).
    """
    terms = list(terms)
    if not terms:
        raise ValueError("node_sum: a node needs at least one term")
    active = _ACTIVE.get()
    pin = active is not None and active.pin
    out = _stored_sum(terms, pin)
    if pin and len(terms) > 1:
        active._stored(out, out)
    return out


# --------------------------------------------------------------------------- the mixing context

class _OpCandidates:
    """A :class:`Choice`'s candidates in the form relaxations consume
    (:class:`dnas.supernet.mixed.Candidates`): ``all(x)`` evaluates every candidate, ``one(i,
    x)`` only candidate ``i`` (a traced index) under ``lax.switch``.

    ``all`` runs the modules in place (their BatchNorm statistics update as usual) and returns
    no state; ``one`` runs them functionally (split, switch over merged copies) and returns
    the candidates' new NNX state, which :meth:`_Mixing.choose` writes back. Under the kernel
    policy's ``recompute_sampled`` its backward pass recomputes the sampled candidate
    (:class:`_ModuleBranch` under :func:`dnas.supernet.mixed.switch_sampled`) instead of
    storing every candidate's activations."""

    def __init__(self, candidates: nnx.List, ctx):
        self.modules, self.ctx = candidates, ctx

    @property
    def num(self) -> int:
        return len(self.modules)

    def all(self, x):
        return [op(x) for op in self.modules], None

    def static(self, index: int, x):
        """Only candidate ``index``, a Python integer, run in place (no switch)."""
        return self.modules[index](x), None

    def one(self, index, x, state=None):
        # the weights always come from the modules (a state threaded through two sampled paths,
        # as ProxylessNAS's, brings its BatchNorm statistics only), so their gradient has one path
        graphdef, params, stats = nnx.split(self.modules, nnx.Param, ...)
        if state is not None:
            _, stats = nnx.split_state(state, nnx.Param, ...)
        branches = tuple(_ModuleBranch(graphdef, i) for i in range(self.num))
        # the kernel policy's convolutions for a switch branch (dnas.supernet.nnx_kernels) and the
        # sampled op's own backward pass, unless the estimator differentiates twice (Ctx.custom_vjp:
        # a custom backward pass has no forward mode)
        custom = self.ctx is None or self.ctx.custom_vjp
        with in_branch(custom):
            if custom and self.ctx is not None and policy(self.ctx).recompute_sampled:
                y, new_stats = switch_sampled(branches, index, varying_like(params, x), stats, x)
            else:
                y, new_stats = lax.switch(index, [b.apply for b in branches], params, stats, x)
        return y, nnx.merge_state(params, new_stats)


class _ModuleBranch:
    """Candidate ``i`` of a :class:`Choice` as a branch of :func:`dnas.supernet.mixed.switch_sampled`:
    ``apply(params, stats, x) -> (y, new_stats)`` on the NNX states of all candidates.

    The backward pass recomputes the candidate, a user's module being opaque to dnas, but where
    the candidate's output is that of an affine-free BatchNorm (a conv-BN block, DARTS's ops)
    it starts from the saved output, as the built-in ops' backward pass does: the forward pass
    keeps the BatchNorm's ``rstd`` and the recomputation replays the saved output for that
    layer (:class:`dnas.supernet.nnx_kernels.OutputTail`), so the last convolution's forward
    pass is not recomputed. Whether it applies is found while tracing the forward pass
    (``tail``: the BatchNorm call's index, or ``None``)."""

    def __init__(self, graphdef, i: int):
        self.graphdef, self.i = graphdef, i
        self.tail: int | None = None

    def apply(self, params, stats, x):
        ops = nnx.merge(self.graphdef, params, stats, copy=True)
        y = ops[self.i](x)
        return y, nnx.state(ops, nnx.Param, ...)[1]

    def forward(self, params, stats, x):
        with output_tail(OutputTail()) as tail:
            y, new_stats = self.apply(params, stats, x)
        if tail.last is not None and tail.last[1] is y:
            self.tail = tail.last[0]
            return y, new_stats, tail.last[2].astype(y.dtype)
        self.tail = None
        return y, new_stats, jnp.zeros(y.shape[-1:], y.dtype)

    def backward(self, params, x, y, saved, gy, *, state):
        # traced with the backward pass, after the forward's context has closed: the recomputed
        # candidate's convolutions are branch ones again (dnas.supernet.nnx_kernels)
        def recomputed(p, v):
            if self.tail is None:
                return self.apply(p, state, v)[0]
            with output_tail(OutputTail((self.tail, y, saved))):
                return self.apply(p, state, v)[0]
        with in_branch():
            return jax.vjp(recomputed, params, x)[1](gy)


class _InputCandidates:
    """An :class:`InputChoice`'s inputs as candidates whose outputs are the inputs themselves."""

    auxiliary_skip = False   # picking inputs is not an op: no DARTS- auxiliary skip (dnas.remedies)
    partial_channels = False   # nor PC-DARTS's channel split: every channel of the inputs is mixed

    def __init__(self, inputs: list, ctx):
        self.inputs, self.ctx = inputs, ctx

    @property
    def num(self) -> int:
        return len(self.inputs)

    def all(self, x):
        return list(self.inputs), None

    def static(self, index: int, x):
        return self.inputs[index], None

    def one(self, index, x, state=None):
        return lax.switch(index, [lambda i=i: self.inputs[i] for i in range(self.num)]), state


class _Mixing:
    """The samples of one forward pass of the supernet, by label, and the relaxation's mix."""

    def __init__(self, samples: Mapping[str, Any], mix: Callable, ctx, rows: Mapping[str, tuple] | None = None):
        self.samples, self.mix, self.ctx, self.rows = samples, mix, ctx, rows or {}
        # the kernel policy's pin_nodes: a choice point's input (a node of a cell, usually a sum
        # of other choice points' outputs) stored once, as the built-in cells' node sums are
        # (dnas.supernet.mixed.node_sum); by identity, so several points reading one node pin it once
        self.pin = ctx is not None and policy(ctx).pin_nodes
        self._pinned: dict[int, tuple] = {}

    def _input(self, x):
        if not self.pin:
            return x
        if id(x) not in self._pinned:
            self._stored(x, pinned(x))
        return self._pinned[id(x)][1]

    def _stored(self, x, stored):
        """Record that ``stored`` is ``x`` stored once: choice points reading either use ``stored``."""
        self._pinned[id(x)] = (x, stored)               # holding x keeps its id unique for the pass
        self._pinned[id(stored)] = (stored, stored)

    def _sample(self, label: str):
        group, row = self.rows.get(label, (label, 0))
        if group not in self.samples:
            raise KeyError(f"choice point {label!r} has no sample in this forward pass (known: {sorted(self.samples)}); "
                           "was the model changed after the search space was built?")
        return jax.tree_util.tree_map(lambda a: a[row], self.samples[group])

    def choose(self, choice: Choice, x):
        y, state = self.mix(self._sample(choice.label), _OpCandidates(choice.candidates, self.ctx), self._input(x))
        if state is not None:
            nnx.update(choice.candidates, state)
        return y

    def choose_input(self, choice: InputChoice, inputs: list):
        y, _ = self.mix(self._sample(choice.label), _InputCandidates(inputs, self.ctx), inputs[0])
        return y


_ACTIVE: contextvars.ContextVar[_Mixing | None] = contextvars.ContextVar("dnas_nnx_mixing", default=None)


def _active(label: str) -> _Mixing:
    active = _ACTIVE.get()
    if active is None:
        raise RuntimeError(f"choice point {label!r} was called outside a search: a supernet has no single "
                           "architecture. Search it (dnas.search), or call dnas.fix(model, genotype) and run the "
                           "model it returns")
    return active


@contextlib.contextmanager
def _activated(m: _Mixing):
    token = _ACTIVE.set(m)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def mixing(samples: Mapping[str, Any], mix: Callable, ctx=None, rows: Mapping[str, tuple] | None = None):
    """Within this context every choice point of a model mixes its candidates with ``mix``
    (a relaxation's) and its sample: row ``r`` of ``samples[group]`` where ``rows[label]`` is
    ``(group, r)``; a label not in ``rows`` reads row 0 of ``samples[label]``."""
    return _activated(_Mixing(samples, mix, ctx, rows))


class _FirstCandidates(_Mixing):
    def __init__(self, record):
        super().__init__({}, None, None)
        self.record = record

    def choose(self, choice: Choice, x):
        if self.record is not None:
            self.record(choice, x)
        return choice.candidates[0](x)

    def choose_input(self, choice: InputChoice, inputs: list):
        return inputs[0]


def first_candidates(record: Callable[[Choice, Any], None] | None = None):
    """Within this context every :class:`Choice` runs its first candidate (after calling
    ``record(choice, x)``) and every :class:`InputChoice` passes its first input: the supernet
    as one architecture, to find the shapes each choice point sees."""
    return _activated(_FirstCandidates(record))


def scan(f: Callable, **scan_options) -> Callable:
    """``nnx.scan(f, **scan_options)`` for a loop over repeated cells of a searched model (a
    stage of cells whose weights are stacked by ``nnx.vmap``; :mod:`dnas.supernet.nb201`): the
    stage then traces and compiles one cell instead of all of them.

    The difference from ``nnx.scan`` is the kernel policy's loop formulation: while the loop
    body is traced, its ``nnx.Conv`` layers run as the built-in spaces' scanned cells do. Under
    XLA:CPU's policy that is the convolution with a backward pass of its own
    (:mod:`dnas.kernels.cpu.branch_conv`), because XLA:CPU runs a convolution's own backward
    pass inside a loop body many times slower (``docs/cpu.md``); not under estimators that
    differentiate twice (a custom backward pass has no forward mode). The native policy's
    convolutions are XLA's, as with ``nnx.scan``."""
    scanned = nnx.scan(f, **scan_options)

    def run(*args, **kwargs):
        active = _ACTIVE.get()
        ctx = active.ctx if active is not None else None
        with in_branch(ctx is None or ctx.custom_vjp):
            return scanned(*args, **kwargs)
    return run


def edge_loop(edges: Sequence[Any], src: Sequence[int], dst: Sequence[int], nodes: jax.Array,
              inputs: jax.Array | None = None) -> jax.Array:
    """Run a cell's edges in order, ``nodes[dst[e]] += edges[e](source[src[e]])``, where
    ``source`` is ``inputs`` when given (edges that read the cell's inputs) and ``nodes``
    otherwise (the edges must then be ordered so that a node is complete before an edge reads
    it). ``nodes`` and ``inputs`` stack the nodes on a leading axis.

    During a search, when every edge is a :class:`Choice` whose candidates have one structure
    (the same modules with weights of the same shapes; their labels and options' weights are
    their own), the edges run as one ``lax.scan``: the candidates' weights and statistics are
    stacked inside the traced step, one edge is traced and compiled instead of every one, and
    each edge's new statistics are written back to it (in a search through
    :class:`~dnas.supernet.nnx_space.NNXSpace`, whose stacked layout keeps the copies of each
    weight over such edges adjacent, XLA folds that stacking into one slice of the stored
    array: :mod:`dnas.supernet.stacked_leaves`). The model itself stays as written (one
    module per edge), so its weights, its genotype, :func:`fix` and the latency model do not
    depend on whether the edges loop. This is how the built-in DARTS cells keep their compile
    short (a normal cell's 14 edges as one loop; ``docs/benchmarks.md``). Inside the loop the
    convolutions take the kernel policy's loop formulation, as in :func:`scan`. Anywhere else
    (a fixed model, the latency model's shape walk) the edges run one after another in Python.
    """
    src, dst = [int(s) for s in src], [int(d) for d in dst]
    if not len(edges) == len(src) == len(dst):
        raise ValueError(f"edge_loop: {len(edges)} edges, {len(src)} sources, {len(dst)} destinations")
    active = _ACTIVE.get()
    if type(active) is not _Mixing or not all(isinstance(e, Choice) for e in edges):
        for e, edge in enumerate(edges):
            y = edge((nodes if inputs is None else inputs)[src[e]])
            nodes = nodes.at[dst[e]].add(y.astype(nodes.dtype))
        return nodes
    parts = [nnx.split(edge.candidates, nnx.Param, ...) for edge in edges]
    graphdef = parts[0][0]
    for edge, (g, _, _) in zip(edges, parts):
        if g != graphdef:
            raise ValueError(f"edge_loop: the candidates of {edges[0].label!r} and {edge.label!r} differ in "
                             "structure; only edges with the same candidates can run as one loop")
    stack = lambda *a: jnp.stack(a)  # noqa: E731
    params = jax.tree_util.tree_map(stack, *[p for _, p, _ in parts])
    rest = jax.tree_util.tree_map(stack, *[r for _, _, r in parts])
    samples = jax.tree_util.tree_map(stack, *[active._sample(edge.label) for edge in edges])
    ctx = active.ctx

    def body(buf, xs):
        p, r, sample, s, d = xs
        candidates = nnx.merge(graphdef, p, r, copy=True)
        y, state = active.mix(sample, _OpCandidates(candidates, ctx), (buf if inputs is None else inputs)[s])
        if state is not None:
            nnx.update(candidates, state)
        return buf.at[d].add(y.astype(buf.dtype)), nnx.split(candidates, nnx.Param, ...)[2]

    with in_branch(ctx is None or ctx.custom_vjp):
        nodes, new_rest = lax.scan(body, nodes, (params, rest, samples, jnp.asarray(src, jnp.int32),
                                                 jnp.asarray(dst, jnp.int32)))
    for e, edge in enumerate(edges):
        nnx.update(edge.candidates, jax.tree_util.tree_map(lambda a: a[e], new_rest))
    return nodes


# --------------------------------------------------------------------------- structure

def _has_dropout(module) -> bool:
    """Flax's convention for a layer with dropout (``nnx.Dropout``, the attention layers): a
    ``deterministic`` flag that switches it off."""
    return hasattr(module, "deterministic")


def set_search_mode(model: nnx.Module, train: bool, axis_name: str | None = None,
                    dropout_key: jax.Array | None = None, drop_path: Any = 0.0) -> nnx.Module:
    """Put every layer of ``model`` (in place) in the mode dnas runs it in: BatchNorm on batch
    statistics when ``train`` (else running ones) and synchronised over the devices of
    ``axis_name``. Dropout (every module with a ``deterministic`` flag: ``nnx.Dropout``, the
    attention layers' dropout) is off, unless ``train`` and ``dropout_key`` is given: then it
    is on, and every random stream of the model is reseeded from ``dropout_key`` (a
    ``nnx.Dropout`` built without ``rngs`` gets a stream of its own), so the masks are a
    function of that key alone; every :class:`DropPath` then drops at the probability
    ``drop_path``. The model's own stream state is not carried from step to
    step (it is not part of the weights or statistics dnas keeps): ``dnas train`` passes each
    step's key, the search passes none (the search state holds no stream for it, and DARTS's
    search protocol has no dropout). Returns ``model``."""
    on = bool(train) and dropout_key is not None
    for _, m in nnx.iter_modules(model):
        if isinstance(m, nnx.BatchNorm):
            m.axis_name = axis_name
        if hasattr(m, "use_running_average"):
            m.use_running_average = not train
        if _has_dropout(m):
            m.deterministic = not on
        if isinstance(m, DropPath):
            m.rate = drop_path if on else 0.0
        if on and isinstance(m, nnx.Dropout) and m.rngs is None:
            m.rngs = nnx.Rngs(**{m.rng_collection: 0})[m.rng_collection]   # reseeded below
    if on:
        tags = sorted({s.key.tag for _, s in nnx.iter_graph(model) if isinstance(s, nnx.RngStream)})
        # each stream draws its own key from its tag's (reseed splits per stream)
        nnx.reseed(model, **{t: jax.random.fold_in(dropout_key, i) for i, t in enumerate(tags)})
    return model


def draws_random_numbers(model: nnx.Module) -> bool:
    """Whether ``model`` has dropout, i.e. whether its training forward pass needs a key
    (:func:`set_search_mode`)."""
    return any(_has_dropout(m) for _, m in nnx.iter_modules(model))


def _signature(point) -> tuple:
    """What the uses of one label must agree on to share one decision."""
    if isinstance(point, Choice):
        return (("Choice", point.names, point.group)
                + ((point.node, point.keep, point.none) if point.node is not None else ()))
    return ("InputChoice", point.n_candidates, point.n_chosen, point.reduction)


def choice_point_uses(model: nnx.Module) -> dict[str, list[tuple[tuple, Choice | InputChoice]]]:
    """``{label: [(path, choice point), ...]}``: every choice point of ``model`` in graph
    order, grouped by label. Choice points that share a label share one architecture decision:
    one row of α, one sample per forward pass, one choice in the genotype (as DARTS's normal
    cells share one α, and NAS-Bench-201's 15 cells one cell). They must then be the same
    kind with the same candidates' names (a :class:`Choice`) or the same ``n_candidates``,
    ``n_chosen`` and ``reduction`` (an :class:`InputChoice`); their weights are their own."""
    found: dict = {}
    for path, module in nnx.iter_modules(model):
        if isinstance(module, (Choice, InputChoice)):
            uses = found.setdefault(module.label, [])
            if uses and _signature(uses[0][1]) != _signature(module):
                raise ValueError(f"the choice points at {_path(uses[0][0])} and {_path(path)} share the label "
                                 f"{module.label!r} but not their candidates ({_signature(uses[0][1])} vs "
                                 f"{_signature(module)}): a shared label is one decision over the same candidates")
            if not any(m is module for _, m in uses):
                uses.append((tuple(path), module))
    _check_nodes({label: uses[0][1] for label, uses in found.items()})
    return found


def _check_nodes(points: Mapping[str, Any]) -> None:
    """The edges of one cell node (:class:`Choice` ``node``) agree on ``keep`` and ``none``."""
    first: dict[str, tuple[str, Choice]] = {}
    for label, p in points.items():
        if isinstance(p, Choice) and p.node is not None:
            other, q = first.setdefault(p.node, (label, p))
            if (q.keep, q.none) != (p.keep, p.none):
                raise ValueError(f"the edges {other!r} and {label!r} of node {p.node!r} disagree: keep={q.keep}, "
                                 f"none={q.none!r} against keep={p.keep}, none={p.none!r}")


def choice_points(model: nnx.Module) -> dict[str, tuple[tuple, Choice | InputChoice]]:
    """``{label: (path, choice point)}`` in the model's graph order: each label's first use
    (:func:`choice_point_uses` has them all)."""
    return {label: uses[0] for label, uses in choice_point_uses(model).items()}


def group_rows(points: Mapping[str, Choice | InputChoice]) -> dict[str, tuple[str, int]]:
    """``{label: (group, row)}``: where each choice point's row of α is (:class:`Choice`
    ``group``; rows in the order of ``points``, a label without a group its own group's row 0).
    The points of one group must offer the same options (a ValueError names them)."""
    rows: dict[str, tuple[str, int]] = {}
    members: dict[str, list[str]] = {}
    for label, p in points.items():
        group = getattr(p, "group", label)
        first = members.setdefault(group, [label])[0]
        if points[first].names != p.names:
            raise ValueError(f"the choice points {first!r} and {label!r} of group {group!r} offer different "
                             f"options ({list(points[first].names)} vs {list(p.names)}): the rows of one "
                             "group's α share its columns")
        if label != first:
            members[group].append(label)
        rows[label] = (group, len(members[group]) - 1)
    return rows


def _path(path) -> str:
    return ".".join(map(str, path)) or "<model>"


def _indexed(parent) -> bool:
    """Whether ``parent``'s children are items (lists, dicts) rather than attributes."""
    return isinstance(parent, (nnx.List, nnx.Dict, list, dict))


def _replace(model, path: tuple, new) -> None:
    """Put ``new`` where the graph path ``path`` (from ``nnx.iter_modules``) points in ``model``."""
    parent = model
    for key in path[:-1]:
        parent = parent[key] if _indexed(parent) else getattr(parent, key)
    if _indexed(parent):
        parent[path[-1]] = new
    else:
        setattr(parent, path[-1], new)


def fix(model: nnx.Module, genotype) -> nnx.Module:
    """A copy of ``model`` in which every choice point is replaced by its choice in ``genotype``
    (a :class:`~dnas.supernet.genotype.ChoiceGenotype` or a mapping label -> choice): a plain
    NNX module holding only the chosen candidates and their current weights.

    Every choice point of the model must have a choice, and every label of the genotype must be
    a choice point of the model; a choice that is not one of the point's candidates is an error.
    """
    choices = dict(genotype.choices if hasattr(genotype, "choices") else genotype)
    fixed = nnx.clone(model)
    uses = choice_point_uses(fixed)
    points = {label: u[0] for label, u in uses.items()}
    missing, extra = sorted(set(points) - set(choices)), sorted(set(choices) - set(points))
    if missing or extra:
        raise ValueError("the genotype does not match the model's choice points: "
                         + "; ".join(p for p in (f"no choice for {missing}" if missing else "",
                                                 f"unknown labels {extra}" if extra else "") if p)
                         + f" (the model's labels: {sorted(points)})")
    # every use of every label, deepest first, so that a choice point inside a candidate is
    # fixed before its parent moves
    every = [(label, path, point) for label, u in uses.items() for path, point in u]
    for label, path, point in sorted(every, key=lambda use: -len(use[1])):
        choice = choices[label]
        if isinstance(point, Choice):
            if choice not in point.names:
                raise ValueError(f"choice point {label!r}: {choice!r} is not one of its candidates {list(point.names)}")
            new = point.candidates[point.names.index(choice)]
        else:
            idx = tuple(sorted(int(i) for i in (choice if isinstance(choice, (list, tuple)) else [choice])))
            if len(idx) != point.n_chosen or len(set(idx)) != len(idx) or not all(0 <= i < point.n_candidates for i in idx):
                raise ValueError(f"input choice {label!r}: {list(idx)} is not {point.n_chosen} distinct indices "
                                 f"in 0..{point.n_candidates - 1}")
            new = FixedInputs(idx, point.reduction)
        if path:
            _replace(fixed, path, new)
        else:
            fixed = new
    return fixed
