"""Several independent searches in one vmapped program (``dnas search --seeds``)."""
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from dnas.run import SearchConfig, op_frequency, run_search
from dnas.searcher import make_searcher
from dnas.kernels.cpu.branch_conv import conv2d, member_conv

_DN = ("NHWC", "HWIO", "NHWC")


def _lax_conv(x, w, stride=1, pad=1, dil=1):
    return lax.conv_general_dilated(x, w, (stride, stride), ((pad, pad), (pad, pad)), rhs_dilation=(dil, dil),
                                    dimension_numbers=_DN)


@pytest.mark.parametrize("in_axes", [(0, 0), (0, None), (None, 0)])
def test_member_conv_batching_rule_equals_jax_rule(in_axes):
    """Per-member convolutions under vmap (loop, batch fold, feature fold) compute JAX's batched
    convolution, forward and (through the branch conv's backward pass) gradients."""
    kx, kw = jax.random.split(jax.random.PRNGKey(0))
    S = 3
    x = jax.random.normal(kx, (S, 4, 9, 9, 5) if in_axes[0] == 0 else (4, 9, 9, 5))
    w = jax.random.normal(kw, (S, 3, 3, 5, 6) if in_axes[1] == 0 else (3, 3, 5, 6))
    for stride, dil in ((1, 1), (2, 1), (1, 2)):
        pad = dil
        got = jax.vmap(lambda a, b: member_conv(a, b, (stride, stride), ((pad, pad), (pad, pad)),
                                                rhs_dilation=(dil, dil)), in_axes)(x, w)
        want = jax.vmap(lambda a, b: _lax_conv(a, b, stride, pad, dil), in_axes)(x, w)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

        def loss(conv):
            return lambda a, b: jnp.sum(jnp.sin(conv(a, b)))
        g_got = jax.vmap(jax.grad(loss(lambda a, b: conv2d(a, b, stride, pad, dil, members=True)), (0, 1)),
                         in_axes)(x, w)
        g_want = jax.vmap(jax.grad(loss(lambda a, b: _lax_conv(a, b, stride, pad, dil)), (0, 1)), in_axes)(x, w)
        for a, b in zip(g_got, g_want):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_vmapped_step_has_no_grouped_convolution_on_cpu():
    """The point of the rule: XLA:CPU gets ordinary convolutions, not grouped ones."""
    if jax.default_backend() != "cpu":
        pytest.skip("the per-member rule is the CPU choice")
    s = make_searcher("nb201", "darts", space_options={"channels": 4, "cells_per_stage": 1, "in_channels": 1,
                                                       "num_classes": 10}, num_seeds=2)
    assert s.member_convs
    state = s.init_members((0, 1))
    b = (jnp.zeros((2, 8, 8, 8, 1)), jnp.zeros((2, 8), jnp.int32))
    hlo = s.compiled_step(donate=False).lower(state, b, b).as_text()
    groups = {int(g) for g in re.findall(r"(?:feature|batch)_group_count = (\d+)", hlo)}
    assert "convolution" in hlo and groups == {1}
    # an estimator with forward-over-reverse derivatives keeps JAX's own (grouped) batching
    s2 = make_searcher("nb201", "darts", space_options={"channels": 4, "cells_per_stage": 1, "in_channels": 1,
                                                        "num_classes": 10}, num_seeds=2, hypergrad="unrolled")
    assert not s2.member_convs


def test_init_members_stacks_each_seeds_own_state():
    """Member i of ``init_members`` is ``init(PRNGKey(seed_i))`` bit for bit, and the stacked
    state is what ``jax.vmap(init)`` gives (the form it replaced, which builds the model under a
    trace): same structure, dtypes and values. A wrong number of seeds is refused."""
    s = make_searcher("nb201", "darts", space_options={"channels": 4, "cells_per_stage": 1, "in_channels": 1,
                                                       "num_classes": 10}, num_seeds=3)
    seeds = (3, 5, 11)
    state = s.init_members(seeds)

    def same(a, b):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)

    for i, seed in enumerate(seeds):
        jax.tree_util.tree_map(same, s.member(state, i), s.init(jax.random.PRNGKey(seed)))
    vmapped = jax.vmap(s.init)(jnp.stack([jax.random.PRNGKey(seed) for seed in seeds]))
    assert jax.tree_util.tree_structure(state) == jax.tree_util.tree_structure(vmapped)
    jax.tree_util.tree_map(same, state, vmapped)
    assert not np.array_equal(s.member(state, 0).arch["cell"], s.member(state, 1).arch["cell"])
    with pytest.raises(ValueError, match="2 seeds given to a searcher built for 3"):
        s.init_members((0, 1))


