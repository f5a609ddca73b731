"""The DARTS cell space as a user's NNX model (examples/nnx_darts.py): its cells' edges are
choice points marked with their node, so a search derives DARTS cells, two edges per node.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import pytest

import dnas
from dnas.supernet.genotype import DARTS_EDGES, DARTS_OPS, derive_darts, edge_label
from dnas.supernet.nnx_space import NNXSpace
from examples.nnx_darts import DartsNet


def tiny(rngs):
    return DartsNet(rngs, channels=4, layers=3, in_channels=1, num_classes=10)


@pytest.mark.slow  # 130 s on 2 cores: compiling the unrolled DARTS supernet's search step
def test_nnx_darts_search_derives_darts_cells_and_fixes_them(tmp_path):
    """A short search writes a genotype of 28 edge labels in which every node keeps two
    edges, the one DARTS's derivation (``derive_darts``) gives from the run's own α; the fixed
    network runs and holds no weights on dropped edges; ``genotype.png`` draws the two cells."""
    result = dnas.search(tiny, "digits", relaxation="darts", epochs=1, max_steps=2, batch_size=16,
                         out=str(tmp_path / "run"), progress=False)
    g = result.genotype
    assert len(g.choices) == 28 and set(g.choices.values()) <= set(DARTS_OPS)
    probs = {k: np.concatenate([np.asarray(result.searcher.probs(result.state)[f"{k}/{edge_label(s, d)}"])
                                for s, d in DARTS_EDGES]) for k in ("normal", "reduce")}
    want = derive_darts(probs["normal"], probs["reduce"])
    assert g.choices == {label: want[label] for label in g.choices}
    for kind in ("normal", "reduce"):
        for d in range(2, 6):
            assert sum(g[f"{kind}/{edge_label(s, d)}"] != "none" for s in range(d)) == 2
    assert (tmp_path / "run" / "genotype.png").stat().st_size > 5000

    _check_fixed(tiny(nnx.Rngs(1)), g)


def _check_fixed(model, g) -> None:
    """``dnas.fix(model, g)`` runs, holds a fraction of the supernet's weights and none on
    dropped edges."""
    kinds = [cell.edges[0].label.split("/")[0] for cell in model.cells]
    fixed = dnas.fix(model, g)
    n_fixed = sum(np.size(a) for a in jax.tree_util.tree_leaves(nnx.state(fixed, nnx.Param)))
    n_super = sum(np.size(a) for a in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))
    assert 0 < n_fixed < n_super / 3
    for kind, cell in zip(kinds, fixed.cells):
        for e, (s, d) in enumerate(DARTS_EDGES):
            if g[f"{kind}/{edge_label(s, d)}"] == "none":
                assert not jax.tree_util.tree_leaves(nnx.state(cell.edges[e], nnx.Param))
    assert fixed(jnp.ones((2, 8, 8, 1))).shape == (2, 10)


def test_nnx_darts_derives_and_fixes_darts_cells():
    """Without a search (the search itself: the slow test above): from random α the model's
    derivation is DARTS's, and the fixed network keeps only the chosen edges' weights."""
    space = NNXSpace(tiny)
    rng = np.random.default_rng(0)
    raw = {k: rng.dirichlet(np.ones(8), 14) for k in ("normal", "reduce")}
    g = space.derive({f"{k}/{edge_label(s, d)}": raw[k][e][None] for k in raw for e, (s, d) in enumerate(DARTS_EDGES)})
    want = derive_darts(raw["normal"], raw["reduce"])
    assert g.choices == {label: want[label] for label in g.choices}
    _check_fixed(tiny(nnx.Rngs(1)), g)
