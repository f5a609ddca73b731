"""Derived (stand-alone) networks: published parameter counts, equality with the supernet at a
one-hot architecture, drop path, and errors naming the problem."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dnas.relaxations.base import dense_mix
from dnas.supernet.derived import build_network, count_params, drop_path
from dnas.supernet.genotype import (DARTS_EDGES, DARTS_OPS, DARTS_V2, NB201_OPS, ChainGenotype,
                                    DartsGenotype, GenotypeError, parse_nb201)
from dnas.supernet.context import Ctx
from dnas.supernet.spaces import build_space


def _n_params(net) -> int:
    shapes = net.init(jax.random.PRNGKey(0))[0]    # eagerly: seconds, where jax.eval_shape takes a quarter minute
    return count_params({k: v for k, v in shapes.items() if k != "aux"})


def test_parameter_counts_equal_the_published_ones():
    # NAS-Bench-201's largest CIFAR-10 network (every edge a 3x3 conv): 1.531546 MB of parameters
    all_conv = parse_nb201("|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+"
                           "|nor_conv_3x3~0|nor_conv_3x3~1|nor_conv_3x3~2|")
    assert _n_params(build_network(all_conv)) == 1_531_546
    # DARTS-V2 at C=36, 20 layers (the paper's CIFAR-10 network; DARTS's train.py logs
    # "param size = 3.349342MB", the auxiliary head excluded as there)
    assert _n_params(build_network(DARTS_V2, auxiliary=True)) == 3_349_342


def _onehot(ops, names):
    w = np.zeros((len(ops), len(names)), np.float32)
    for i, op in enumerate(ops):
        w[i, names.index(op)] = 1.0
    return jnp.asarray(w)


def test_nb201_network_equals_the_supernet_at_a_one_hot_architecture():
    """The derived NB201 network is dnas.fix of the supernet (affine cells): with the supernet's
    weights of the chosen ops it computes the one-hot supernet's logits, in training and in
    inference, and holds only the chosen convolutions' weights."""
    from flax import nnx

    from dnas.nnx import Zero, fix
    from dnas.supernet.stacked_leaves import WeightLayout

    g = parse_nb201("|nor_conv_3x3~0|+|none~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_1x1~1|nor_conv_3x3~2|")
    opts = dict(channels=4, cells_per_stage=2, num_classes=5, in_channels=3)
    space = build_space("nb201", affine=True, **opts)
    sp, ss = space.init(jax.random.PRNGKey(1))
    net = build_network(g, **opts)
    fixed = fix(space.module(sp, ss), g)
    assert isinstance(fixed.stages[1][0].edges[1], Zero)
    fp, fs = (nnx.to_pure_dict(s) for s in nnx.state(fixed, nnx.Param, nnx.BatchStat))
    dp, ds = WeightLayout(fp, fs, True).stacked(fp, fs)
    # the network's own weights have the fixed model's shapes: 3 convolutions per cell, 6 cells
    assert jax.tree_util.tree_map(jnp.shape, net.init(jax.random.PRNGKey(2))) == jax.tree_util.tree_map(
        jnp.shape, (dp, ds))
    paths = ["/".join(str(k.key) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(fp)[0]]
    assert sum(1 for p in paths if p.startswith("stages/") and p.endswith("/kernel")) == 3 * 6
    x = jax.random.normal(jax.random.PRNGKey(3), (6, 8, 8, 3))
    samples = {"cell": _onehot(g.ops, NB201_OPS)}
    for train in (True, False):
        ref, _ = space.apply(sp, ss, x, samples, dense_mix, Ctx(train=train))
        out = net.apply(dp, ds, x, Ctx(train=train))
        np.testing.assert_allclose(out.logits, ref, rtol=1e-5, atol=1e-5)
        assert out.aux_logits is None


def test_darts_network_equals_the_supernet_at_a_one_hot_architecture():
    """The derived DARTS network is dnas.fix of the model built for evaluation: with the
    supernet's weights of the chosen ops (affine cells) it computes the one-hot supernet's
    logits in training (inference: the reference test of the evaluation network), and holds
    only the chosen ops' weights (none on the 6 dropped edges of each cell)."""
    from flax import nnx

    from dnas.nnx import fix
    from dnas.supernet.darts import Zero
    from dnas.supernet.stacked_leaves import WeightLayout

    # pooling is plain pooling in the derived network but pooling + BN in the supernet, so the
    # chosen ops here are convolutions and skips (unchosen pools still run in the supernet)
    g = DartsGenotype(
        normal=[("sep_conv_3x3", 0), ("sep_conv_5x5", 1), ("skip_connect", 0), ("dil_conv_3x3", 2),
                ("sep_conv_3x3", 1), ("dil_conv_5x5", 3), ("skip_connect", 2), ("sep_conv_3x3", 4)],
        normal_concat=[2, 3, 4, 5],
        reduce=[("skip_connect", 0), ("sep_conv_3x3", 1), ("dil_conv_3x3", 2), ("skip_connect", 1),
                ("sep_conv_5x5", 0), ("skip_connect", 3), ("dil_conv_5x5", 4), ("sep_conv_3x3", 2)],
        reduce_concat=[2, 3, 4, 5])
    # normal, reduction, reduction after one; the supernet's edges looped (a shorter compile;
    # looped and unrolled compute the same, tests/test_space_reference.py)
    opts = dict(channels=4, layers=3, num_classes=5, in_channels=3)
    space = build_space("darts", affine=True, unroll=False, **opts)
    sp, ss = space.init(jax.random.PRNGKey(1))
    net = build_network(g, **opts)
    fixed = fix(space.module(sp, ss), g)
    assert sum(isinstance(e, Zero) for cell in fixed.cells for e in cell.edges) == 3 * (14 - 8)
    fp, fs = (nnx.to_pure_dict(s) for s in nnx.state(fixed, nnx.Param, nnx.BatchStat))
    dp, ds = WeightLayout(fp, fs, True).stacked(fp, fs)
    assert jax.tree_util.tree_map(jnp.shape, net.init(jax.random.PRNGKey(2))) == jax.tree_util.tree_map(
        jnp.shape, (dp, ds))
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 8, 8, 3))
    samples = {k: _onehot(_edge_ops(g, k), DARTS_OPS) for k in ("normal", "reduce")}
    ref, _ = jax.jit(lambda p, s, x: space.apply(p, s, x, samples, dense_mix, Ctx(train=True)))(sp, ss, x)
    out = jax.jit(lambda p, s, x: net.apply(p, s, x, Ctx(train=True)))(dp, ds, x)
    np.testing.assert_allclose(out.logits, ref, rtol=1e-4, atol=1e-5)


