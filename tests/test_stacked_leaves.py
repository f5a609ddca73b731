"""Same-shaped leaves stacked (dnas.supernet.stacked_leaves): the layout an NNX model's weights
and statistics are searched in. Checked: the round trip, the grouping, the derivative through
the split, and a search step in the stacked layout against the model's own layout."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dnas.searcher import make_searcher
from dnas.supernet.nnx_space import NNXSpace
from dnas.supernet.stacked_leaves import StackedLeaves
from test_nnx import Net, _x


def _tree(seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    return {"conv": {"kernel": f(3, 3, 2, 2), "bias": f(2)}, "bn": {"scale": f(2), "bias": f(2)},
            "blocks": [{"kernel": f(3, 3, 2, 2)}, {"kernel": f(1, 1, 2, 4)}], "steps": jnp.arange(2, dtype=jnp.int32)}


def test_round_trip_groups_by_dtype_and_shape():
    tree = _tree()
    layout = StackedLeaves(tree)
    stacked = layout.stack(tree)
    assert {k: v.shape for k, v in stacked.items()} == {
        "float32[2]": (3, 2), "float32[3,3,2,2]": (2, 3, 3, 2, 2), "float32[1,1,2,4]": (1, 1, 1, 2, 4),
        "int32[2]": (1, 2)}
    assert stacked["int32[2]"].dtype == jnp.int32
    back = layout.unstack(stacked)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(tree)
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(tree)):
        np.testing.assert_array_equal(a, b)
    # outside a trace the arrays are split and stacked on the host: the same arrays as traced
    for a, b in zip(jax.tree_util.tree_leaves(jax.jit(layout.unstack)(stacked)), jax.tree_util.tree_leaves(back)):
        assert a.dtype == b.dtype and isinstance(b, jax.Array)
        np.testing.assert_array_equal(a, b)
    for name, group in jax.jit(layout.stack)(tree).items():
        assert group.dtype == stacked[name].dtype and isinstance(stacked[name], jax.Array)
        np.testing.assert_array_equal(group, stacked[name])
    # another tree of the same structure keeps the first one's layout
    other = _tree(1)
    np.testing.assert_array_equal(layout.stack(other)["float32[3,3,2,2]"][1], other["conv"]["kernel"])
    assert [layout.leaf_path("float32[3,3,2,2]", i) for i in (0, 1)] == ["blocks/0/kernel", "conv/kernel"]


def test_derivative_through_the_split_is_each_leafs_gradient_stacked():
    """d/dS f(unstack(S)) is stack(∇f) (one concatenation, not a sum of padded slices)."""
    tree, coef = _tree(), _tree(2)
    layout = StackedLeaves(tree)

    def f(stacked):
        leaves = jax.tree_util.tree_leaves(layout.unstack(stacked))
        cs = jax.tree_util.tree_leaves(coef)
        return sum(jnp.sum(jnp.sin(a.astype(jnp.float32)) * c) for a, c in zip(leaves, cs) if a.dtype == jnp.float32)

    floats = {k: v for k, v in layout.stack(tree).items() if k.startswith("float32")}
    ints = {k: v for k, v in layout.stack(tree).items() if not k.startswith("float32")}
    got = jax.grad(lambda s: f({**s, **ints}))(floats)
    want = layout.stack(jax.tree_util.tree_map(lambda a, c: jnp.cos(a) * c if a.dtype == jnp.float32 else a, tree, coef))
    for k in floats:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6)
    hlo = jax.jit(jax.grad(lambda s: f({**s, **ints}))).lower(floats).as_text()
    assert "concatenate" in hlo and " pad(" not in hlo


def test_search_steps_in_the_stacked_layout_equal_the_models_own():
    """Two first-order DARTS steps (SGD with momentum, decay and global-norm clipping on the
    weights, Adam on α) give the same weights, statistics and α whether the weights are stacked
    or kept per layer; the stacked step's state has one array per dtype and shape."""
    x, y = _x(16, seed=4), jnp.arange(16) % 10
    states = []
    for stack in (True, False):
        s = make_searcher(NNXSpace(Net(nnx.Rngs(0)), stack_leaves=stack), "darts", total_steps=4)
        state = s.init(jax.random.PRNGKey(0))
        for i in range(2):
            state, _ = s.step(state, (x, y), (x[::-1], y[::-1]))
        states.append((s, state))
    (stacked_s, stacked), (own_s, own) = states
    per_leaf = jax.tree_util.tree_leaves(own.params)
    assert len(jax.tree_util.tree_leaves(stacked.params)) == len({(a.shape, a.dtype) for a in per_leaf}) < len(per_leaf)
    got = stacked_s.space.unstacked(stacked.params, stacked.batch_stats)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure((own.params, own.batch_stats))
    moved = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))), own.params,
                                   own_s.space.init(jax.random.PRNGKey(0))[0])
    assert max(jax.tree_util.tree_leaves(moved)) > 1e-3    # the steps changed the weights
    for a, b in zip(jax.tree_util.tree_leaves((got, stacked.arch)), jax.tree_util.tree_leaves(((own.params, own.batch_stats), own.arch))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_diverged_stacked_leaf_is_named_with_its_entry():
    from dnas.rundir import first_nonfinite
    tree = _tree()
    tree["conv"]["kernel"] = tree["conv"]["kernel"].at[1, 2, 0, 1].set(jnp.nan)
    layout = StackedLeaves(tree)
    assert first_nonfinite({"params": layout.stack(tree)}) == "params/float32[3,3,2,2] entry 1"
    assert first_nonfinite({"params": tree}) == "params/conv/kernel"     # a layer of its own: its path


def test_retraining_steps_in_the_stacked_layout_equal_the_models_own():
    """``dnas train``'s network of a user model (NNXSpace.network) trains in the search's layout:
    two SGD steps give the weights and statistics of the model's own layout."""
    from dnas.supernet.genotype import ChoiceGenotype
    from dnas.supernet.space_base import GENERIC_TRAIN_PROTOCOL
    from dnas.train import Trainer
    g = ChoiceGenotype({"op": "conv5", "act": "tanh", "merge": (0, 2)}, "Net")
    x, y = _x(16, seed=6), jnp.arange(16) % 10
    out = []
    for stack in (True, False):
        net = NNXSpace(lambda rngs: Net(rngs), stack_leaves=stack).network(g, num_classes=10)
        trainer = Trainer(net, GENERIC_TRAIN_PROTOCOL, total_steps=10)
        state = trainer.init(jax.random.PRNGKey(0))
        step = jax.jit(trainer.step)
        for _ in range(2):
            state, _ = step(state, x, y, 0.0)
        out.append(state)
    stacked, own = out
    assert len(jax.tree_util.tree_leaves(stacked.params)) < len(jax.tree_util.tree_leaves(own.params))
    layout_p, layout_s = StackedLeaves(own.params), StackedLeaves(own.batch_stats)
    got = (layout_p.unstack(stacked.params), layout_s.unstack(stacked.batch_stats))
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves((own.params, own.batch_stats))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_checkpoint_of_the_per_layer_layout_is_refused_by_name(tmp_path):
    """A checkpoint written with an NNX model's weights per layer (an older dnas) does not
    restore into the stacked layout's state: the error says so and names an array of each."""
    import pytest

    from dnas.rundir import CheckpointError, restore_latest, save_checkpoint
    own = make_searcher(NNXSpace(Net(nnx.Rngs(0)), stack_leaves=False), "darts")
    save_checkpoint(tmp_path / "checkpoints", own.init(jax.random.PRNGKey(0)), 1)
    stacked = make_searcher(NNXSpace(Net(nnx.Rngs(0))), "darts")
    template = stacked.init(jax.random.PRNGKey(0))
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match=r"other weights than this run's .*it has "
                                                                        r"'batch_stats/bn/mean'.*NNX model's per-layer arrays"):
        restore_latest(tmp_path / "checkpoints", template)
    assert restore_latest(tmp_path / "checkpoints", own.init(jax.random.PRNGKey(1)))[2] == 1


