"""The interface every search space implements (see :mod:`dnas.supernet.spaces`)."""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


def check_partial(widths, k: int) -> int:
    """Validate a partial-channel factor (PC-DARTS) against the widths of the mixed edges."""
    if k < 1 or any(w % k for w in widths):
        raise ValueError(f"partial_channels={k} must divide every cell width {sorted(set(widths))}")
    return k


class UnknownSpaceError(ValueError):
    """A search-space name that is not registered."""


#: ``dnas train``'s protocol for a space that states none of its own (:attr:`SearchSpace.train_protocol`):
#: SGD with Nesterov momentum 0.9, learning rate 0.05 cosine-annealed to 0, weight decay 5e-4,
#: batch 128, no clipping, drop path, cutout, auxiliary head or label smoothing.
GENERIC_TRAIN_PROTOCOL: dict[str, Any] = {
    "batch_size": 128, "lr": 0.05, "nesterov": True, "weight_decay": 5e-4, "grad_clip": None, "drop_path": 0.0,
    "cutout": 0, "auxiliary_weight": 0.0, "label_smoothing": 0.0, "network": {}}


def refuse_flags(flags: dict, space: str, hint: str = "use --space-option KEY=VALUE") -> None:
    """A set flag (``flags``: ``{"--channels": 16, ...}``, ``None`` = unset) the space has no use
    for is an error naming the flag."""
    for flag, value in flags.items():
        if value is not None:
            raise ValueError(f"{flag} does not apply to the {space} space; {hint}")


def cell_options_from_flags(flags: dict, space: str, cells_option: str) -> dict:
    """The cell spaces' (NB201, DARTS) reading of the shared flags: ``--channels`` is C,
    ``--cells`` the space's ``cells_option``, ``--conv-impl`` and ``--loops`` the convolution
    formulation and the loop form; any other set flag is refused."""
    flags = dict(flags)
    opts = {"channels": flags.pop("--channels", None), cells_option: flags.pop("--cells", None),
            "impl": flags.pop("--conv-impl", None), "unroll": flags.pop("--loops", None)}
    refuse_flags(flags, space, "its options: --channels, --cells, --conv-impl, --loops")
    return {k: v for k, v in opts.items() if v is not None}


def refuse_precision(space, precision: str, label: str) -> None:
    """A ValueError naming the problem when ``precision`` is not float32 and ``space`` does not
    run its convolutions in ``Ctx.compute_dtype`` (:attr:`SearchSpace.honours_compute_dtype`)."""
    if precision != "float32" and not space.honours_compute_dtype:
        raise ValueError(f"--precision {precision} sets the compute dtype of dnas's built-in convolutions and of a "
                         f"Flax model's nnx.Conv layers; for {label!r} set the dtype in your own layers")


