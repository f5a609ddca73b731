"""PNG pictures of derived cells and of architecture probabilities (matplotlib, Agg canvas).

* :func:`plot_genotype` — DARTS: normal and reduction cell panels (inputs ``c_{k-2}``,
  ``c_{k-1}``, intermediate nodes 0..3, output ``c_{k}`` fed by the concat edges, each chosen
  edge an arrow labelled with its op); NAS-Bench-201: the 4-node cell with its 6 labelled
  edges (``none`` edges faint, unlabelled); chain: a strip of labelled blocks; a user model:
  its cells when the labels name edges (``src->dst``, ``group/src->dst``), else a grid of
  labelled boxes.
* :func:`plot_alphas` — annotated heatmaps of the op probabilities, one per group (a user
  model's one-row choice points with the same ops share one), wrapped into rows.

No graphviz: nodes are laid out in layers (a node's layer is one more than its deepest input),
edges are quadratic curves bent just enough to miss other nodes, and labels are placed along
their edge where they overlap nothing already drawn. Figures are drawn on a private Agg canvas,
so the process-wide matplotlib backend is left alone.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Circle, FancyArrowPatch, FancyBboxPatch

from dnas.supernet.genotype import (DARTS_EDGES, DARTS_OPS, NB201_EDGES, NB201_OPS, ChainGenotype, ChoiceGenotype,
                                    DartsGenotype, GenotypeError, NB201Genotype, genotype_from_json,
                                    natural_key, parse_nb201)

__all__ = ["plot_genotype", "plot_alphas", "OP_COLORS"]

#: Edge colours per op name (ops not listed get a colour from a fixed palette).
OP_COLORS: dict[str, str] = {
    "none": "#b0b0b0",
    "skip_connect": "#4d4d4d",
    "max_pool_3x3": "#2e7d32",
    "avg_pool_3x3": "#7cb342",
    "sep_conv_3x3": "#1565c0",
    "sep_conv_5x5": "#6a1b9a",
    "dil_conv_3x3": "#c62828",
    "dil_conv_5x5": "#ef6c00",
    "nor_conv_1x1": "#ef6c00",
    "nor_conv_3x3": "#1565c0",
    "zero": "#9e9e9e",
}
_PALETTE = ("#1565c0", "#ef6c00", "#2e7d32", "#c62828", "#6a1b9a", "#00838f", "#ad1457",
            "#5d4037", "#827717", "#283593")

_SCALE = 0.78          # inches per data unit in cell drawings
_NODE_R = 0.36         # intermediate node radius (data units)
_LABEL_FS = 8.5


def _op_color(op: str, ops_in_use: Sequence[str] = ()) -> str:
    if op in OP_COLORS:
        return OP_COLORS[op]
    uniq = sorted(set(ops_in_use) | {op})
    return _PALETTE[uniq.index(op) % len(_PALETTE)]


def _new_figure(w: float, h: float, dpi: int) -> Figure:
    fig = Figure(figsize=(w, h), dpi=dpi, facecolor="white")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path) -> Path:
    if hasattr(path, "write"):   # a file object (alphas_image)
        fig.savefig(path, format="png", dpi=fig.dpi, facecolor="white")
        return path
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=fig.dpi, facecolor="white")
    return path


# ----------------------------------------------------------------------------- graph drawing

class _Graph:
    """Nodes with positions and shapes, edges drawn as curves, labels placed without overlap."""

    def __init__(self):
        self.nodes: dict[Any, dict] = {}
        self.edges: list[dict] = []

    def node(self, key, xy, text, kind="inner", half=None):
        if half is None:
            half = (_NODE_R, _NODE_R) if kind == "inner" else (0.55, 0.34)
        self.nodes[key] = {"xy": np.asarray(xy, float), "text": text, "kind": kind, "half": half}

    def edge(self, src, dst, label=None, color="#333333", style="-", lw=1.6, alpha=1.0, arrow=True,
             dst_dy=0.0):
        """``dst_dy``: aim at this vertical offset from the destination's centre."""
        self.edges.append(dict(src=src, dst=dst, label=label, color=color, style=style, lw=lw,
                               alpha=alpha, arrow=arrow, dst_dy=dst_dy))

    # -- geometry
    def _extent(self, key) -> tuple[float, float]:
        """Half width / half height of a node (data units)."""
        return self.nodes[key]["half"]

    @staticmethod
    def _curve(p0, p2, rad, n=48):
        d = p2 - p0
        c = (p0 + p2) / 2 + rad * np.array([d[1], -d[0]])
        t = np.linspace(0.0, 1.0, n)[:, None]
        return (1 - t) ** 2 * p0 + 2 * t * (1 - t) * c + t ** 2 * p2

    def _clearance(self, pts, skip) -> float:
        """Smallest gap between the curve points and any node box except those in ``skip``."""
        best = math.inf
        for k, n in self.nodes.items():
            if k in skip:
                continue
            hw, hh = self._extent(k)
            dx = np.maximum(np.abs(pts[:, 0] - n["xy"][0]) - hw, 0)
            dy = np.maximum(np.abs(pts[:, 1] - n["xy"][1]) - hh, 0)
            best = min(best, float(np.min(np.hypot(dx, dy))))
        return best

    def _route(self, e, used: dict) -> float:
        p0 = self.nodes[e["src"]]["xy"]
        p2 = self.nodes[e["dst"]]["xy"] + np.array([0.0, e["dst_dy"]])
        center_y = np.mean([n["xy"][1] for n in self.nodes.values()])
        mid_y = (p0[1] + p2[1]) / 2
        dx = p2[0] - p0[0]
        # rad > 0 bends a left-to-right edge downwards: bend away from the drawing's centre.
        away = 1.0 if (mid_y < center_y - 1e-9) == (dx >= 0) else -1.0
        if abs(mid_y - center_y) < 1e-9:
            away = -1.0 if dx >= 0 else 1.0
        pair = (e["src"], e["dst"])
        rads = [0.0]
        for r in (0.1, 0.18, 0.26, 0.34, 0.44, 0.55):
            rads += [away * r, -away * r]
        rads = [r for r in rads if all(abs(r - u) > 0.15 for u in used.get(pair, []))]
        best, best_gap = rads[0], -math.inf
        for r in rads:
            gap = self._clearance(self._curve(p0, p2, r), skip={e["src"], e["dst"]})
            if gap > 0.16:
                best = r
                break
            if gap > best_gap:
                best, best_gap = r, gap
        used.setdefault(pair, []).append(best)
        return best

    # -- drawing
    def prepare(self) -> tuple[float, float, float, float]:
        """Route the edges; returns the data limits ``(x0, x1, y0, y1)`` of the drawing."""
        used: dict = {}
        for e in self.edges:
            e["rad"] = self._route(e, used)
            p0 = self.nodes[e["src"]]["xy"]
            p2 = self.nodes[e["dst"]]["xy"] + np.array([0.0, e["dst_dy"]])
            e["pts"] = self._curve(p0, p2, e["rad"])
        boxes = [np.array([n["xy"] - n["half"], n["xy"] + n["half"]]) for n in self.nodes.values()]
        pts = np.concatenate(boxes + [e["pts"] for e in self.edges])
        self.limits = (pts[:, 0].min() - 0.12, pts[:, 0].max() + 0.12,
                       pts[:, 1].min() - 0.3, pts[:, 1].max() + 0.3)
        return self.limits

    def draw(self, ax, title=None):
        x0, x1, y0, y1 = self.limits
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)
        ax.set_aspect("equal", adjustable="box")
        ax.set_axis_off()
        if title:
            ax.text(0.0, 1.0, title, transform=ax.transAxes, fontsize=12, fontweight="bold",
                    ha="left", va="bottom")
        ax.apply_aspect()

        patches = {}
        styles = {"input": ("#c8e6c9", "#2e7d32"), "output": ("#fff3b0", "#b28704"),
                  "inner": ("#bbdefb", "#1565c0")}
        for k, n in self.nodes.items():
            face, edge = styles[n["kind"]]
            x, y = n["xy"]
            if n["kind"] == "inner" and tuple(n["half"]) == (_NODE_R, _NODE_R):
                p = Circle((x, y), _NODE_R, fc=face, ec=edge, lw=1.6, zorder=3)
            else:
                hw, hh = self._extent(k)
                p = FancyBboxPatch((x - hw + 0.08, y - hh + 0.08), 2 * hw - 0.16, 2 * hh - 0.16,
                                   boxstyle="round,pad=0.08", fc=face, ec=edge, lw=1.6, zorder=3)
            ax.add_patch(p)
            patches[k] = p
            ax.text(x, y, n["text"], ha="center", va="center", fontsize=11, zorder=4,
                    fontweight="bold" if n["kind"] == "inner" else "normal")

        for e in self.edges:
            arrow = FancyArrowPatch(
                posA=tuple(self.nodes[e["src"]]["xy"]), posB=tuple(self.nodes[e["dst"]]["xy"] + np.array([0.0, e["dst_dy"]])),
                patchA=patches[e["src"]], patchB=patches[e["dst"]],
                connectionstyle=f"arc3,rad={e['rad']}",
                arrowstyle="-|>,head_length=0.55,head_width=0.28" if e["arrow"] else "-",
                mutation_scale=14, color=e["color"], lw=e["lw"], linestyle=e["style"],
                alpha=e["alpha"], shrinkA=1, shrinkB=2, zorder=2)
            ax.add_patch(arrow)

        self._place_labels(ax, patches)

    def _place_labels(self, ax, patches):
        fig = ax.figure
        renderer = fig.canvas.get_renderer()
        to_disp = ax.transData.transform
        node_boxes = [p.get_window_extent(renderer) for p in patches.values()]
        node_boxes = [np.array([b.x0, b.y0, b.x1, b.y1]) for b in node_boxes]
        placed: list[np.ndarray] = []

        def overlap(a, b):
            w = min(a[2], b[2]) - max(a[0], b[0])
            h = min(a[3], b[3]) - max(a[1], b[1])
            return max(w, 0) * max(h, 0)

        labelled = [e for e in self.edges if e["label"]]
        # longer edges have more room to move: place the short ones first
        labelled.sort(key=lambda e: np.linalg.norm(e["pts"][-1] - e["pts"][0]))
        disp_curves = [to_disp(e["pts"]) for e in self.edges]
        ts = np.linspace(0.0, 1.0, len(labelled[0]["pts"])) if labelled else None
        for e in labelled:
            txt = ax.text(0, 0, e["label"], ha="center", va="center", fontsize=_LABEL_FS,
                          color=e["color"], zorder=5,
                          bbox=dict(boxstyle="round,pad=0.18", fc="white", ec=e["color"], lw=0.8, alpha=0.95))
            best, best_cost = None, math.inf
            for t in (0.5, 0.42, 0.58, 0.34, 0.66, 0.27, 0.73, 0.2, 0.8):
                i = int(round(t * (len(ts) - 1)))
                xy = e["pts"][i]
                txt.set_position(tuple(xy))
                bb = txt.get_window_extent(renderer)
                box = np.array([bb.x0 - 5, bb.y0 - 4, bb.x1 + 5, bb.y1 + 4])
                area = (box[2] - box[0]) * (box[3] - box[1])
                cost = 20 * sum(overlap(box, b) for b in placed) / area
                cost += 10 * sum(overlap(box, b) for b in node_boxes) / area
                crossings = 0
                for f, c in zip(self.edges, disp_curves):
                    if f is e:
                        continue
                    inside = ((c[:, 0] > box[0]) & (c[:, 0] < box[2]) & (c[:, 1] > box[1]) & (c[:, 1] < box[3]))
                    crossings += int(inside.any())
                cost += 0.6 * crossings + 0.8 * abs(t - 0.5)
                if cost < best_cost - 1e-9:
                    best, best_cost = (tuple(xy), box), cost
            txt.set_position(best[0])
            placed.append(best[1])