def test_darts_space_derives_by_darts_rule():
    """The space's derivation is DARTS's ``derive_darts`` on the same α (a node's pairs strongest
    first), and chooses what the choice points' own rule (each node's two strongest edges by
    their best op other than ``none``, ``Choice(keep=2)``) chooses."""
    from dnas.supernet.genotype import derive_darts
    from dnas.supernet.nnx_space import NNXSpace

    space = build_space("darts", channels=4, layers=3)
    rng = np.random.default_rng(0)
    for _ in range(5):
        raw = {k: rng.dirichlet(np.ones(8), 14) for k in ("normal", "reduce")}
        g = space.derive(raw)
        assert isinstance(g, DartsGenotype)
        assert g == derive_darts(raw["normal"], raw["reduce"])
        assert g.choices == NNXSpace.derive(space, raw).choices      # the choice points' keep=2 rule


def _edge_ops(g: DartsGenotype, kind: str) -> list[str]:
    """Per supernet edge the chosen op, ``none`` where the genotype keeps no op."""
    chosen = {(s, d): op for s, d, op in g.edges(kind)}
    return [chosen.get(edge, "none") for edge in DARTS_EDGES]


def test_chain_network_equals_the_supernet_and_skips_zero_blocks():
    """The derived chain is dnas.fix of the supernet: with the supernet's weights of the chosen
    ops it computes the one-hot supernet's logits, and a zero block holds no weights."""
    from flax import nnx

    from dnas.nnx import Zero, fix
    from dnas.supernet.chain import MBConv
    from dnas.supernet.stacked_leaves import WeightLayout

    # two stages of a block that changes the shape and one that keeps it (a residual connection)
    opts = dict(width_mult=0.25, stage_widths=(24, 48), stage_depths=(2, 2), stage_strides=(2, 1), stem_stride=1,
                last_channels=64, num_classes=5, in_channels=3)
    space = build_space("chain", **opts)
    assert [g for g, *_r in space.blocks] == ["reshape", "keep", "reshape", "keep"]
    ops = []
    for b, (group, *_rest) in enumerate(space.blocks):
        names = space.group_op_names(f"block{b}")
        ops.append("zero" if group == "keep" else names[b % len(names)])
    assert "zero" in ops
    g = ChainGenotype(tuple(ops))
    sp, ss = space.init(jax.random.PRNGKey(1))
    net = build_network(g, **opts)
    fixed = fix(space.module(sp, ss), g)
    for b, op in enumerate(ops):
        assert isinstance(fixed.blocks[b], Zero if op == "zero" else MBConv)
    fp, fs = (nnx.to_pure_dict(s) for s in nnx.state(fixed, nnx.Param, nnx.BatchStat))
    dp, ds = WeightLayout(fp, fs, True).stacked(fp, fs)
    # the network's own weights have the fixed model's shapes: the chosen MBConvs only
    assert jax.tree_util.tree_map(jnp.shape, net.init(jax.random.PRNGKey(2))) == jax.tree_util.tree_map(
        jnp.shape, (dp, ds))
    samples = {f"block{b}": _onehot([op], space.group_op_names(f"block{b}")) for b, op in enumerate(ops)}
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 8, 8, 3))
    ref, _ = jax.jit(lambda p, s, x: space.apply(p, s, x, samples, dense_mix, Ctx(train=True)))(sp, ss, x)
    out = jax.jit(lambda p, s, x: net.apply(p, s, x, Ctx(train=True)))(dp, ds, x)
    np.testing.assert_allclose(out.logits, ref, rtol=1e-5, atol=1e-5)