class SearchSpace:
    """A supernet with labelled choice points (see :mod:`dnas.supernet.spaces`). Optional hooks:
    ``network(genotype, **options) -> Network`` (a static method: the stand-alone network
    :func:`dnas.supernet.derived.build_network` builds for the space's genotypes) and
    ``latency_walk(input_size) -> (choice points, fixed parts)`` (what
    :func:`dnas.latency.space_latency.describe_space` reads)."""

    name: str
    op_names: tuple[str, ...]
    groups: dict[str, tuple[int, int]]

    # What the commands read of a space besides its supernet (class attributes, so that they
    # are known before a space is built; ``docs/spaces.md``):
    #: ``dnas search``'s flags when the command line leaves them unset (a short search on small images)
    search_defaults: dict[str, Any] = {}
    #: ``dnas bench``'s flags when unset
    bench_defaults: dict[str, Any] = {}
    #: the option ``dnas train --cells`` sets on the derived network (None: the flag does not apply)
    cells_option: str | None = None
    #: ``dnas train``'s defaults: the space's evaluation protocol (the keys of
    #: :data:`GENERIC_TRAIN_PROTOCOL`; ``"network"``: the derived network's size options)
    train_protocol: dict[str, Any] = GENERIC_TRAIN_PROTOCOL
    #: whether the derived network (:meth:`network`) takes ``auxiliary=True`` for an auxiliary
    #: head, whose loss ``dnas train`` weighs by ``auxiliary_weight``
    has_auxiliary_head: bool = False
    #: whether the derived network drops paths when ``dnas train`` passes a drop probability
    has_drop_path: bool = False
    #: the op a genotype reads at a choice point the derivation did not keep (DARTS: ``"none"``)
    dropped_op: str | None = None
    #: whether the supernet and derived network run their convolutions in ``Ctx.compute_dtype``
    #: (``--precision bfloat16``); a space that does not is refused that flag
    honours_compute_dtype: bool = False

    @classmethod
    def options_from_flags(cls, flags: dict) -> dict:
        """The space's config options from the flags ``dnas search``, ``bench`` and ``latency``
        share (``{"--channels": 16, "--cells": 2, "--width-mult": None, "--conv-impl": None,
        "--loops": None, "--stem-stride": None}``, ``None`` = unset). A space with no such
        options (a user's) refuses every set flag: its options come as ``--space-option``. A
        space with a :attr:`cells_option` (the cell spaces) reads them as
        :func:`cell_options_from_flags`."""
        if cls.cells_option is None:
            refuse_flags(flags, getattr(cls, "name", cls.__name__))
            return {}
        return cell_options_from_flags(flags, cls.name, cls.cells_option)

    #: measured XLA:CPU (compile, step) costs of the supernet's unrolled and scanned loops
    #: (:class:`dnas.loop_plan.LoopCost`), from which ``--loops auto`` picks by the run's length;
    #: None: the space has no loop form to choose
    cpu_loop_cost = None

    @classmethod
    def loop_size(cls, options: dict) -> tuple[int, int]:
        """``(channels, cells)`` of the supernet ``options`` build, for the loop plan's work
        estimate (:func:`dnas.loop_plan.plan_cpu_loops`)."""
        return int(options.get("channels", 16)), 5

    #: the input side (pixels) the latency model assumes when none is given
    latency_input_size: int = 32

    def layout_fingerprint(self) -> str | None:
        """A digest of the order in which ``init``'s weights are stacked into arrays, which a
        search's checkpoints record and a resume compares
        (:meth:`~dnas.supernet.stacked_leaves.WeightLayout.fingerprint`); ``None``: each weight
        is its own array, stored under its own name."""
        return None

    def running_parts(self, model, indices: dict[str, Any], runs: list[bool],
                      fixed: list[bool]) -> tuple[list[bool], list[bool]]:
        """Which choice-point uses and fixed parts of the latency model ``model``
        (:func:`dnas.latency.space_latency.describe_space`) the compiled network of the discrete
        architecture ``indices`` executes, given ``runs`` (every chosen op that computes
        something) and ``fixed`` (every fixed part): what a compiler's dead-code and
        common-subexpression elimination leave of them. By default everything runs."""
        return runs, fixed

    @classmethod
    def train_protocol_for(cls, image_side: int) -> dict[str, Any]:
        """:attr:`train_protocol` for images of ``image_side`` pixels (a space whose network
        needs large enough images for part of its protocol overrides this)."""
        return dict(cls.train_protocol)

    @classmethod
    def network_options_from_search(cls, space_options: dict) -> dict:
        """Options of the derived network that the search run's space options fix (the chain's
        block layout); the cell spaces' networks have their own size (:attr:`train_protocol`)."""
        return {}

    def init(self, key):  # pragma: no cover - interface
        raise NotImplementedError

    def apply(self, params, state, x, samples, mix, ctx):  # pragma: no cover - interface
        raise NotImplementedError

    def derive(self, scores: dict[str, Any]):  # pragma: no cover - interface
        raise NotImplementedError

    def group_op_names(self, group: str) -> tuple[str, ...]:
        """The candidate ops of a group's choice points (the columns of its α)."""
        return tuple(self.op_names)

    def choice_point_names(self, group: str) -> list[str]:
        """Labels of a group's choice points (rows of its α), e.g. ``"0->1"`` for an edge."""
        return [str(i) for i in range(self.groups[group][0])]

    def choice_labels(self, group: str) -> list[str]:
        """The genotype labels of a group's choice points (rows of its α), the keys a genotype
        maps to choices (:class:`dnas.supernet.genotype._ChoiceMapping`): the choice points'
        names where those are unique across groups (NB201's ``"0->1"``, a chain's ``"block3"``,
        a user model's labels), ``"{group}/{name}"`` otherwise (DARTS's ``"normal/0->2"``)."""
        names = self.choice_point_names(group)
        every = [n for g in self.groups for n in self.choice_point_names(g)]
        return names if len(set(every)) == len(every) else [f"{group}/{n}" for n in names]

    def genotype_indices(self, genotype) -> dict[str, np.ndarray]:
        """Derivation's inverse: the op column ``genotype`` chooses at every choice point, read
        through :meth:`choice_labels` (the same for every space; DARTS: the edges derivation
        dropped are ``none``). A genotype of another space is a ``GenotypeError`` naming the
        missing label. What the architecture's table latency and the early-stopping rules read."""
        choices = dict(genotype.items())   # a built-in genotype computes its mapping on each access
        return {group: np.array([self.chosen_column(choices, label, self.group_op_names(group), genotype)
                                 for label in self.choice_labels(group)], np.int64)
                for group in self.groups}

    def choice_at(self, choices: dict, label: str, genotype):
        """What ``choices`` (``genotype``'s mapping) picks at ``label``; a missing label is a
        ``GenotypeError`` naming it."""
        from dnas.supernet.genotype import GenotypeError

        if label not in choices:
            raise GenotypeError(f"the {self.name} space's choice point {label!r} is not in the genotype "
                                f"{type(genotype).__name__} (labels: {', '.join(map(str, choices))})")
        return choices[label]

    def chosen_column(self, choices: dict, label: str, names, genotype) -> int:
        """The column of ``names`` that ``choices`` picks at ``label`` (:meth:`choice_at`); an op
        the choice point does not offer is a ``GenotypeError`` naming it."""
        from dnas.supernet.genotype import GenotypeError

        if self.choice_at(choices, label, genotype) not in names:
            raise GenotypeError(f"choice point {label!r} of the {self.name} space cannot be "
                                f"{choices[label]!r}; its ops: {', '.join(names)}")
        return list(names).index(choices[label])

    def random_indices(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """A random discrete architecture as op indices per group (what ``dnas latency
        validate`` times): uniform over every choice point's candidates. A space whose
        genotypes are constrained (DARTS: two kept edges per node) samples like its derivation."""
        return {g: rng.integers(0, k, size=n) for g, (n, k) in self.groups.items()}

    def choice_point_nodes(self, group: str) -> list:
        """The node each choice point of ``group`` feeds, as a hashable key: choice points that
        feed the same node, in this group or another, share the key (PC-DARTS normalises the
        edges entering a node over them). By default every choice point is a node of its own."""
        return [(group, i) for i in range(self.groups[group][0])]

    def describe(self) -> dict:
        return {"space": self.name, **dataclasses.asdict(self.config)}