# ----------------------------------------------------------------------------- genotypes

def _layers(inputs: dict[int, list[int]], first: int) -> dict[int, int]:
    layer = {i: 0 for i in range(first)}
    for node in sorted(inputs):
        layer[node] = 1 + max((layer[s] for s in inputs[node]), default=0)
    return layer


def _darts_graph(g: DartsGenotype, kind: str) -> _Graph:
    edges = g.edges(kind)
    concat = g.concat(kind)
    inputs: dict[int, list[int]] = {d: [] for d in range(2, 6)}
    for s, d, _ in edges:
        inputs[d].append(s)
    layer = _layers(inputs, 2)
    n_layers = max(layer.values()) + 1
    dx, dy = 3.9, 1.75
    gr = _Graph()
    gr.node(0, (0.0, 0.75 * dy), r"$c_{k-2}$", "input")
    gr.node(1, (0.0, -0.75 * dy), r"$c_{k-1}$", "input")
    for L in range(1, n_layers):
        members = [n for n in range(2, 6) if layer[n] == L]
        for j, n in enumerate(members):
            y = (len(members) - 1) / 2 * dy - j * dy
            if len(members) == 1 and n_layers > 2:  # zigzag lone nodes so skip edges can pass
                y = 0.45 * dy * (1 if L % 2 else -1) if n_layers > 3 else 0.0
            gr.node(n, (L * dx, y), str(n - 2), "inner")
    nc = len(concat)
    gr.node("out", (n_layers * dx + 0.2, 0.0), r"$c_{k}$", "output", half=(0.55, max(0.34, 0.26 * nc)))
    ops = [op for _, _, op in edges]
    for s, d, op in edges:
        gr.edge(s, d, op, _op_color(op, ops))
    # concat edges arrive at distinct points of the output box, ordered like their sources
    order = sorted(concat, key=lambda n: -gr.nodes[n]["xy"][1])
    for i, n in enumerate(order):
        dy = 0.0 if nc == 1 else (0.5 - i / (nc - 1)) * 2 * (0.26 * nc - 0.22)
        gr.edge(n, "out", None, "#8c8c8c", style=(0, (4, 3)), lw=1.2, dst_dy=dy)
    return gr


