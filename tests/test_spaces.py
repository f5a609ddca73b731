"""Supernets of the NAS-Bench-201 and DARTS spaces: structure, equivalences, derivation."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dnas.relaxations import get_relaxation
from dnas.supernet.genotype import DARTS_OPS, NB201_OPS, DartsGenotype, NB201Genotype
from dnas.supernet.context import Ctx
from dnas.supernet.spaces import UnknownSpaceError, build_space

DARTS = get_relaxation("darts")


def _x(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def _logits_and_grads(space, x, arch_seed=1):
    params, state = space.init(jax.random.PRNGKey(0))
    arch = DARTS.init(jax.random.PRNGKey(arch_seed), space.groups)
    arch = jax.tree_util.tree_map(lambda a: a * 300.0, arch)  # far from uniform

    def loss(params, arch):
        logits, new_state = space.apply(params, state, x, DARTS.sample(arch, None, 0.0), DARTS.mix, Ctx())
        return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[:, 0]), (logits, new_state)

    (l, (logits, new_state)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, arch)
    return logits, new_state, grads, params


@pytest.mark.parametrize("name,opts,groups", [
    ("nb201", dict(channels=4, cells_per_stage=2, num_classes=7, in_channels=1), {"cell": (6, 5)}),
    pytest.param("darts", dict(channels=4, layers=3, num_classes=7, in_channels=1),
                 {"normal": (14, 8), "reduce": (14, 8)}, marks=pytest.mark.slow),  # ~75 s of compiling
])
def test_supernet_shapes_and_unroll_equivalence(name, opts, groups):
    """Logits, BN statistics and gradients are the same whether the loops over edges and cells
    are unrolled in Python or run by ``lax.scan``."""
    x = _x((3, 8, 8, 1))
    a = build_space(name, unroll=True, **opts)
    b = build_space(name, unroll=False, **opts)
    assert a.groups == groups
    la, sa, ga, params = _logits_and_grads(a, x)
    lb, sb, gb, _ = _logits_and_grads(b, x)
    assert la.shape == (3, 7)
    np.testing.assert_allclose(np.asarray(la), np.asarray(lb), rtol=1e-4, atol=1e-5)
    ua, ub = (sa, ga), (sb, gb)
    if hasattr(a, "unrolled"):   # NB201: the scanned cells' weights are stacked; compare cell by cell
        ua, ub = (a.unrolled(ga[0], sa), ga[1]), (b.unrolled(gb[0], sb), gb[1])
    for u, v in zip(jax.tree_util.tree_leaves(ua), jax.tree_util.tree_leaves(ub)):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=2e-3, atol=1e-5)
    # every architecture parameter receives a gradient, and so does every weight that is used
    for g in ga[1].values():
        assert np.all(np.abs(np.asarray(g)).sum(-1) > 0)
    assert jax.tree_util.tree_structure(ga[0]) == jax.tree_util.tree_structure(params)


def test_darts_reduction_cells_and_channels():
    from dnas.supernet.darts import darts_plan

    from flax import nnx

    from dnas.supernet.darts import DartsConfig, DartsNet

    # built eagerly: under nnx.eval_shape every random-stream update of the construction costs
    # time proportional to the trace so far (about a minute here, against seconds)
    model = DartsNet(nnx.Rngs(0), DartsConfig(channels=4, layers=8))
    assert [i for i, c in enumerate(model.cells) if c.reduction] == [2, 5]
    assert [p.c for p in darts_plan(4, 8, 3)] == [4, 4, 8, 8, 8, 16, 16, 16]
    # a cell's edges at its width (a quarter of the 1x1 preprocessing's output), stride 2 from
    # the inputs of a reduction cell
    sep = [c.edges[0].candidates[4].a.dw.kernel.shape[-1] for c in model.cells]
    assert sep == [4, 4, 8, 8, 8, 16, 16, 16]
    assert model.cells[2].edges[0].candidates[4].a.dw.strides in (2, (2, 2))
    assert model.cells[2].edges[13].candidates[4].a.dw.strides in (1, (1, 1))


def test_nb201_derive_from_hand_set_alpha():
    space = build_space("nb201", channels=4, cells_per_stage=1)
    choice = ["nor_conv_3x3", "avg_pool_3x3", "skip_connect", "nor_conv_1x1", "none", "nor_conv_3x3"]
    alpha = np.zeros((6, 5), np.float32)
    for e, op in enumerate(choice):
        alpha[e, NB201_OPS.index(op)] = 2.0
    g = space.derive(DARTS.derive_scores({"cell": jnp.asarray(alpha)}))
    assert isinstance(g, NB201Genotype)
    assert g.arch == ("|nor_conv_3x3~0|+|avg_pool_3x3~0|skip_connect~1|+"
                      "|nor_conv_1x1~0|none~1|nor_conv_3x3~2|")
    assert space.choice_point_names("cell") == ["0->1", "0->2", "1->2", "0->3", "1->3", "2->3"]


def test_darts_derive_from_hand_set_alpha_excludes_none():
    """Each node keeps its two strongest incoming edges ranked by their best non-``none`` op."""
    space = build_space("darts", channels=4, layers=3)
    normal = np.zeros((14, 8), np.float32)
    normal[:, DARTS_OPS.index("none")] = 5.0          # 'none' dominates everywhere and is ignored
    picks = {0: "sep_conv_3x3", 1: "sep_conv_5x5",           # node 0: edges 0, 1
             3: "dil_conv_3x3", 4: "skip_connect",           # node 1: edges 2(weak), 3, 4
             5: "max_pool_3x3", 8: "avg_pool_3x3",           # node 2: edges 5..8
             9: "dil_conv_5x5", 13: "sep_conv_3x3"}          # node 3: edges 9..13
    for e, op in picks.items():
        normal[e, DARTS_OPS.index(op)] = 3.0
    normal[2, DARTS_OPS.index("sep_conv_3x3")] = 1.0
    reduce = np.zeros((14, 8), np.float32)
    reduce[:, DARTS_OPS.index("max_pool_3x3")] = 1.0
    g = space.derive({"normal": jax.nn.softmax(jnp.asarray(normal)), "reduce": jax.nn.softmax(jnp.asarray(reduce))})
    assert isinstance(g, DartsGenotype)
    assert list(g.normal) == [("sep_conv_3x3", 0), ("sep_conv_5x5", 1), ("dil_conv_3x3", 1), ("skip_connect", 2),
                              ("max_pool_3x3", 0), ("avg_pool_3x3", 3), ("dil_conv_5x5", 0), ("sep_conv_3x3", 4)]
    assert list(g.normal_concat) == [2, 3, 4, 5]
    assert all(op == "max_pool_3x3" for op, _ in g.reduce)


def test_unknown_space_and_option():
    with pytest.raises(UnknownSpaceError, match="'resnet'.*darts.*nb201"):
        build_space("resnet")
    with pytest.raises(ValueError, match="no option.*'depth'"):
        build_space("nb201", depth=3)