def test_drop_path_statistics():
    x = jnp.ones((40_000, 1, 1, 2))
    y = np.asarray(drop_path(x, jax.random.PRNGKey(0), 0.3))
    dropped = (y[:, 0, 0, 0] == 0)
    assert np.array_equal(dropped, y[:, 0, 0, 1] == 0)          # one decision per example
    assert abs(dropped.mean() - 0.3) < 4 * np.sqrt(0.3 * 0.7 / 40_000)
    np.testing.assert_allclose(y[~dropped], 1 / 0.7, rtol=1e-6)  # survivors rescaled: E[y] = x
    np.testing.assert_array_equal(drop_path(x, jax.random.PRNGKey(0), 0.0), x)


def test_drop_path_spares_identity_ops_and_the_auxiliary_head_runs_in_training_only():
    from dnas.supernet.derived import DropPath

    skips = [("skip_connect", i) for i in (0, 1, 0, 2, 1, 3, 2, 4)]
    all_skip = DartsGenotype(normal=skips, normal_concat=[2, 3, 4, 5], reduce=skips, reduce_concat=[2, 3, 4, 5])
    one_conv = DartsGenotype(normal=[("sep_conv_3x3", 0)] + skips[1:], normal_concat=[2, 3, 4, 5],
                             reduce=skips, reduce_concat=[2, 3, 4, 5])
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 8, 8, 3))
    drop = DropPath(jax.random.PRNGKey(2), 0.5)
    outs = {}
    for name, g in (("skip", all_skip), ("conv", one_conv)):
        net = build_network(g, channels=4, layers=2, num_classes=3, auxiliary=True, impl="dense")  # normal cells only
        p, s = net.init(jax.random.PRNGKey(0))
        with_drop = net.apply(p, s, x, Ctx(train=True), drop)
        outs[name] = (with_drop.logits, net.apply(p, s, x, Ctx(train=True)).logits)
        assert with_drop.aux_logits.shape == (8, 3)
        assert net.apply(p, s, x, Ctx(train=False)).aux_logits is None
    np.testing.assert_array_equal(*outs["skip"])          # identities are never dropped
    assert not np.allclose(*outs["conv"])                  # the convolution's path is


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="no option"):
        build_network(DARTS_V2, cells=3)
    with pytest.raises(GenotypeError, match="blocks"):
        build_network(ChainGenotype(("mb_k3_e3",) * 3), width_mult=0.25)
    space = build_space("chain", width_mult=0.25)
    bad = ["zero" if g == "reshape" else "mb_k3_e3" for g, *_ in space.blocks]
    with pytest.raises(GenotypeError, match="cannot be 'zero'"):
        build_network(ChainGenotype(tuple(bad)), width_mult=0.25)
    net = build_network(DARTS_V2, channels=4, layers=3, num_classes=3, auxiliary=True)
    p, s = net.init(jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="auxiliary head needs feature maps"):
        net.apply(p, s, jnp.zeros((2, 8, 8, 3)), Ctx(train=True))
