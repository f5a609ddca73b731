"""Learn an additive latency table from per-architecture measurements (``dnas latency fit``).

When a device cannot be profiled op by op but whole networks have been measured, an
additive model still gives the table the search loss needs: with ``z[a, i, j] = 1`` when
architecture ``a`` runs op ``j`` at choice point ``i``,

    LAT(a) ≈ b + Σ_i Σ_j z[a, i, j] · t[i, j]                          ("choice_point" model)
    LAT(a) ≈ b + Σ_j count_j(a) · t[j]                                  ("op" model)

fitted by least squares; the intercept ``b`` is the fixed part of the network. One op per
choice point (``none``/``zero`` when the group has it) is the reference with cost 0 — the
indicator columns of a choice point sum to 1, so without a reference the intercept would not
be identifiable; with ``none`` as reference the learnt table has the meaning the expected-
latency loss gives it (``none`` costs nothing). The "choice_point" model has one cost per
(edge, op) — an edge early in a NAS-Bench-201 cell feeds more of the cell than a late one —
the "op" model one cost per op. :func:`fit_nb201` fits both on a seeded random fraction of
NAS-Bench-201's 15,625 cells and reports Spearman's ρ (and MAPE, R²) on the rest, per device
column of ``../shared/data/nb201/latency_per_arch_ms.csv`` (HELP / HW-NAS-Bench
measurements; architectures from ``nats_bench_200ep.csv``, same row order).

:func:`table_from_fit` stores a fit as a :class:`~dnas.latency.table.LatencyTable`
(``meta["granularity"]``; keys ``choice/<group>/<row>/<op>`` or ``op/<group>/<op>`` and
``fixed``), which :func:`dnas.latency.space_latency.latency_matrix` reads like any table.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime
from pathlib import Path
from typing import Sequence

import numpy as np

from dnas.latency.space_latency import FIXED_KEY, choice_key, op_key
from dnas.latency.table import LatencyTable, LatencyTableError

MODELS = ("choice_point", "op")


def rankdata(x) -> np.ndarray:
    """Ranks 1..n with ties given their average rank."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), np.float64)
    sx = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sx[j + 1] == sx[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(a, b) -> float:
    """Spearman's rank correlation (Pearson correlation of the average ranks)."""
    ra, rb = rankdata(a), rankdata(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = np.sqrt((ra ** 2).sum() * (rb ** 2).sum())
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


# ------------------------------------------------------------------------------ the fit

@dataclasses.dataclass
class AdditiveFit:
    """``costs``: ``(num_choice_points, num_ops)`` ("choice_point") or ``(num_ops,)`` ("op"),
    ms, the reference op at 0; ``intercept``: the fixed part (ms)."""

    model: str
    costs: np.ndarray
    intercept: float
    reference: int | None
    num_points: int

    def matrix(self, num_points: int) -> np.ndarray:
        """The per-choice-point matrix (the "op" model repeats its costs on every row)."""
        return self.costs if self.model == "choice_point" else np.tile(self.costs, (num_points, 1))

    def predict(self, indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices, np.int64)
        m = self.matrix(indices.shape[1])
        return self.intercept + m[np.arange(indices.shape[1])[None, :], indices].sum(axis=1)


def design_matrix(indices: np.ndarray, num_ops: int, model: str = "choice_point",
                  reference: int | None = 0) -> tuple[np.ndarray, list[tuple[int | None, int]]]:
    """Features of ``indices`` (``(num_archs, num_choice_points)`` op indices) and, per
    column, its ``(choice point or None, op)``; the reference op's columns are left out and
    a last all-ones column is the intercept."""
    if model not in MODELS:
        raise ValueError(f"unknown fit model {model!r}; available: {', '.join(MODELS)}")
    indices = np.asarray(indices, np.int64)
    n, p = indices.shape
    if indices.min() < 0 or indices.max() >= num_ops:
        raise ValueError(f"op indices must lie in 0..{num_ops - 1}")
    ops = [j for j in range(num_ops) if j != reference]
    cols, names = [], []
    if model == "choice_point":
        for i in range(p):
            for j in ops:
                cols.append(indices[:, i] == j)
                names.append((i, j))
    else:
        for j in ops:
            cols.append((indices == j).sum(axis=1))
            names.append((None, j))
    x = np.column_stack(cols + [np.ones(n)]).astype(np.float64)
    return x, names


def fit_additive(indices: np.ndarray, latency: np.ndarray, num_ops: int, model: str = "choice_point",
                 reference: int | None = 0) -> AdditiveFit:
    """Least-squares additive table (see the module docstring). ``reference=None`` keeps all
    columns and takes the minimum-norm solution (the split between intercept and op costs
    is then arbitrary)."""
    x, names = design_matrix(indices, num_ops, model, reference)
    y = np.asarray(latency, np.float64)
    if len(y) != x.shape[0]:
        raise ValueError(f"{x.shape[0]} architectures but {len(y)} latencies")
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    p = np.asarray(indices).shape[1]
    costs = np.zeros((p, num_ops) if model == "choice_point" else (num_ops,))
    for (i, j), c in zip(names, coef[:-1]):
        if model == "choice_point":
            costs[i, j] = c
        else:
            costs[j] = c
    return AdditiveFit(model, costs, float(coef[-1]), reference, p)


def evaluate_fit(fit: AdditiveFit, indices: np.ndarray, latency: np.ndarray) -> dict:
    pred = fit.predict(indices)
    y = np.asarray(latency, np.float64)
    ss_res, ss_tot = float(((y - pred) ** 2).sum()), float(((y - y.mean()) ** 2).sum())
    return {"spearman": spearman(pred, y), "mape": float(np.mean(np.abs(pred - y) / np.maximum(np.abs(y), 1e-12))),
            "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")}


def nonnegative(fit: AdditiveFit) -> AdditiveFit:
    """The same predictions with every op cost >= 0: each choice point runs exactly one op,
    so adding ``c`` to all costs of a choice point and ``-c`` to the intercept changes no
    prediction; the most negative cost of each row (each op, for the "op" model: times the
    number of choice points) is moved into the intercept. The reference op then costs more
    than 0 where another op was cheaper than it (e.g. ``skip_connect`` under ``none`` on
    devices that prune a dead cell)."""
    costs = np.array(fit.costs, np.float64)
    if fit.model == "choice_point":
        shift = np.minimum(costs.min(axis=1), 0.0)
        costs -= shift[:, None]
        intercept = fit.intercept + shift.sum()
    else:
        shift = min(costs.min(), 0.0)
        costs -= shift
        intercept = fit.intercept + shift * fit.num_points
    return AdditiveFit(fit.model, costs, float(intercept), fit.reference, fit.num_points)


def table_from_fit(fit: AdditiveFit, group: str, op_names: Sequence[str], space: str | None = None,
                   device: str | None = None, **meta) -> LatencyTable:
    """The fit as a table that :func:`dnas.latency.space_latency.latency_matrix` reads
    (costs made non-negative by :func:`nonnegative`; a negative intercept is clipped to 0 and
    recorded in ``meta["clipped_intercept_ms"]``)."""
    fit = nonnegative(fit)
    entries = {FIXED_KEY: {"mean_ms": max(fit.intercept, 0.0), "std_ms": 0.0, "count": 1}}
    if fit.model == "choice_point":
        for i in range(fit.costs.shape[0]):
            for j, op in enumerate(op_names):
                entries[choice_key(group, i, op)] = {"mean_ms": float(fit.costs[i, j]), "std_ms": 0.0, "count": 1}
    else:
        for j, op in enumerate(op_names):
            entries[op_key(group, op)] = {"mean_ms": float(fit.costs[j]), "std_ms": 0.0, "count": 1}
    info = {"backend": None, "device_kind": device, "method": "fit", "space": space, "granularity": fit.model,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "reference_op": op_names[fit.reference] if fit.reference is not None else None,
            "clipped_intercept_ms": fit.intercept if fit.intercept < 0 else None, **meta}
    return LatencyTable(entries, info, name=f"fitted table ({device or 'device'}, {fit.model})")


# ------------------------------------------------------------------------------ NAS-Bench-201 data

def _repo_shared() -> Path:
    return Path(__file__).resolve().parents[2] / ".." / "shared"


DEFAULT_CSV = _repo_shared() / "data" / "nb201" / "latency_per_arch_ms.csv"
DEFAULT_ARCHS = _repo_shared() / "data" / "nb201" / "nats_bench_200ep.csv"


def load_nb201_latency(csv_path: str | Path = DEFAULT_CSV, archs_path: str | Path = DEFAULT_ARCHS
                       ) -> tuple[np.ndarray, dict[str, np.ndarray], list[str]]:
    """``(indices (N, 6) op indices in NB201_OPS order, {device: (N,) ms}, arch strings)``.

    The two files are joined by row (``latency_per_arch_ms.csv``'s ``nb201_index`` column,
    when present, must equal the row number, else an error says where they disagree)."""
    from dnas.supernet.genotype import NB201_OPS, nb201_string_to_ops

    csv_path, archs_path = Path(csv_path), Path(archs_path)
    for p in (csv_path, archs_path):
        if not p.exists():
            raise LatencyTableError(f"per-architecture file {str(p)!r} not found")
    with archs_path.open(newline="") as f:
        reader = csv.DictReader(f)
        col = next((c for c in (reader.fieldnames or []) if c.lower() in ("architecturestring", "arch", "arch_str")), None)
        if col is None:
            raise LatencyTableError(f"{archs_path}: no architecture-string column (ArchitectureString/arch) in "
                                    f"{reader.fieldnames}")
        archs = [row[col] for row in reader]
    with csv_path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows = [r for r in reader if r]
    data = np.asarray(rows, dtype=np.float64)
    if len(data) != len(archs):
        raise LatencyTableError(f"{csv_path} has {len(data)} rows but {archs_path} has {len(archs)} architectures")
    devices = header
    if header[0].lower() in ("nb201_index", "index", "arch_index"):
        idx = data[:, 0].astype(np.int64)
        bad = np.nonzero(idx != np.arange(len(idx)))[0]
        if len(bad):
            raise LatencyTableError(f"{csv_path}: row {bad[0]} holds architecture index {idx[bad[0]]}; the rows must "
                                    f"be in index order to match {archs_path}")
        data, devices = data[:, 1:], header[1:]
    op_index = {op: j for j, op in enumerate(NB201_OPS)}
    indices = np.asarray([[op_index[o] for o in nb201_string_to_ops(a)] for a in archs], np.int64)
    return indices, {d: data[:, k] for k, d in enumerate(devices)}, archs


def nb201_connected(indices: np.ndarray, none: int = 0) -> np.ndarray:
    """Whether each NAS-Bench-201 cell (``(N, 6)`` op indices, edges in
    :data:`~dnas.supernet.genotype.NB201_EDGES` order) has a path of non-``none`` edges from
    node 0 to node 3."""
    from dnas.supernet.genotype import NB201_EDGES

    indices = np.asarray(indices)
    live = [np.ones(len(indices), bool)] + [np.zeros(len(indices), bool) for _ in range(3)]
    for e, (s, d) in enumerate(NB201_EDGES):   # edges are ordered by destination
        live[d] = live[d] | (live[s] & (indices[:, e] != none))
    return live[3]


def fit_nb201(csv_path: str | Path = DEFAULT_CSV, archs_path: str | Path = DEFAULT_ARCHS, train_frac: float = 0.2,
              seed: int = 0, devices: Sequence[str] | None = None, models: Sequence[str] = MODELS,
              table_model: str | None = None) -> tuple[dict, dict[str, LatencyTable]]:
    """Fit per device on a random ``train_frac`` of the cells; report on the rest.

    Returns ``(report, tables)``: the JSON-ready report (per device and model: Spearman ρ,
    MAPE, R² on the held-out cells, ρ and MAPE on the held-out cells whose output is
    connected to the input, the fixed part and the op costs) and, when
    ``table_model`` is given, one fitted :class:`LatencyTable` per device."""
    from dnas.supernet.genotype import NB201_OPS

    if not 0 < train_frac < 1:
        raise ValueError(f"train_frac must be in (0, 1), got {train_frac}")
    indices, lat, _ = load_nb201_latency(csv_path, archs_path)
    devices = list(lat) if devices is None else list(devices)
    unknown = [d for d in devices if d not in lat]
    if unknown:
        raise ValueError(f"unknown device column(s) {unknown}; available: {', '.join(lat)}")
    for m in models:
        if m not in MODELS:
            raise ValueError(f"unknown fit model {m!r}; available: {', '.join(MODELS)}")
    n = len(indices)
    perm = np.random.default_rng(seed).permutation(n)
    n_train = int(round(train_frac * n))
    tr, te = perm[:n_train], perm[n_train:]
    none = NB201_OPS.index("none")
    # a cell with no path of non-`none` edges from its input to its output outputs zeros:
    # devices that prune dead graphs run it in ~0 ms, which no additive model predicts
    connected = nb201_connected(indices, none)
    report = {"train_frac": train_frac, "seed": seed, "n_train": int(n_train), "n_test": int(n - n_train),
              "csv": str(csv_path), "archs": str(archs_path), "reference_op": "none",
              "op_names": list(NB201_OPS), "n_test_connected": int(connected[te].sum()), "devices": {}}
    tables = {}
    for d in devices:
        y = lat[d]
        ok = np.isfinite(y)
        res = {}
        for m in models:
            tr_d, te_d = tr[ok[tr]], te[ok[te]]
            fit = fit_additive(indices[tr_d], y[tr_d], len(NB201_OPS), m, reference=none)
            conn = te_d[connected[te_d]]
            on_connected = evaluate_fit(fit, indices[conn], y[conn])
            res[m] = {**evaluate_fit(fit, indices[te_d], y[te_d]),
                      "spearman_connected": on_connected["spearman"], "mape_connected": on_connected["mape"],
                      "train_spearman": evaluate_fit(fit, indices[tr_d], y[tr_d])["spearman"],
                      "fixed_ms": fit.intercept,
                      "costs_ms": (dict(zip(NB201_OPS, np.round(fit.costs, 4).tolist())) if m == "op"
                                   else {f"edge{i}": dict(zip(NB201_OPS, np.round(row, 4).tolist()))
                                         for i, row in enumerate(fit.costs)})}
            if m == table_model:
                tables[d] = table_from_fit(fit, "cell", NB201_OPS, space="nb201", device=d,
                                           source=Path(csv_path).name, train_frac=train_frac, seed=seed,
                                           test_spearman=res[m]["spearman"],
                                           space_config={"channels": 16, "cells_per_stage": 5, "note":
                                                         "NAS-Bench-201 benchmark network (C=16, N=5)"})
        res["mean_ms"] = float(np.mean(y[ok]))
        report["devices"][d] = res
    return report, tables
