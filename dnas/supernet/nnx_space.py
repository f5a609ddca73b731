"""A Flax NNX model with choice points (:mod:`dnas.nnx`) as a search space.

:class:`NNXSpace` implements the :class:`~dnas.supernet.space_base.SearchSpace` interface the
searcher, the relaxations and the hypergradient estimators consume: ``init`` gives the weights
and BatchNorm statistics as plain pytrees (``nnx.split`` + ``nnx.to_pure_dict``, done outside
the jitted step), ``apply`` merges them into the model's graph at trace time and runs it with
every choice point mixing its candidates by the relaxation's ``mix``. The module system's
bookkeeping therefore costs tracing time only; the compiled step sees the model's arithmetic.
The weights and statistics are kept with their same-shaped leaves stacked
(:mod:`dnas.supernet.stacked_leaves`; ``stack_leaves=False`` keeps the model's own layout):
a model holds an array per layer, and XLA's compile time grows with the step's arrays.
:meth:`NNXSpace.module` (or :meth:`NNXSpace.unstacked`) gives them back keyed by the model's
attributes.

Each choice point is a group of one row named by its label (``{label: (1, num_candidates)}``),
so candidate sets of any size coexist and α, ``alphas.json`` and the pictures are keyed by
label; choice points given one ``group`` (:class:`~dnas.nnx.Choice`, e.g. a cell's edges) are
the rows of one matrix, in graph order (``rows``: label -> (group, row)). Derivation takes the
best-scored candidate of a :class:`~dnas.nnx.Choice` and the ``n_chosen`` best inputs of an
:class:`~dnas.nnx.InputChoice`.

The kernel policy and ``--precision`` reach the model's ``nnx.Conv`` and ``nnx.BatchNorm``
layers in the copy merged for each forward pass (:mod:`dnas.supernet.nnx_kernels`). PC-DARTS's
partial channels need the candidates built for ``C/K`` channels: a factory that takes
``partial_channels`` is called with it (:func:`dnas.supernet.spaces.as_space`). Dropout is off
during the search (the search state holds no random stream for it, and DARTS's search protocol
has none) and on when ``dnas train`` trains the fixed model (:meth:`NNXSpace.network`).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dnas.backend import resolve
from dnas.nnx import Choice, InputChoice, choice_points, draws_random_numbers, fix, group_rows, mixing, set_search_mode
from dnas.supernet.genotype import ChoiceGenotype
from dnas.supernet.layers import Layer
from dnas.supernet.context import policy, with_kernels
from dnas.supernet.nnx_kernels import follow_policy
from dnas.supernet.network import Network, Output, check_options, drop_key
from dnas.supernet.space_base import SearchSpace
from dnas.supernet.stacked_leaves import WeightLayout


class NNXSpace(SearchSpace):
    """``model``: an ``nnx.Module`` instance (every seed starts from its weights), or a factory
    ``rngs -> nnx.Module`` (each seed's weights are initialised from its own key).
    ``num_classes``: when given, the model's logits are checked to have that many columns.
    ``stack_leaves``: ``init`` and ``apply`` hold same-shaped leaves stacked (the search's
    layout); off, they are ``nnx.to_pure_dict`` trees of the model's own layout.
    ``kernels``: the space's own kernel policy (:mod:`dnas.backend`; a built-in space's
    ``kernels`` option), used where the caller's context names none; by default the context's."""

    honours_compute_dtype = True   # nnx.Conv layers through dnas.supernet.nnx_kernels.PolicyConv

    def __init__(self, model: nnx.Module | Callable[[nnx.Rngs], nnx.Module], name: str | None = None,
                 num_classes: int | None = None, stack_leaves: bool = True, kernels: str | None = None):
        self.kernels = None if kernels is None else resolve(kernels)
        self.factory = None if isinstance(model, nnx.Module) else model
        if self.factory is not None and not callable(model):
            raise TypeError(f"expected an nnx.Module or a factory rngs -> nnx.Module, got {type(model).__name__}")
        instance = model if self.factory is None else self.factory(nnx.Rngs(0))
        if not isinstance(instance, nnx.Module):
            raise TypeError(f"the model factory returned {type(instance).__name__}, not an nnx.Module")
        self.points = {label: point for label, (_, point) in choice_points(instance).items()}
        if not self.points:
            raise ValueError(f"{type(instance).__name__} has no choice points (dnas.nnx.Choice / InputChoice): "
                             "nothing to search")
        self.name = name or type(instance).__name__
        self.num_classes = num_classes
        self.graphdef, params, stats, self._rest = nnx.split(instance, nnx.Param, nnx.BatchStat, ...)
        self._params0, self._stats0 = nnx.to_pure_dict(params), nnx.to_pure_dict(stats)
        self.stack_leaves = stack_leaves
        self._layout = WeightLayout(self._params0, self._stats0, stack_leaves, order=candidate_classes(instance))
        self.rows = group_rows(self.points)          # label -> (group, row of the group's α)
        self.labels: dict[str, list[str]] = {}       # group -> its rows' labels
        for label, (group, _) in self.rows.items():
            self.labels.setdefault(group, []).append(label)
        self.groups = {g: (len(labels), len(self.points[labels[0]].names)) for g, labels in self.labels.items()}
        self.op_names = tuple(dict.fromkeys(n for p in self.points.values() for n in p.names))
        self.config = None

    # ------------------------------------------------------------------ weights
    def init(self, key):
        """The weights and BatchNorm statistics: the instance's own (copied), or the factory's
        model initialised from ``key``; with ``stack_leaves``, same-shaped leaves stacked
        (:mod:`dnas.supernet.stacked_leaves`)."""
        if self.factory is None:
            # copies, made on the host (jnp.array(a, copy=True) would compile a program per shape)
            params, stats = jax.tree_util.tree_map(lambda a: jax.device_put(np.array(a)), (self._params0, self._stats0))
        else:
            _, params, stats, _ = nnx.split(self.factory(nnx.Rngs(key)), nnx.Param, nnx.BatchStat, ...)
            params, stats = nnx.to_pure_dict(params), nnx.to_pure_dict(stats)
        return self.stacked(params, stats)

    def stacked(self, params, stats):
        """``(params, stats)`` as pure dicts (``nnx.to_pure_dict``) in the layout :meth:`init`
        gives: same-shaped leaves stacked with ``stack_leaves``, themselves otherwise."""
        return self._layout.stacked(params, stats)

    def unstacked(self, params, stats):
        """The inverse of :meth:`stacked`: the model's weights and statistics as pure dicts, keyed
        as the model's attributes are."""
        return self._layout.unstacked(params, stats)

    def layout_fingerprint(self) -> str | None:
        return self._layout.fingerprint()

    def weight_shapes(self):
        """``(params, stats)`` of the model as :meth:`unstacked` gives them, as
        ``jax.ShapeDtypeStruct`` leaves: read off the instance built once, where
        ``jax.eval_shape`` of :meth:`init` would build the model again under a trace (which Flax
        0.12 does in time quadratic in its number of layers)."""
        return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (self._params0, self._stats0))

    def module(self, params, stats) -> nnx.Module:
        """The supernet as an ``nnx.Module`` holding ``params`` and ``stats`` in :meth:`init`'s
        layout (e.g. a search's final state, for :func:`dnas.nnx.fix`)."""
        params, stats = self.unstacked(*jax.tree_util.tree_map(jnp.asarray, (params, stats)))
        return nnx.merge(self.graphdef, params, stats, self._rest, copy=True)

    def apply(self, params, state, x, samples, mix, ctx):
        if self.kernels is not None:
            ctx = with_kernels(ctx, self.kernels)
        model = merged_for(ctx, self.graphdef, *self.unstacked(params, state), self._rest, members=ctx.members)
        with mixing(samples, mix, ctx, self.rows):
            logits = model(x)
        if self.num_classes is not None and logits.shape[-1] != self.num_classes:
            raise ValueError(f"{self.name} returns {logits.shape[-1]} logits per example; the data has "
                             f"{self.num_classes} classes")
        stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
        return logits, self._layout.stacked_stats(stats)

    # ------------------------------------------------------------------ architecture
    def group_op_names(self, group):
        return tuple(self.points[self.labels[group][0]].names)

    def choice_point_names(self, group):
        """The labels of the group's rows (a choice point without a ``group``: its label)."""
        return list(self.labels[group])

    def choice_point_nodes(self, group):
        """Each row's cell node (``Choice(..., node=)``), shared by the node's edges; any other
        choice point is a node of its own."""
        nodes = [(label, getattr(self.points[label], "node", None)) for label in self.labels[group]]
        return [("node", node) if node is not None else ("point", label) for label, node in nodes]

    def derive(self, scores) -> ChoiceGenotype:
        """Each choice point's best-scored option (ties: the earlier); an input choice's
        ``n_chosen`` best-scored inputs (ties: lower index); the edges of a cell node that keeps
        some of them (``Choice(..., node=, keep=)``) by DARTS's rule: the ``keep`` edges with the
        strongest option other than ``none`` keep that option, the others become ``none``."""
        choices: dict[str, Any] = {}
        edges: dict[str, list[tuple[float, str]]] = {}   # node -> [(strength, label)] in graph order
        for label, point in self.points.items():
            group, r = self.rows[label]
            row = np.asarray(scores[group])[r].reshape(-1)
            if isinstance(point, InputChoice):
                order = np.argsort(-row, kind="stable")
                choices[label] = tuple(sorted(int(i) for i in order[:point.n_chosen]))
            elif point.keep is None:
                choices[label] = point.names[int(np.argmax(row))]
            else:
                cols = [j for j, n in enumerate(point.names) if n != point.none]
                best = cols[int(np.argmax(row[cols]))]
                choices[label] = point.names[best]
                edges.setdefault(point.node, []).append((float(row[best]), label))
        for node_edges in edges.values():
            ranked = sorted(range(len(node_edges)), key=lambda i: (-node_edges[i][0], i))
            for i in ranked[self.points[node_edges[0][1]].keep:]:
                label = node_edges[i][1]
                choices[label] = self.points[label].none
        return ChoiceGenotype(choices, self.name)

    def genotype_indices(self, genotype) -> dict[str, np.ndarray]:
        """The chosen column of every row of every group (an input choice: its best chosen
        input). A genotype without one of the model's labels, or choosing what a point does not
        offer, is a ``GenotypeError`` naming it."""
        choices = dict(genotype.items())
        column = {}
        for label, point in self.points.items():
            if isinstance(point, Choice):
                column[label] = self.chosen_column(choices, label, point.names, genotype)
            else:
                column[label] = int(self.choice_at(choices, label, genotype)[0])
        return {g: np.array([column[label] for label in labels]) for g, labels in self.labels.items()}

    # ------------------------------------------------------------------ the derived network
    def _fresh(self, key) -> nnx.Module:
        """The model before any training: the factory's from ``key``, or the instance's own weights."""
        if self.factory is None:
            return nnx.merge(self.graphdef, *jax.tree_util.tree_map(jnp.asarray, (self._params0, self._stats0)),
                             self._rest, copy=True)
        return self.factory(nnx.Rngs(key))

    def network(self, genotype, **options) -> Network:
        """The stand-alone network ``dnas train`` trains: :func:`dnas.fix` of the model before
        any training (a factory's, initialised from the run's key; an instance's own initial
        weights), as :func:`fixed_network` makes it. ``num_classes`` is checked against the
        logits; ``in_channels`` is the model's own layers' business."""
        check_options(self.name, options, ("num_classes", "in_channels"))
        config = {"model": self.name, "choices": {k: v if isinstance(v, str) else list(v)
                                                  for k, v in dict(genotype.items()).items()}, **options}
        return fixed_network(lambda key: fix(self._fresh(key), genotype), self.name, genotype, config,
                             self.stack_leaves, options.get("num_classes"))

    def describe(self) -> dict:
        """What a run's ``config.json`` records of the space: a built-in space's config (which
        ``dnas train`` rebuilds the searched layout from), a user model's choice points."""
        if self.config is not None:
            return SearchSpace.describe(self)
        return {"space": self.name, "kind": "nnx",
                "choice_points": {label: list(p.names) for label, p in self.points.items()}}