def _panels(graphs: Sequence[_Graph], names: Sequence[str | None], title: str | None, dpi: int,
            subtitle: str | None = None) -> Figure:
    """Stack graph drawings vertically, each at ``_SCALE`` inches per data unit."""
    lims = [gr.prepare() for gr in graphs]
    ws = [(l[1] - l[0]) * _SCALE for l in lims]
    hs = [(l[3] - l[2]) * _SCALE for l in lims]
    band = [0.32 if n else 0.0 for n in names]
    top = (0.42 if title else 0.1) + (0.25 if subtitle else 0.0)
    margin = 0.15
    W = max(ws) + 2 * margin
    H = top + sum(hs) + sum(band) + 0.1
    fig = _new_figure(W, H, dpi)
    if title:
        fig.text(margin / W, 1 - 0.1 / H, title, fontsize=13, ha="left", va="top")
    if subtitle:
        fig.text(margin / W, 1 - (0.1 + (0.38 if title else 0.0)) / H, subtitle, fontsize=8,
                 family="monospace", color="#444444", ha="left", va="top")
    y = H - top
    for gr, w, h, bnd, name in zip(graphs, ws, hs, band, names):
        y -= bnd + h
        ax = fig.add_axes([margin / W, y / H, w / W, h / H])
        gr.draw(ax, name)
    return fig


