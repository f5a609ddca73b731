"""NAS-Bench-201 declared with ``dnas.nnx``'s primitives, as a user would write it, computes
what the built-in space computes.

The built-in ``nb201`` space (dnas/supernet/nb201.py) is one ``SearchSpace`` module with stacked
cells and the XLA:CPU kernels. examples/nnx_nb201.py is the same supernet as an ordinary Flax
NNX model: 15 cells (here 3) whose six edges are ``Choice`` points sharing the labels ``"0->1"`` ... ``"2->3"``,
so that all cells are one architecture decision, as in the benchmark. Given the built-in
space's weights, the two give the same logits, the same gradient of the loss with respect to
the architecture weights, and the same BatchNorm statistics (the built-in keeps PyTorch's
unbiased running variance, Flax the biased one; the test converts). The NNX declaration is
therefore a description of the built-in space in the user's primitives; the built-in module is
its fast implementation.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dnas.relaxations import dense_mix
from dnas.relaxations.pc_darts import partial_mix
from dnas.supernet.genotype import NB201_EDGES, NB201_OPS, edge_label
from dnas.supernet.layers import Ctx
from dnas.supernet.nnx_space import NNXSpace
from dnas.supernet.spaces import build_space
from examples.nnx_nb201 import NB201, load_builtin_weights

C, N, SIDE = 4, 1, 8


# PC-DARTS and the scanned cells: pytest -m slow (17-32 s each on 2 cores); the default run checks
# the mechanisms on small models (test_nnx.py::test_pc_darts_partial_channels_on_a_user_model,
# test_nnx_kernels.py::test_scanned_cells_take_the_policys_loop_convolutions)
@pytest.mark.parametrize("k, scan, cells", [(1, False, N), pytest.param(2, False, N, marks=pytest.mark.slow),
                                            pytest.param(1, True, 2, marks=pytest.mark.slow)],
                         ids=["darts", "pc_darts-k2", "scanned-cells"])
def test_nb201_declared_with_nnx_choices_equals_the_built_in_space(k, scan, cells):
    """``k=2``: PC-DARTS's partial channels (the candidates built for half the channels, the
    other half bypassing them, then shuffled) on both, by the relaxation's own ``mix``.
    ``scan``: each stage's cells are one ``Cell`` with stacked weights under ``nnx.scan``."""
    builtin = build_space("nb201", channels=C, cells_per_stage=cells, in_channels=1, num_classes=10,
                          partial_channels=k)
    params, state = builtin.init(jax.random.PRNGKey(0))
    model = NB201(nnx.Rngs(1), c=C, n=cells, in_channels=1, partial_channels=k, scan_cells=scan)
    load_builtin_weights(model, params)
    mix = dense_mix if k == 1 else partial_mix(k)
    space = NNXSpace(model)
    labels = [edge_label(s, d) for s, d in NB201_EDGES]
    assert space.groups == {label: (1, 5) for label in labels}      # 6 decisions, shared by all cells
    nparams, nstats = space.init(jax.random.PRNGKey(2))

    rng = np.random.default_rng(3)
    w = jnp.asarray(rng.dirichlet(np.ones(5), size=6), jnp.float32)   # α's softmax, one row per edge
    x = jnp.asarray(rng.standard_normal((16, SIDE, SIDE, 1)), jnp.float32)
    r = jnp.asarray(rng.standard_normal((16, 10)), jnp.float32)
    ctx = Ctx(train=True)

    def builtin_loss(w):
        logits, new_state = builtin.apply(params, state, x, {"cell": w}, mix, ctx)
        return jnp.sum(logits * r), (logits, new_state)

    def nnx_loss(w):
        logits, new_stats = space.apply(nparams, nstats, x, {lab: w[e][None] for e, lab in enumerate(labels)},
                                        mix, ctx)
        return jnp.sum(logits * r), (logits, new_stats)

    (_, (want, want_state)), want_grad = jax.jit(jax.value_and_grad(builtin_loss, has_aux=True))(w)
    (_, (got, got_stats)), got_grad = jax.jit(jax.value_and_grad(nnx_loss, has_aux=True))(w)
    got_stats = space.unstacked(nparams, got_stats)[1]   # keyed as the model's layers
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(got_grad, want_grad, rtol=2e-3, atol=2e-4)   # ∂loss/∂(α's weights), 6 x 5
    assert float(jnp.abs(want_grad).max()) > 1e-2    # a gradient that says something
    # inference (BatchNorm's running statistics), after the training step's statistics
    eval_w = {lab: w[e][None] for e, lab in enumerate(labels)}
    np.testing.assert_allclose(space.apply(nparams, nstats, x, eval_w, mix, Ctx(train=False))[0],
                               builtin.apply(params, state, x, {"cell": w}, mix, Ctx(train=False))[0],
                               rtol=2e-4, atol=2e-5)
    n = 16 * SIDE * SIDE   # the stem's BatchNorm sees the whole batch at full resolution
    np.testing.assert_allclose(got_stats["stem_bn"]["mean"], want_state["stem"][1]["mean"], rtol=1e-4, atol=1e-6)
    # PyTorch's running variance is unbiased: 0.9 + 0.1 * var * n / (n - 1); Flax's biased
    np.testing.assert_allclose(got_stats["stem_bn"]["var"] - 0.9,
                               (want_state["stem"][1]["var"] - 0.9) * (n - 1) / n, rtol=1e-4, atol=1e-6)
    # every cell's 3x3 convolution on edge 0->1 (the built-in's stacked leaves' [cell, edge 0])
    conv3 = NB201_OPS.index("nor_conv_3x3")
    stage0 = got_stats["stages"][0]
    got_mean = (stage0["edges"][0]["candidates"][conv3]["bn"]["mean"] if scan else
                np.stack([stage0[i]["edges"][0]["candidates"][conv3]["bn"]["mean"] for i in range(cells)]))
    np.testing.assert_allclose(got_mean, want_state["stage0"][conv3][2]["mean"][:, 0], rtol=1e-4, atol=1e-6)