def candidate_classes(model: nnx.Module) -> Callable[[str], tuple | None]:
    """The ``order`` of :class:`~dnas.supernet.stacked_leaves.StackedLeaves` for a model's
    weights: a weight inside a :class:`~dnas.nnx.Choice`'s candidates (the outermost one, when
    choice points nest) is classed by the candidates' structure (equal ``nnx.graphdef``) and its
    path within them; any other weight is a class of its own. The copies of one weight over
    choice points of one structure, which is what :func:`dnas.nnx.edge_loop` stacks, then lie
    next to each other in graph order (see :mod:`dnas.supernet.stacked_leaves`)."""
    structures: list = []                       # distinct graphdefs (they are not hashable)
    kind: dict[str, int] = {}                   # a Choice's path -> its structure's index
    for path, module in nnx.iter_modules(model):
        if isinstance(module, Choice):
            g = nnx.graphdef(module.candidates)
            index = next((i for i, h in enumerate(structures) if h == g), None)
            if index is None:
                structures.append(g)
                index = len(structures) - 1
            kind["/".join(str(k) for k in path)] = index

    def order(leaf_path: str) -> tuple | None:
        parts = leaf_path.split("/")
        for i, part in enumerate(parts):
            if part == "candidates" and "/".join(parts[:i]) in kind:
                return kind["/".join(parts[:i])], "/".join(parts[i + 1:])
        return None
    return order


