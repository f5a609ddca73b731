"""The latency term of the architecture objective, as the search uses it.

``LatencyObjective.loss(ce, arch_scores)`` replaces the validation cross-entropy by the chosen
latency loss of :mod:`dnas.latency.loss`, with the expected latency computed from the
relaxation's architecture distribution: ``relaxation.derive_scores(arch)`` — softmax(α) for
DARTS, SNAS, GDAS and ProxylessNAS (the exact expectation of their Gumbel one-hot samples
and binary gates: a Gumbel-max sample is op j with probability softmax(α)_j, so the expected
latency under the sample *is* Σ_j softmax(α)_j·LAT_j, without sampling noise), and the
edge-weighted probabilities for PC-DARTS.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from dnas.latency.loss import expected_latency, latency_penalty
from dnas.latency.published import load_table
from dnas.latency.space_latency import architecture_latency, latency_matrix


@dataclasses.dataclass(frozen=True)
class LatencyObjective:
    matrix: dict            # {group: (num_choice_points, num_ops) ms}
    fixed_ms: float
    penalty: Callable       # (ce, lat) -> loss
    loss_name: str
    params: dict
    table: str

    def expected(self, scores: dict):
        return expected_latency({g: scores[g] for g in self.matrix}, self.matrix, self.fixed_ms)

    def loss(self, ce, scores: dict):
        return self.penalty(ce, self.expected(scores))

    def of_indices(self, indices: dict) -> float:
        """Table latency of a discrete architecture (op column per choice point)."""
        return architecture_latency(indices, self.matrix, self.fixed_ms)

    def describe(self) -> dict[str, Any]:
        return {"table": self.table, "loss": self.loss_name, **self.params, "fixed_ms": self.fixed_ms,
                "min_ms": self.fixed_ms + sum(float(m.min(1).sum()) for m in self.matrix.values()),
                "max_ms": self.fixed_ms + sum(float(m.max(1).sum()) for m in self.matrix.values())}


def make_latency_objective(space, table_path: str, loss: str = "hinge", *, target: float | None = None,
                           weight: float | None = None, input_size: int | None = None) -> LatencyObjective:
    """Load ``table_path`` (dnas JSON, ProxylessNAS/OFA YAML or FBNet list), check it covers
    ``space`` (an error names every missing key) and bind the loss ``loss``."""
    table = load_table(table_path)
    matrix, fixed = latency_matrix(space, table, input_size=input_size)
    penalty = latency_penalty(loss, target=target, weight=weight)
    return LatencyObjective({g: np.asarray(m, np.float32) for g, m in matrix.items()}, float(fixed), penalty, loss,
                            dict(penalty.params), str(table_path))
