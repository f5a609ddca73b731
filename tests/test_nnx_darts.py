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


@pytest.mark.slow  # 75 s on 2 cores: compiling both supernets' forward and α-gradient
def test_nnx_darts_equals_the_built_in_space():
    """Given the built-in ``darts`` space's weights (one normal and two reduction cells, the
    second after a reduction: every kind of preprocessing and stride), the NNX model gives the
    same logits and α-gradient for both cells' α, the same BatchNorm statistics and the same
    inference output (measured: logits equal to the bit, gradients to 7e-6 of 30)."""
    from dnas.relaxations import dense_mix
    from dnas.supernet.layers import Ctx
    from dnas.supernet.spaces import build_space
    from examples.nnx_darts import load_builtin_weights

    builtin = build_space("darts", channels=4, layers=3, in_channels=1, num_classes=10, unroll=True)
    params, state = builtin.init(jax.random.PRNGKey(0))
    model = tiny(nnx.Rngs(1))
    load_builtin_weights(model, params, builtin.runs)
    space = NNXSpace(model)
    nparams, nstats = space.init(jax.random.PRNGKey(2))
    rng = np.random.default_rng(3)
    w = {k: jnp.asarray(rng.dirichlet(np.ones(8), size=14), jnp.float32) for k in ("normal", "reduce")}
    x = jnp.asarray(rng.standard_normal((16, 8, 8, 1)), jnp.float32)
    r = jnp.asarray(rng.standard_normal((16, 10)), jnp.float32)

    def per_label(w):
        return {f"{k}/{edge_label(s, d)}": w[k][e][None] for k in w for e, (s, d) in enumerate(DARTS_EDGES)}

    def builtin_loss(w):
        logits, st = builtin.apply(params, state, x, w, dense_mix, Ctx(train=True))
        return jnp.sum(logits * r), (logits, st)

    def nnx_loss(w):
        logits, st = space.apply(nparams, nstats, x, per_label(w), dense_mix, Ctx(train=True))
        return jnp.sum(logits * r), (logits, st)

    (_, (want, want_state)), want_grad = jax.jit(jax.value_and_grad(builtin_loss, has_aux=True))(w)
    (_, (got, got_stats)), got_grad = jax.jit(jax.value_and_grad(nnx_loss, has_aux=True))(w)
    got_stats = space.unstacked(nparams, got_stats)[1]   # keyed as the model's layers
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
    for k in w:
        np.testing.assert_allclose(got_grad[k], want_grad[k], rtol=2e-3, atol=2e-4)
        assert float(jnp.abs(want_grad[k]).max()) > 1e-2
    n = 16 * 8 * 8
    np.testing.assert_allclose(got_stats["stem_bn"]["mean"], want_state["stem"][1]["mean"], rtol=1e-4, atol=1e-6)
    # PyTorch's running variance is unbiased: 0.9 + 0.1 * var * n / (n - 1); Flax's biased
    np.testing.assert_allclose(got_stats["stem_bn"]["var"] - 0.9,
                               (want_state["stem"][1]["var"] - 0.9) * (n - 1) / n, rtol=1e-4, atol=1e-6)
    # the last cell's (a reduction after a reduction) factorized-reduce preprocessing
    np.testing.assert_allclose(got_stats["cells"][2]["pre0"]["bn"]["mean"], want_state["cells2"]["pre0"]["mean"][0],
                               rtol=1e-4, atol=1e-6)
    # inference: BatchNorm on running statistics (the initial ones on both)
    np.testing.assert_allclose(space.apply(nparams, nstats, x, per_label(w), dense_mix, Ctx(train=False))[0],
                               builtin.apply(params, state, x, w, dense_mix, Ctx(train=False))[0], rtol=2e-4, atol=2e-5)