def fixed_network(make: Callable[[jax.Array], nnx.Module], name: str, genotype, config: dict,
                  stack_leaves: bool = True, num_classes: int | None = None) -> Network:
    """A model without choice points (``make(key)``, e.g. :func:`dnas.fix` of a supernet) as
    the pure ``init``/``apply`` of a stand-alone network (split outside the jitted step, like
    the supernet), in the search's layout of the weights (``stack_leaves``), run in the mode the
    search runs it in (BatchNorm on batch statistics in training, synchronised over the
    devices), except that the model's dropout and :class:`~dnas.nnx.DropPath` are on in
    training, their masks drawn from the step's key (``drop``; each device its own) and the drop
    path at ``drop.prob``, so ``dnas train`` is deterministic given the seed. A model that
    returns ``(logits, auxiliary logits)`` in training has an auxiliary head, weighed by the
    protocol's ``auxiliary_weight``; when that head is the model's attribute ``aux``, its
    weights are kept apart (``params["aux"]``), so they are neither counted nor exported."""
    template = make(jax.random.PRNGKey(0))
    graphdef, params0, stats0, rest = nnx.split(template, nnx.Param, nnx.BatchStat, ...)
    layout = NetworkLayout(nnx.to_pure_dict(params0), nnx.to_pure_dict(stats0), stack_leaves)

    def init(key):
        _, params, stats, _ = nnx.split(make(key), nnx.Param, nnx.BatchStat, ...)
        return layout.stacked(nnx.to_pure_dict(params), nnx.to_pure_dict(stats))

    def apply(params, stats, x, ctx, drop=None):
        # dropout and drop path on in training, their masks drawn from the step's key (per
        # device when data parallel)
        model = merged_for(ctx, graphdef, *layout.unstacked(params, stats), rest,
                           dropout_key=None if drop is None else drop_key(drop, ctx, 0),
                           drop_path=0.0 if drop is None else drop.prob)
        out = model(x)
        logits, aux_logits = out if isinstance(out, tuple) else (out, None)
        if num_classes is not None and logits.shape[-1] != num_classes:
            raise ValueError(f"{name} returns {logits.shape[-1]} logits per example; the data has "
                             f"{num_classes} classes")
        stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
        return Output(logits, aux_logits, layout.stacked_stats(stats))

    return Network(init, apply, genotype, config, stochastic=draws_random_numbers(template),
                   layout=layout.fingerprint())