def test_an_order_keeps_each_class_adjacent_and_the_stacking_of_a_class_folds_into_one_slice():
    """With ``order``, a group holds its leaves class by class; stacking a class's leaves after
    ``unstack`` (what an edge loop does) then compiles to one slice of the group's array,
    forward and backward, where the template's interleaved order leaves a slice per copy."""
    rng = np.random.default_rng(0)
    tree = {"edges": [{"a": jnp.asarray(rng.standard_normal((2, 3)), jnp.float32),
                       "b": jnp.asarray(rng.standard_normal((2, 3)), jnp.float32)} for _ in range(6)]}
    slices = {}
    for name, order in (("template", None), ("classes", lambda path: path.split("/")[-1])):
        layout = StackedLeaves(tree, order)
        want = ["edges/0/a", "edges/1/a", "edges/2/a"] if order else ["edges/0/a", "edges/0/b", "edges/1/a"]
        assert [layout.leaf_path("float32[2,3]", i) for i in range(3)] == want
        back = layout.unstack(layout.stack(tree))
        for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(tree)):
            np.testing.assert_array_equal(a, b)

        def loss(stacked, layout=layout):
            edges = layout.unstack(stacked)["edges"]
            return jnp.sum(jnp.sin(jnp.stack([e["a"] for e in edges])) * jnp.arange(6.0)[:, None, None])
        hlo = jax.jit(jax.grad(loss)).lower(layout.stack(tree)).compile().as_text()
        slices[name] = hlo.count(" slice(")
    assert slices["classes"] <= 1 < 6 <= slices["template"], slices