def _plot_darts(g: DartsGenotype, path, title, dpi) -> Path:
    graphs = [_darts_graph(g, k) for k in ("normal", "reduce")]
    return _save(_panels(graphs, ["normal cell", "reduction cell"], title, dpi), path)


def _plot_nb201(g: NB201Genotype, path, title, dpi) -> Path:
    gr = _Graph()
    pos = {0: (0.0, 0.0), 1: (3.2, 1.35), 2: (6.4, -1.35), 3: (9.6, 0.0)}
    for k in range(4):
        gr.node(k, pos[k], str(k), "input" if k == 0 else "output" if k == 3 else "inner",
                half=None if k in (1, 2) else (0.4, 0.34))
    for (s, d), op in zip(NB201_EDGES, g.ops):
        if op == "none":
            gr.edge(s, d, None, OP_COLORS["none"], style=(0, (2, 3)), lw=1.0, alpha=0.7, arrow=False)
        else:
            gr.edge(s, d, op, _op_color(op))
    return _save(_panels([gr], [None], title or "NAS-Bench-201 cell", dpi, subtitle=g.arch), path)


def _chain_color(op: str, ops: Sequence[str]) -> str:
    if op in ("zero", "none"):
        return OP_COLORS[op]
    m = re.search(r"k(\d+)", op)
    if m:
        hue = {"3": "#1565c0", "5": "#ef6c00", "7": "#2e7d32"}.get(m.group(1))
        if hue:
            return hue
    return _op_color(op, ops)


def _plot_chain(g: ChainGenotype, path, title, dpi, per_row: int = 8) -> Path:
    return _plot_boxes(list(g.ops), [f"block {i}" for i in range(len(g.ops))],
                       title or f"chain genotype ({len(g.ops)} blocks)", path, dpi, per_row)


#: A choice-point label that names a cell edge: ``src->dst``, optionally under a group, ``group/src->dst``.
_EDGE_LABEL = re.compile(r"^(?:(?P<group>.+)/)?(?P<src>[^/]+?)->(?P<dst>[^/]+)$")


def _cell_edges(g: ChoiceGenotype) -> dict[str | None, list[tuple[str, str, str]]] | None:
    """The genotype as cells, ``{group: [(src, dst, op), ...]}``, when every label is an edge
    label (:func:`dnas.supernet.genotype.edge_label`, optionally under ``group/``), every choice
    an op, and each group's edges form a DAG; else None."""
    cells: dict[str | None, list[tuple[str, str, str]]] = {}
    for label, choice in g.choices.items():
        m = _EDGE_LABEL.match(label)
        if m is None or not isinstance(choice, str) or m["src"] == m["dst"]:
            return None
        cells.setdefault(m["group"], []).append((m["src"], m["dst"], choice))
    for edges in cells.values():
        if _edge_layers(edges) is None:
            return None
    return cells


def _edge_layers(edges) -> dict[str, int] | None:
    """Each node's layer, one more than its deepest input's (sources at 0); None on a cycle."""
    inputs: dict[str, list[str]] = {}
    for s, d, _ in edges:
        inputs.setdefault(s, [])
        inputs.setdefault(d, []).append(s)
    layer: dict[str, int] = {}
    for _ in range(len(inputs) + 1):
        changed = False
        for n, srcs in inputs.items():
            v = 1 + max((layer.get(s, 0) for s in srcs), default=-1)
            if layer.get(n) != v:
                layer[n], changed = v, True
        if not changed:
            return layer
    return None   # still rising after as many rounds as nodes: a cycle


def _cell_graph(edges) -> _Graph:
    """A user's cell drawn from its edge labels: sources as input boxes, sinks as output boxes,
    nodes in layers left to right (by every edge); a ``none``/``zero`` edge is no edge and is
    not drawn."""
    layer = _edge_layers(edges)
    has_out = {s for s, _, _ in edges}
    has_in = {d for _, d, _ in edges}
    dx, dy = 3.4, 1.6
    gr = _Graph()
    for L in range(max(layer.values()) + 1):
        members = sorted((n for n in layer if layer[n] == L), key=natural_key)
        for j, n in enumerate(members):
            y = (len(members) - 1) / 2 * dy - j * dy
            if len(members) == 1 and L % 2 and 0 < L < max(layer.values()):
                y = 0.5 * dy      # zigzag lone middle nodes so skip edges can pass
            kind = "input" if n not in has_in else "output" if n not in has_out else "inner"
            if kind == "inner":
                half = None if len(n) <= 2 else (max(0.4, 0.1 * len(n) + 0.2), 0.34)
            else:
                half = (max(0.55, 0.1 * len(n) + 0.25), 0.34)
            gr.node(n, (L * dx, y), n, kind, half=half)
    ops = [op for _, _, op in edges]
    for s, d, op in edges:
        if op not in ("none", "zero"):
            gr.edge(s, d, op, _op_color(op, ops))
    return gr