def merged_for(ctx, graphdef, params, stats, rest, members: bool = False,
               dropout_key: jax.Array | None = None, drop_path: Any = 0.0) -> nnx.Module:
    """A fresh module of ``graphdef`` holding ``params`` and ``stats`` (pure dicts), in the mode
    one traced pass under ``ctx`` runs it in: BatchNorm on batch statistics in training and
    synchronised over ``ctx.axis_name``, dropout and drop path (at ``drop_path``) on only given
    a ``dropout_key``
    (:func:`~dnas.nnx.set_search_mode`), and the kernel policy's convolutions and BatchNorm
    (:func:`~dnas.supernet.nnx_kernels.follow_policy`). What the supernet, the derived network
    and :func:`module_layer` each run."""
    model = set_search_mode(nnx.merge(graphdef, params, stats, rest, copy=True), train=bool(ctx.train),
                            axis_name=ctx.axis_name, dropout_key=dropout_key, drop_path=drop_path)
    return follow_policy(model, policy(ctx), members=members, compute_dtype=ctx.compute_dtype)


class NetworkLayout:
    """A stand-alone network's weights in the search's layout (:class:`WeightLayout`: with
    ``stack``, same-shaped leaves stacked), an auxiliary head's (the model's attribute ``aux``)
    stacked apart under ``params["aux"]``, so that they are neither counted nor exported.
    ``params`` and ``stats``: pure dicts of the model (``nnx.to_pure_dict``)."""

    def __init__(self, params: dict, stats: dict, stack: bool = True):
        main, aux = _without_aux(params)
        self.main = WeightLayout(main, stats, stack)
        self.aux = None if aux is None else WeightLayout(aux, {}, stack)

    def stacked(self, params, stats):
        main, aux = _without_aux(params)
        p, s = self.main.stacked(main, stats)
        return (p if aux is None else {**p, "aux": self.aux.stacked(aux, {})[0]}), s

    def unstacked(self, params, stats):
        main, aux = _without_aux(params)
        p, s = self.main.unstacked(main, stats)
        return (p if aux is None else {**p, "aux": self.aux.unstacked(aux, {})[0]}), s

    def stacked_stats(self, stats):
        return self.main.stacked_stats(stats)

    def fingerprint(self) -> str | None:
        """:meth:`WeightLayout.fingerprint` of the main weights and the auxiliary head's."""
        parts = [self.main.fingerprint(), None if self.aux is None else self.aux.fingerprint()]
        return None if parts[0] is None else "+".join(p for p in parts if p is not None)


