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


class SearchSpace:
    """A supernet with labelled choice points (see :mod:`dnas.supernet.spaces`). Optional hooks:
    ``network(genotype, **options) -> Network`` (a static method: the stand-alone network
    :func:`dnas.supernet.derived.build_network` builds for the space's genotypes) and
    ``latency_walk(input_size) -> (choice points, fixed parts)`` (what
    :func:`dnas.latency.space_latency.describe_space` reads)."""

    name: str
    op_names: tuple[str, ...]
    groups: dict[str, tuple[int, int]]

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
        from dnas.supernet.genotype import GenotypeError

        choices = dict(genotype.items())   # a built-in genotype computes its mapping on each access
        out = {}
        for group in self.groups:
            names = list(self.group_op_names(group))
            idx = []
            for label in self.choice_labels(group):
                if label not in choices:
                    raise GenotypeError(f"the {self.name} space's choice point {label!r} is not in the genotype "
                                        f"{type(genotype).__name__} (labels: {', '.join(choices)})")
                if choices[label] not in names:
                    raise GenotypeError(f"choice point {label!r} of the {self.name} space cannot be "
                                        f"{choices[label]!r}; its ops: {', '.join(names)}")
                idx.append(names.index(choices[label]))
            out[group] = np.array(idx, np.int64)
        return out

    def choice_point_nodes(self, group: str) -> list[int]:
        """The node each choice point feeds (edges into the same node share a node id)."""
        return list(range(self.groups[group][0]))

    def describe(self) -> dict:
        return {"space": self.name, **dataclasses.asdict(self.config)}