def _plot_choices(g: ChoiceGenotype, path, title, dpi, per_row: int = 6) -> Path:
    """A model's choice points. Labelled as cell edges (``src->dst``, ``group/src->dst``): one
    cell drawing per group. Otherwise a grid of boxes in label order, each its choice (inputs
    as ``in 0+2``), with no arrows: the labels do not say how the choice points are wired."""
    cells = _cell_edges(g)
    if cells is not None:
        names = list(cells)
        fig = _panels([_cell_graph(cells[n]) for n in names], [n for n in names],
                      title or f"{g.model}: {len(g.choices)} choice points", dpi)
        return _save(fig, path)
    labels = sorted(g.choices, key=natural_key)
    ops = [v if isinstance(v, str) else "in " + "+".join(map(str, v)) for v in (g.choices[k] for k in labels)]
    return _plot_boxes(ops, labels, title or f"{g.model}: {len(ops)} choice points", path, dpi, per_row,
                       arrows=False)


def _plot_boxes(ops: list, labels: list, title: str, path, dpi, per_row: int, arrows: bool = True) -> Path:
    """A row-wrapped sequence of boxes, ``ops[i]`` inside and ``labels[i]`` above, joined by
    arrows when ``arrows`` (a chain's blocks run in order)."""
    n = len(ops)
    per_row = max(1, min(per_row, n))
    rows = math.ceil(n / per_row)
    bw, bh, gap, rgap = 1.55, 0.8, 0.55, 0.9
    W = per_row * bw + (per_row - 1) * gap
    H = rows * bh + (rows - 1) * rgap
    S = 0.9                                 # inches per data unit
    x0, x1, y0, y1 = (-0.6 if rows > 1 else -0.35), W + 0.35, -H - 0.2, 0.45
    aw, ah, band = (x1 - x0) * S, (y1 - y0) * S, 0.45
    fig_w = max(aw, 4.0)
    fig = _new_figure(fig_w, ah + band, dpi)
    ax = fig.add_axes([0.0, 0.0, aw / fig_w, ah / (ah + band)])
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_aspect("equal", adjustable="box")
    ax.set_axis_off()
    fig.text(0.15 / fig_w, 1 - 0.1 / (ah + band), title, fontsize=12,
             ha="left", va="top")
    centers = []
    for i, op in enumerate(ops):
        r, c = divmod(i, per_row)
        x0, y0 = c * (bw + gap), -r * (bh + rgap) - bh
        color = _chain_color(op, ops)
        zero = op in ("zero", "none")
        ax.add_patch(FancyBboxPatch((x0, y0), bw, bh, boxstyle="round,pad=0.02,rounding_size=0.12",
                                    fc="white" if zero else color, ec="none", lw=0,
                                    alpha=1.0 if zero else 0.22, zorder=2))
        ax.add_patch(FancyBboxPatch((x0, y0), bw, bh, boxstyle="round,pad=0.02,rounding_size=0.12",
                                    fc="none", ec=color, lw=1.5, linestyle="--" if zero else "-", zorder=3))
        fs = 9 if len(op) <= 10 else max(6, 9 * 10 / len(op))
        ax.text(x0 + bw / 2, y0 + bh * 0.42, op, ha="center", va="center", fontsize=fs,
                color="#555555" if zero else "black", fontweight="bold", zorder=4)
        ax.text(x0 + bw / 2, y0 + bh + 0.1, labels[i], ha="center", va="bottom", fontsize=7,
                color="#666666", zorder=4)
        centers.append((x0, y0))
    arrow_kw = dict(arrowstyle="-|>,head_length=0.5,head_width=0.25", mutation_scale=12,
                    color="#555555", lw=1.2, zorder=1)
    for i in range(n - 1 if arrows else 0):
        (xa, ya), (xb, yb) = centers[i], centers[i + 1]
        if (i + 1) % per_row:
            ax.add_patch(FancyArrowPatch((xa + bw, ya + bh / 2), (xb, yb + bh / 2), shrinkA=1, shrinkB=1, **arrow_kw))
        else:  # wrap to the next row: right, down, back left, down into the next block
            ymid = ya - rgap / 2 + 0.12
            xs = [xa + bw / 2, xa + bw / 2, xb - 0.3, xb - 0.3]
            ys = [ya, ymid, ymid, yb + bh / 2]
            ax.plot(xs, ys, color="#555555", lw=1.2, zorder=1)
            ax.add_patch(FancyArrowPatch((xb - 0.3, yb + bh / 2), (xb, yb + bh / 2), shrinkA=0, shrinkB=1, **arrow_kw))
    return _save(fig, path)