def _without_aux(params: dict) -> tuple[dict, dict | None]:
    """``(params without the key "aux", params["aux"] or None)``: a model's auxiliary head apart."""
    if "aux" not in params:
        return params, None
    return {k: v for k, v in params.items() if k != "aux"}, params["aux"]


def module_layer(make: Callable[[nnx.Rngs], nnx.Module]) -> Layer:
    """A module of an NNX model as a pure ``init``/``apply`` pair
    (:class:`~dnas.supernet.layers.Layer`), for what times or measures parts of a network one
    at a time (the latency model's signatures, :mod:`dnas.latency.profile`). ``make(rngs)``
    builds the module; ``init(key)`` gives its weights and BatchNorm statistics as pure dicts,
    ``apply`` runs it in the mode ``ctx`` sets (BatchNorm on batch statistics in training, on
    running ones otherwise) under the kernel policy, as the search runs the model."""
    graphdef, _, _, rest = nnx.split(make(nnx.Rngs(0)), nnx.Param, nnx.BatchStat, ...)

    def init(key):
        _, params, stats, _ = nnx.split(make(nnx.Rngs(key)), nnx.Param, nnx.BatchStat, ...)
        return nnx.to_pure_dict(params), nnx.to_pure_dict(stats)

    def apply(params, stats, x, ctx):
        module = merged_for(ctx, graphdef, params, stats, rest)
        y = module(x)
        return y, nnx.to_pure_dict(nnx.state(module, nnx.BatchStat))

    return Layer(init, apply)
