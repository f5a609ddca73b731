"""Early stopping of a search before it collapses: DARTS+ and DARTS-ES (RobustDARTS).

Both papers observe that DARTS, searched long enough, fills its cells with parameter-free ops
(skip connections first) and that the architecture of an earlier epoch is better. Each rule
here is a pure function of the run's epoch records (``metrics.jsonl``, ``"kind": "epoch"``):
what the search logs every epoch is all it reads, so a resumed run decides exactly as the
uninterrupted one.

Rules (``dnas search --stop RULE``, repeatable; the first that fires stops the run):

* ``skips:N`` — DARTS+ (Liang et al., "DARTS+: Improved Differentiable Architecture Search
  with Early Stopping", 2019, criterion 1): stop as soon as the derived normal cell (the
  ``normal`` group of the DARTS space; every group of other spaces) holds ``N`` or more
  ``skip_connect`` (the paper: 2). The architecture of that epoch is kept.
* ``stable:K`` — DARTS+ criterion 2: stop when the ranking of the ops by α at every choice point
  has not changed for ``K`` epochs (the paper: 10). That epoch's architecture is kept.
* ``eigen:K`` — DARTS-ES (Zela et al., ICLR 2020, Sec. 4.2): with ``λ̄(i)`` the mean of the
  dominant Hessian eigenvalue ``λ_max(∇²_α L_val)`` over the epochs ``i-K+1 … i``, stop at
  epoch ``i`` when ``λ̄(i-K) / λ̄(i) < 0.75`` (the eigenvalue rose by a third within ``K``
  epochs; the paper: ``K = 5``), and keep the architecture of epoch ``i-K``. Needs
  ``--hessian-eigenvalue``.
"""
from __future__ import annotations

import dataclasses
import re

#: The ops without weights (what a collapsed cell is made of), across the built-in spaces.
PARAM_FREE_OPS = ("none", "zero", "skip_connect", "skip", "max_pool_3x3", "avg_pool_3x3")
ES_RATIO = 0.75


@dataclasses.dataclass(frozen=True)
class Stop:
    """A rule fired at ``epoch``: keep the architecture derived at ``keep_epoch``."""

    rule: str
    epoch: int
    keep_epoch: int
    reason: str


def parse_rule(text: str) -> tuple[str, int]:
    m = re.fullmatch(r"\s*(skips|stable|eigen)\s*:\s*(\d+)\s*", str(text))
    if not m or int(m.group(2)) < 1:
        raise ValueError(f"stop rule {text!r}: expected skips:N, stable:K or eigen:K with a positive integer "
                         "(docs/anticollapse.md)")
    return m.group(1), int(m.group(2))


def check_rules(rules, hessian: bool) -> list[tuple[str, int]]:
    parsed = [parse_rule(r) for r in rules or ()]
    if any(kind == "eigen" for kind, _ in parsed) and not hessian:
        raise ValueError("stop rule eigen:K reads the Hessian's dominant eigenvalue: add --hessian-eigenvalue")
    return parsed


def decide(rules, records: list[dict]) -> Stop | None:
    """The first rule of ``rules`` that fires on the epoch ``records`` (oldest first; each
    with ``epoch``, ``skip_ops`` and ``op_ranking``, and ``hessian_eig_max`` for ``eigen``),
    or None."""
    if not records:
        return None
    last = records[-1]
    for kind, n in (parse_rule(r) if isinstance(r, str) else r for r in rules):
        if kind == "skips" and last["skip_ops"] >= n:
            return Stop(f"skips:{n}", last["epoch"], last["epoch"],
                        f"the derived normal cell holds {last['skip_ops']} skip connections (DARTS+, ≥ {n})")
        if kind == "stable" and len(records) > n:
            window = [r["op_ranking"] for r in records[-(n + 1):]]
            if all(w == window[-1] for w in window):
                return Stop(f"stable:{n}", last["epoch"], last["epoch"],
                            f"the ranking of the ops by α has not changed for {n} epochs (DARTS+)")
        if kind == "eigen" and len(records) >= 2 * n:
            eig = [r["hessian_eig_max"] for r in records]
            now, before = sum(eig[-n:]) / n, sum(eig[-2 * n:-n]) / n
            if now > 0 and before / now < ES_RATIO:
                keep = records[-n - 1]["epoch"]
                return Stop(f"eigen:{n}", last["epoch"], keep,
                            f"the dominant eigenvalue of the α-Hessian rose from {before:.4g} to {now:.4g} "
                            f"(mean over {n} epochs; ratio {before / now:.2f} < {ES_RATIO}, DARTS-ES): the "
                            f"architecture of epoch {keep + 1} is kept")
    return None


def cell_summary(space, genotype, probs: dict) -> dict:
    """What the rules read, for one epoch record: ``skip_ops`` (skip connections chosen in the
    normal cell: the ``normal`` group if the space has one, else every group), ``param_free``
    (parameter-free ops chosen, every group) and ``op_ranking`` (per group and choice point,
    the ops ordered by probability)."""
    import numpy as np

    chosen = space.genotype_indices(genotype)
    normal = ["normal"] if "normal" in chosen else sorted(chosen)
    names = {g: list(space.group_op_names(g)) for g in chosen}
    dropped = getattr(space, "dropped_op", None)
    if dropped is not None:   # choice points the derivation did not keep (DARTS: edges) chose no op
        chosen = {g: [i for i in idx if names[g][i] != dropped] for g, idx in chosen.items()}
    skip = sum(names[g][int(i)] in ("skip_connect", "skip") for g in normal for i in chosen[g])
    free = sum(names[g][int(i)] in PARAM_FREE_OPS for g in chosen for i in chosen[g])
    ranking = {g: [[int(j) for j in np.argsort(-np.asarray(row), kind="stable")] for row in np.asarray(p)]
               for g, p in sorted(probs.items())}
    return {"skip_ops": int(skip), "param_free": int(free), "op_ranking": ranking}


__all__ = ["Stop", "decide", "parse_rule", "check_rules", "cell_summary", "PARAM_FREE_OPS"]