def _as_genotype(g: Any):
    if isinstance(g, (DartsGenotype, NB201Genotype, ChainGenotype, ChoiceGenotype)):
        return g
    if isinstance(g, Mapping):
        return genotype_from_json(g)
    if isinstance(g, str):
        return parse_nb201(g)
    raise GenotypeError(f"plot_genotype: not a genotype: {type(g).__name__} {g!r}")


def plot_genotype(g: Any, path: str | os.PathLike, title: str | None = None, dpi: int = 130) -> Path:
    """Draw a genotype (a genotype object, its JSON dict, or an NB201 arch string) as a PNG
    at ``path`` (parent folders created). Returns the path."""
    g = _as_genotype(g)
    if isinstance(g, DartsGenotype):
        return _plot_darts(g, path, title, dpi)
    if isinstance(g, NB201Genotype):
        return _plot_nb201(g, path, title, dpi)
    if isinstance(g, ChoiceGenotype):
        return _plot_choices(g, path, title, dpi)
    return _plot_chain(g, path, title, dpi)


# ----------------------------------------------------------------------------- alphas

def _row_labels(n_rows: int, op_names: Sequence[str]) -> list[str]:
    """The built-in cells' edge names when the ops and row count are theirs, else row numbers."""
    names = tuple(op_names)
    if n_rows == len(DARTS_EDGES) and names == DARTS_OPS:
        node = {0: r"c_{k-2}", 1: r"c_{k-1}"}
        return [f"${node.get(s, str(s - 2))} \\rightarrow {d - 2}$" for s, d in DARTS_EDGES]
    if n_rows == len(NB201_EDGES) and names == NB201_OPS:
        return [f"{s} → {d}" for s, d in NB201_EDGES]
    return [f"{i}" for i in range(n_rows)]


def _alpha_panels(mats: dict, row_labels_by_key: Mapping[str, Sequence[str]] | None) -> list[tuple]:
    """``(title, matrix, ops, row labels)`` per heatmap. Groups of one row (a user model's choice
    points, each its own group) that offer the same ops share one heatmap, a row each, so a
    model with many choice points reads as one table rather than a strip of one-row maps."""
    panels, merged = [], {}
    for key, (m, ops) in mats.items():
        rows = list(row_labels_by_key.get(key, ())) if row_labels_by_key else []
        labels = _row_labels(m.shape[0], ops)
        if labels == [str(i) for i in range(m.shape[0])] and len(rows) == m.shape[0]:
            labels = [str(r) for r in rows]
        if m.shape[0] == 1:
            label = str(key) if labels[0] in (str(key), "0") else f"{key}: {labels[0]}"
            merged.setdefault(tuple(ops), []).append((label, m))
            if len(merged[tuple(ops)]) == 1:
                panels.append(("merge", tuple(ops)))
        else:
            panels.append((str(key), m, list(ops), labels))
    out = []
    for p in panels:
        if p[0] != "merge":
            out.append(p)
            continue
        rows = sorted(merged[p[1]], key=lambda r: natural_key(r[0]))
        if len(rows) == 1:   # a panel of one choice point: its label is the title
            out.append((rows[0][0], rows[0][1], list(p[1]), [""]))
        else:
            out.append((f"{len(rows)} choice points", np.concatenate([m for _, m in rows]), list(p[1]),
                        [r for r, _ in rows]))
    return out


def _wrap(boxes: list, max_width: float, head: float, max_aspect: float = 3.0) -> list[list]:
    """Rows of ``boxes`` (``box[1]``: width, ``box[2]``: height, inches), in order. Of the
    layouts that fill rows greedily up to some width (at most ``max_width``), the one with the
    least blank area that is at most ``max_aspect`` times as wide as high, fewer rows on a tie
    (within 2 %): a strip of one-row heatmaps folds, two tall ones stay side by side."""
    widths = [b[1] for b in boxes]
    cap = max(max(widths), max_width)
    # every width a row can have: the sums of consecutive boxes (then at most 60 row counts)
    limits = sorted({sum(widths[i:j]) for i in range(len(widths)) for j in range(i + 1, len(widths) + 1)}
                    if len(widths) <= 60 else {sum(widths) / n for n in range(1, len(widths) + 1)}, reverse=True)
    best, best_cost = None, (math.inf, math.inf)
    for limit in (min(max(v, max(widths)), cap) + 1e-9 for v in limits):
        grid, row = [], []
        for b in boxes:
            if row and sum(r[1] for r in row) + b[1] > limit:
                grid.append(row)
                row = []
            row.append(b)
        grid.append(row)
        w = max(sum(b[1] for b in r) for r in grid)
        h = head + sum(max(b[2] for b in r) for r in grid)
        cost = (0.0, w * h) if w / h <= max_aspect else (w / h, w * h)
        if cost[0] < best_cost[0] - 1e-9 or (cost[0] == best_cost[0] and cost[1] < 0.98 * best_cost[1]):
            best, best_cost = grid, cost
    return best


