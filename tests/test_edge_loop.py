"""dnas.nnx.edge_loop: a cell's edges run as one lax.scan during a search compute what the same
edges compute one after another: logits, gradients with respect to α and the weights, and the
BatchNorm statistics written back to each edge, under DARTS's soft mixture, GDAS's sampled op
and PC-DARTS's edge weights. Outside a search the edges run in Python, so dnas.fix of a
looping model is the fixed model of the unrolled one."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dnas
from dnas.nnx import Choice, Identity, Zero, edge_loop, node_sum
from dnas.relaxations import dense_mix, get_relaxation
from dnas.supernet.context import Ctx
from dnas.supernet.nnx_space import NNXSpace
from tests.test_nnx import ConvBN

EDGES = [(0, 1), (0, 2), (1, 2), (0, 3), (1, 3), (2, 3)]   # a NAS-Bench-201-shaped cell


def _options(c, rngs, wide=False):
    return {"conv3": ConvBN(c, 5 if wide else 3, rngs), "conv1": ConvBN(c, 1, rngs), "skip": Identity(),
            "none": Zero()}


class LoopCell(nnx.Module):
    """Stem, one cell of six edges (each a choice among two conv-BN blocks, a skip and none;
    the node is marked for PC-DARTS), head. ``loop``: the edges through :func:`edge_loop`."""

    def __init__(self, rngs, c=4, loop=False):
        self.loop = loop
        self.stem = nnx.Conv(1, c, (3, 3), rngs=rngs)
        self.edges = nnx.List([Choice(_options(c, rngs), label=f"{s}->{d}", node=str(d), group="cell")
                               for s, d in EDGES])
        self.head = nnx.Linear(c, 10, rngs=rngs)

    def __call__(self, x):
        h = jnp.tanh(self.stem(x))
        if self.loop:
            buf = jnp.zeros((4,) + h.shape, h.dtype).at[0].set(h)
            out = edge_loop(list(self.edges), [s for s, _ in EDGES], [d for _, d in EDGES], buf)[3]
        else:
            nodes = [h]
            for d in (1, 2, 3):
                nodes.append(node_sum([self.edges[e](nodes[s]) for e, (s, dd) in enumerate(EDGES) if dd == d]))
            out = nodes[3]
        return self.head(out.mean((1, 2)))


def _x(n=6, seed=0):
    return jnp.asarray(np.random.RandomState(seed).randn(n, 6, 6, 1), jnp.float32)


def _spaces():
    return {loop: NNXSpace(lambda rngs, loop=loop: LoopCell(rngs, loop=loop)) for loop in (False, True)}


def _close(got, want, rtol=2e-5, atol=2e-6):
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)


@pytest.mark.parametrize("relaxation", ["darts", "gdas", "pc_darts"])
def test_looped_edges_equal_the_unrolled_edges(relaxation):
    spaces = _spaces()
    params, stats = spaces[False].init(jax.random.PRNGKey(0))
    assert jax.tree_util.tree_structure(spaces[True].init(jax.random.PRNGKey(0))) == \
        jax.tree_util.tree_structure((params, stats))        # one model, one layout
    rng = np.random.default_rng(1)
    alpha = jnp.asarray(rng.standard_normal((6, 4)), jnp.float32)
    beta = jnp.asarray(rng.standard_normal(6), jnp.float32)
    x = _x()
    out = {}
    for loop, space in spaces.items():
        if relaxation == "darts":
            mix, sample = dense_mix, lambda a: {"cell": jax.nn.softmax(a, -1)}
        else:
            relax = get_relaxation(relaxation, space=space, **({"k": 1} if relaxation == "pc_darts" else {}))
            mix = relax.mix
            if relaxation == "gdas":
                sample = lambda a, relax=relax: relax.sample({"cell": a}, jax.random.PRNGKey(7), 1.0)  # noqa: E731
            else:
                sample = lambda a, relax=relax: relax.sample({"alpha": {"cell": a}, "beta": {"cell": beta}},  # noqa: E731
                                                             None, 0.0)

        def loss(p, a, space=space, mix=mix, sample=sample):
            logits, new_stats = space.apply(p, stats, x, sample(a), mix, Ctx(train=True))
            return jnp.sum(jnp.sin(logits)), (logits, new_stats)

        (_, aux), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, alpha)
        out[loop] = (aux, grads)
    (logits, new_stats), (g_w, g_a) = out[True]
    (want_logits, want_stats), (want_w, want_a) = out[False]
    _close(logits, want_logits)
    _close(g_a, want_a, rtol=1e-4, atol=1e-6)
    _close(g_w, want_w, rtol=1e-4, atol=1e-6)
    _close(new_stats, want_stats)
    assert float(jnp.abs(want_a).max()) > 1e-4          # 100x the tolerance: α matters
    # every edge's own BatchNorm statistics moved (written back from the loop), not only one edge's
    moved = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()), spaces[True].unstacked(params, new_stats)[1],
                                   spaces[True].unstacked(params, stats)[1])
    per_edge = [max(jax.tree_util.tree_leaves(moved["edges"][e])) for e in range(6)]
    if relaxation == "gdas":   # a sampled edge moves its sampled op's statistics only (none and skip have none)
        assert max(per_edge) > 1e-4
    else:
        assert min(per_edge) > 1e-4


def test_outside_a_search_the_edges_run_one_by_one():
    """dnas.fix of the looping model is a plain module whose edges run in Python: it computes
    what the fixed unrolled model computes, in training and inference."""
    g = {"0->1": "conv3", "0->2": "skip", "1->2": "conv1", "0->3": "none", "1->3": "conv3", "2->3": "skip"}
    looped, unrolled = (dnas.fix(LoopCell(nnx.Rngs(0), loop=loop), g) for loop in (True, False))
    for train in (True, False):
        for m in (looped, unrolled):
            dnas.nnx.set_search_mode(m, train=train)
        _close(looped(_x()), unrolled(_x()), rtol=1e-5, atol=1e-6)


def test_edges_of_other_structures_cannot_loop():
    class Mixed(LoopCell):
        def __init__(self, rngs):
            super().__init__(rngs, loop=True)
            self.edges[5] = Choice(_options(4, rngs, wide=True), label="2->3", node="3", group="cell")

    space = NNXSpace(Mixed)
    params, stats = space.init(jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="'0->1' and '2->3' differ in structure"):
        space.apply(params, stats, _x(), {"cell": jnp.full((6, 4), 0.25)}, dense_mix, Ctx(train=True))
    with pytest.raises(ValueError, match="3 edges, 2 sources"):
        edge_loop([Identity()] * 3, [0, 0], [1, 1], jnp.zeros((2, 1)))


@pytest.mark.skipif(jax.local_device_count() < 8, reason="needs 8 (simulated) devices; see tests/conftest.py")
def test_looped_edges_on_eight_devices_equal_one_device():
    """Data parallel, the loop's BatchNorm is synchronised over the devices like the unrolled
    edges': two search steps on 8 devices equal them on one (the global batch)."""
    from dnas.searcher import make_searcher
    from tests.test_nnx import _step_twice

    x, y = _x(16, seed=4), jnp.arange(16) % 10
    (s1, m1), (s8, m8) = [_step_twice(make_searcher(LoopCell(nnx.Rngs(0), loop=True), "darts", num_devices=n,
                                                    total_steps=4), x, y) for n in (1, 8)]
    assert abs(float(m1["val_loss"]) - float(m8["val_loss"])) < 1e-5
    _close((s8.arch, s8.params, s8.batch_stats), (s1.arch, s1.params, s1.batch_stats), rtol=1e-4, atol=1e-5)