def test_a_looped_cells_copies_of_each_weight_are_adjacent_in_edge_order():
    """The DARTS space's stacked weights and statistics: for every weight of an edge's
    candidates, its copies over the edges one loop runs (a normal cell's 14; a reduction cell's
    8 from the inputs, then its 6 others) are consecutive entries of one group, in the loop's
    order."""
    from dnas.supernet.darts import _FROM_INPUTS, _INNER
    from dnas.supernet.spaces import build_space
    space = build_space("darts", channels=4, layers=3, unroll=False)
    for layout in space._layout.layouts:
        where = {layout.paths[i]: (name, k) for name, idx in layout.groups.items() for k, i in enumerate(idx)}
        for c, cell in enumerate(space.module(*space.init(jax.random.PRNGKey(0))).cells):
            loops = [_FROM_INPUTS, _INNER] if cell.reduction else [list(range(14))]
            prefix = f"cells/{c}/edges/"
            for edges in loops:
                first = f"{prefix}{edges[0]}/candidates/"
                inside = sorted({p[len(first):] for p in where if p.startswith(first)})
                assert inside
                for rel in inside:
                    spots = [where[f"{prefix}{e}/candidates/{rel}"] for e in edges]
                    assert len({g for g, _ in spots}) == 1
                    assert [k for _, k in spots] == list(range(spots[0][1], spots[0][1] + len(edges))), (c, rel)


def test_a_checkpoint_of_another_order_of_the_same_arrays_is_refused(tmp_path):
    """Two orders of one model's weights have the same group names and shapes, which is all a
    restore can compare: the checkpoint's recorded layout fingerprint tells them apart, and a
    checkpoint that records none (an older dnas's) is refused too, before any weight is used."""
    import pytest

    from dnas.rundir import LayoutError, restore_latest, save_checkpoint
    from dnas.supernet.stacked_leaves import WeightLayout
    space = NNXSpace(Net(nnx.Rngs(0)))
    params, stats = space.unstacked(*space.init(jax.random.PRNGKey(0)))
    classed, plain = space.layout_fingerprint(), WeightLayout(params, stats).fingerprint()
    reversed_order = WeightLayout(params, stats, order=lambda path: -len(path)).fingerprint()
    assert classed is not None and len({classed, reversed_order}) == 2
    assert WeightLayout(params, stats, stack=False).fingerprint() is None
    assert WeightLayout(_tree(1), {}).fingerprint() == WeightLayout(_tree(0), {}).fingerprint()   # not the values
    # Net's choice points hold one candidate structure each, so classing does not move a row
    assert plain == classed

    searcher = make_searcher(space, "darts")
    state = searcher.init(jax.random.PRNGKey(0))
    save_checkpoint(tmp_path / "ok", state, 1, layout=classed)
    assert restore_latest(tmp_path / "ok", state, layout=classed)[2] == 1
    with pytest.raises(LayoutError, match=rf"ok/1 stacks its weights in another order .*layout {classed}, this "
                                          rf"run's {reversed_order}"):
        restore_latest(tmp_path / "ok", state, layout=reversed_order)
    save_checkpoint(tmp_path / "old", state, 1)
    save_checkpoint(tmp_path / "old", state, 2)
    with pytest.raises(LayoutError, match=r"old/2 does not record the order of its stacked weights"):
        restore_latest(tmp_path / "old", state, layout=classed)   # refused at once, no fallback to step 1
    assert restore_latest(tmp_path / "old", state)[2] == 2         # a caller without a layout is not checked


def test_the_darts_spaces_looped_classes_give_another_fingerprint_than_its_model_order():
    """In the DARTS space the classes move rows (its edges' candidates repeat), so the
    fingerprint of its stacked layout differs from that of the model's own order: a checkpoint
    written with one would not restore into the other."""
    from dnas.supernet.spaces import build_space
    from dnas.supernet.stacked_leaves import WeightLayout
    space = build_space("darts", channels=4, layers=3, unroll=False)
    params, stats = space.unstacked(*space.init(jax.random.PRNGKey(0)))
    assert space.layout_fingerprint() != WeightLayout(params, stats).fingerprint()