def plot_alphas(alpha_probs: Mapping[str, Any], op_names_by_key: Mapping[str, Sequence[str]],
                path: str | os.PathLike, title: str | None = None, dpi: int = 120,
                row_labels_by_key: Mapping[str, Sequence[str]] | None = None, max_width: float = 24.0) -> Path:
    """Annotated heatmaps of the op probabilities: rows = edges / choice points (named by
    ``row_labels_by_key[key]`` where given), columns = the ops ``op_names_by_key[key]``, each
    cell's probability written in it and each row's largest value in bold. One heatmap per key,
    except that one-row keys with the same ops share one (see :func:`_alpha_panels`); heatmaps
    wrap into rows (at most ``max_width`` inches wide) into the most compact picture at most
    three times as wide as high (:func:`_wrap`). Writes a PNG at ``path``; returns the path."""
    if not alpha_probs:
        raise ValueError("plot_alphas: alpha_probs is empty")
    mats = {}
    for key, a in alpha_probs.items():
        if key not in op_names_by_key:
            raise ValueError(f"plot_alphas: no op names given for key {key!r}")
        m = np.asarray(a, dtype=np.float64)
        ops = list(op_names_by_key[key])
        if m.ndim != 2 or m.shape[1] != len(ops):
            raise ValueError(f"plot_alphas: {key!r} must be a 2-D array with {len(ops)} columns "
                             f"(one per op), got shape {m.shape}")
        mats[key] = (m, ops)
    cell_w, cell_h, top, right = 0.78, 0.36, 0.5, 0.85
    boxes = []                              # (panel, width, height, left margin) in inches
    for panel in _alpha_panels(mats, row_labels_by_key):
        _, m, ops, rows = panel
        lm = 0.35 + 0.07 * max(len(re.sub(r"[${}\\]|rightarrow", "", r)) for r in rows)
        bm = 0.35 + 0.045 * max(len(o) for o in ops)
        boxes.append((panel, lm + len(ops) * cell_w + right, top + m.shape[0] * cell_h + bm, lm))
    head = 0.45 if title else 0.0
    grid = _wrap(boxes, max_width, head)
    W = max(sum(b[1] for b in r) for r in grid)
    H = head + sum(max(b[2] for b in r) for r in grid)
    fig = _new_figure(W, H, dpi)
    if title:
        fig.suptitle(title, fontsize=12, y=1 - 0.08 / H, va="top")
    y_top = H - head
    for r in grid:
        x = 0.0
        row_h = max(b[2] for b in r)
        for (key, m, ops, rows), w, h, lm in r:
            hw, hh = len(ops) * cell_w, m.shape[0] * cell_h
            bottom = y_top - top - hh
            ax = fig.add_axes([(x + lm) / W, bottom / H, hw / W, hh / H])
            vmax = max(1e-12, float(np.nanmax(m))) if m.size else 1.0
            vmin = min(0.0, float(np.nanmin(m))) if m.size else 0.0
            im = ax.imshow(m, cmap="Blues", vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
            ax.set_xticks(range(len(ops)))
            ax.set_xticklabels(ops, rotation=40, ha="right", fontsize=8)
            ax.set_yticks(range(m.shape[0]))
            ax.set_yticklabels(rows, fontsize=8)
            ax.set_title(str(key), fontsize=11, fontweight="bold")
            ax.tick_params(length=0)
            fs = 7 if len(ops) > 6 else 8
            for i in range(m.shape[0]):
                jbest = int(np.nanargmax(m[i])) if np.isfinite(m[i]).any() else -1
                for j in range(m.shape[1]):
                    v = m[i, j]
                    frac = (v - vmin) / (vmax - vmin) if vmax > vmin else 0.0
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=fs,
                            color="white" if frac > 0.6 else "#222222",
                            fontweight="bold" if j == jbest else "normal")
            cax = fig.add_axes([(x + lm + hw + 0.08) / W, bottom / H, 0.12 / W, hh / H])
            fig.colorbar(im, cax=cax).ax.tick_params(labelsize=7)
            x += w
        y_top -= row_h
    return _save(fig, path)