def _cfg(tmp_path, name, **kw):
    return SearchConfig(space="nb201", space_options={"channels": 4, "cells_per_stage": 1}, epochs=1, batch_size=16,
                        max_steps=3, limit_examples=200, out=str(tmp_path / name), progress=False, **kw)


def test_each_seed_equals_the_seed_run_alone(tmp_path):
    """``--seeds 3,5``: every seed's α trajectory, derived architecture and metrics equal those
    of ``--seed s`` run alone (own data subset, split, order, augmentation, init)."""
    multi = run_search(_cfg(tmp_path, "multi", seeds=(3, 5)))
    assert multi["seeds"] == [3, 5] and len(multi["genotypes"]) == 2
    for i, seed in enumerate((3, 5)):
        if seed == 3:  # one alone run keeps the test short: the second member, not the first
            continue
        alone = run_search(_cfg(tmp_path, f"alone{seed}", seed=seed))
        assert multi["genotypes"][i] == alone["genotype"]
        a = json.loads((tmp_path / "multi" / f"seed-{seed}" / "alphas.json").read_text())
        b = json.loads((tmp_path / f"alone{seed}" / "alphas.json").read_text())
        np.testing.assert_allclose(a["groups"]["cell"]["alpha"], b["groups"]["cell"]["alpha"], rtol=0, atol=1e-6)
        ma = [json.loads(line) for line in (tmp_path / "multi" / f"seed-{seed}" / "metrics.jsonl").open()]
        mb = [json.loads(line) for line in (tmp_path / f"alone{seed}" / "metrics.jsonl").open()]
        assert [m["step"] for m in ma] == [m["step"] for m in mb]
        np.testing.assert_allclose([m["val_loss"] for m in ma], [m["val_loss"] for m in mb], rtol=1e-4)
        assert (tmp_path / "multi" / f"seed-{seed}" / "genotype.png").stat().st_size > 0
    # the seeds really differ (own init and data), and the summary counts their choices
    a3 = json.loads((tmp_path / "multi" / "seed-3" / "alphas.json").read_text())["groups"]["cell"]["alpha"]
    a5 = json.loads((tmp_path / "multi" / "seed-5" / "alphas.json").read_text())["groups"]["cell"]["alpha"]
    assert not np.allclose(a3, a5)
    freq = json.loads((tmp_path / "multi" / "op_frequency.json").read_text())
    assert freq["seeds"] == [3, 5]
    for point, counts in freq["counts"]["cell"].items():
        assert sum(counts.values()) == 2
    ops = [g["ops"] for g in multi["genotypes"]]
    for r, counts in enumerate(freq["counts"]["cell"].values()):
        for op, n in counts.items():
            assert n == sum(o[r] == op for o in ops)
    assert (tmp_path / "multi" / "op_frequency.png").stat().st_size > 0


def test_op_frequency_counts_darts_edges_not_kept_as_none():
    from dnas.supernet.genotype import DARTS_EDGES  # noqa: F401  (the 14 edges of a cell)
    from dnas.supernet.spaces import build_space

    space = build_space("darts", channels=4, layers=3)     # a normal and two reduction cells
    rng = np.random.default_rng(0)
    genotypes = [space.derive({g: rng.random(space.groups[g]) for g in space.groups}) for _ in range(3)]
    freq = op_frequency(space, genotypes)
    for g in ("normal", "reduce"):
        rows = list(freq[g].values())
        assert len(rows) == 14 and all(sum(r.values()) == 3 for r in rows)
        kept = sum(n for r in rows for op, n in r.items() if op != "none")
        assert kept == 3 * 8  # every derived DARTS cell keeps 2 edges into each of its 4 nodes


@pytest.mark.slow
@pytest.mark.skipif(jax.local_device_count() < 2, reason="needs 2 (simulated) devices; see tests/conftest.py")
def test_seeds_data_parallel_equals_one_device(digit_batches):
    """Members vmapped inside the 2-device shard_map == the same members on one device."""
    opts = {"channels": 4, "cells_per_stage": 1, "in_channels": 1, "num_classes": 10}
    (tb, vb), = digit_batches(1, batch=16)
    stack = lambda b: (np.stack([b[0], b[0][::-1]]), np.stack([b[1], b[1][::-1]]))  # noqa: E731
    out = []
    for n in (1, 2):
        s = make_searcher("nb201", "darts", space_options=opts, num_seeds=2, num_devices=n)
        state, _ = s.compiled_step(donate=False)(s.replicate(s.init_members((0, 1))), s.shard(stack(tb)),
                                                 s.shard(stack(vb)))
        out.append(np.asarray(state.arch["cell"]))
    np.testing.assert_allclose(out[0], out[1], atol=1e-6, rtol=0)