def test_pc_darts_weighs_the_nnx_cells_edges_as_the_built_in_space():
    """PC-DARTS's edge normalisation (β softmaxed over the edges entering a node) gives the NNX
    model's six edge labels, marked with their nodes, the built-in ``nb201`` space's mixing
    weights for the same α and β; without the marks every edge would weigh 1."""
    from dnas.relaxations import get_relaxation
    builtin = build_space("nb201", channels=C, cells_per_stage=N, in_channels=1, num_classes=10)
    space = NNXSpace(NB201(nnx.Rngs(0), c=C, n=N, in_channels=1))
    labels = [edge_label(s, d) for s, d in NB201_EDGES]
    rng = np.random.default_rng(0)
    alpha, beta = rng.standard_normal((6, 5)), 2.0 * rng.standard_normal(6)
    want = get_relaxation("pc_darts", space=builtin).sample(
        {"alpha": {"cell": jnp.asarray(alpha, jnp.float32)}, "beta": {"cell": jnp.asarray(beta, jnp.float32)}},
        None, 0.0)["cell"]
    got = get_relaxation("pc_darts", space=space).sample(
        {"alpha": {lab: jnp.asarray(alpha[e][None], jnp.float32) for e, lab in enumerate(labels)},
         "beta": {lab: jnp.asarray(beta[e:e + 1], jnp.float32) for e, lab in enumerate(labels)}}, None, 0.0)
    np.testing.assert_allclose(np.concatenate([got[lab] for lab in labels]), want, rtol=1e-6)
    p = np.exp(alpha) / np.exp(alpha).sum(1, keepdims=True)
    assert not np.allclose(want, p, atol=1e-2)   # the edge weights are not all 1 (node 1 has one edge)
    np.testing.assert_allclose(want[0], p[0], rtol=1e-6)