def alphas_image(alpha_probs: Mapping[str, Any], op_names_by_key: Mapping[str, Sequence[str]],
                 title: str | None = None, dpi: int = 80, **options) -> np.ndarray:
    """:func:`plot_alphas` (``options`` are its keywords) as an ``(H, W, 3)`` uint8 array (for
    TensorBoard images)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    plot_alphas(alpha_probs, op_names_by_key, buf, title=title, dpi=dpi, **options)
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))


def plot_alpha_evolution(alphas_log: str | os.PathLike, op_names_by_key: Mapping[str, Sequence[str]],
                         points_by_key: Mapping[str, Sequence[str]], path: str | os.PathLike,
                         dpi: int = 110) -> Path | None:
    """How the search decided: one panel per choice point, the probability of each op against
    the step, from ``alphas.jsonl`` (``{"step": s, group: [[p, ...] per choice point]}``).
    A collapse shows as the parameter-free ops' curves rising on every panel. Returns None when
    the log is missing or empty."""
    import json

    alphas_log = Path(alphas_log)
    if not alphas_log.is_file():
        return None
    rows = [json.loads(line) for line in alphas_log.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows:
        return None
    steps = np.array([r["step"] for r in rows])
    panels = [(g, i, name) for g in op_names_by_key if g in rows[0]
              for i, name in enumerate(points_by_key.get(g, range(len(rows[0][g]))))]
    ncols = min(7, len(panels))
    nrows = -(-len(panels) // ncols)
    w, h = 2.3 * ncols + 1.6, 1.9 * nrows + 0.6
    fig = _new_figure(w, h, dpi)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True)
    fig.subplots_adjust(left=0.7 / w, right=1 - 1.5 / w, bottom=0.55 / h, top=1 - 0.3 / h, hspace=0.35, wspace=0.08)
    cmap = matplotlib.colormaps["tab10"]
    handles = {}
    for ax, (g, i, name) in zip(axes.flat, panels):
        probs = np.array([r[g][i] for r in rows])
        for j, op in enumerate(op_names_by_key[g]):
            (line,) = ax.plot(steps, probs[:, j], color=cmap(j % 10), lw=1.3, marker="o" if len(steps) < 12 else None,
                              ms=3)
            handles.setdefault(op, line)
        ax.set_title(f"{g}: {name}" if len(op_names_by_key) > 1 else str(name), fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.set_ylim(0, 1)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("probability", fontsize=8)
    for ax in axes[-1, :]:
        ax.set_xlabel("step", fontsize=8)
    fig.legend(list(handles.values()), list(handles), loc="center right", fontsize=8, frameon=False)
    return _save(fig, path)


def plot_epoch_curves(metrics_path: str | os.PathLike, path: str | os.PathLike, dpi: int = 120) -> Path | None:
    """Per epoch of ``metrics.jsonl``: the dominant and smallest eigenvalue of the α-Hessian
    (when logged, ``--hessian-eigenvalue``) and the number of parameter-free ops in the derived
    architecture, with an early stop marked. Returns None when there is nothing to show."""
    import json

    rows, stop = [], None
    with open(metrics_path, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r.get("kind") == "epoch" and "param_free" in r:
                rows.append(r)
            elif r.get("kind") == "stop":
                stop = r
    if not rows:
        return None
    hess = "hessian_eig_max" in rows[0]
    fig = _new_figure(4.6 * (1 + hess), 3.2, dpi)
    fig.set_layout_engine("constrained")
    axes = fig.subplots(1, 1 + hess, squeeze=False)[0]
    ep = [r["epoch"] + 1 for r in rows]
    axes[0].plot(ep, [r["param_free"] for r in rows], marker="o", ms=3)
    axes[0].set(xlabel="epoch", ylabel="parameter-free ops chosen", title="derived architecture")
    if hess:
        axes[1].plot(ep, [r["hessian_eig_max"] for r in rows], marker="o", ms=3, label="λ_max")
        axes[1].plot(ep, [r["hessian_eig_min"] for r in rows], marker="o", ms=3, label="λ_min")
        axes[1].set(xlabel="epoch", ylabel="eigenvalue of ∇²_α L_val", title="curvature in α (RobustDARTS)")
        axes[1].legend(fontsize=8)
    from matplotlib.ticker import MaxNLocator
    axes[0].yaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if stop is not None:
            ax.axvline(stop["epoch"] + 1, color="#c0392b", ls="--", lw=1)
    if stop is not None:
        fig.suptitle(f"stopped at epoch {stop['epoch'] + 1} ({stop['rule']}); kept epoch {stop['keep_epoch'] + 1}",
                     fontsize=9)
    return _save(fig, path)


def plot_hyperparams(metrics_path: str | os.PathLike, path: str | os.PathLike, tuned: Sequence[str] = (),
                     dpi: int = 130) -> Path | None:
    """Trajectories of the weight optimizer's learning rate and weight decay over the logged
    steps of ``metrics.jsonl`` (log scale), one panel each; a tuned one says so in its title.
    Returns None when the log has no step records."""
    import json

    rows = []
    with open(metrics_path, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r.get("kind") == "step" and "lr" in r:
                rows.append(r)
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    panels = [("lr", "learning rate", "lr"), ("weight_decay", "weight decay", "wd")]
    fig = _new_figure(4.2 * len(panels), 3.2, dpi)
    for i, (key, label, short) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        values = [r.get(key, float("nan")) for r in rows]
        ax.plot(steps, values, color="#1f77b4" if short in tuned else "#7f7f7f", lw=1.6)
        if all(v > 0 for v in values):
            ax.set_yscale("log")
        ax.set_xlabel("search step")
        ax.set_title(f"{label} ({'tuned' if short in tuned else 'fixed'})", fontsize=10)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)
