"""The ProxylessNAS chain space declared with ``dnas.nnx``'s primitives (examples/nnx_chain.py)
computes what the built-in ``chain`` space computes.

The built-in space is one ``SearchSpace`` module whose blocks form two groups of choice points
(``reshape``: 6 options, ``keep``: 7 with ``zero``). The NNX model gives every block its own
``Choice`` labelled ``block{b}``, the built-in space's choice-point names. Given the built-in
space's weights, the two give the same logits, the same gradient of the loss with respect to
the architecture weights, the same BatchNorm statistics, for soft weights (DARTS's dense mix)
and for one sampled op per block (ProxylessNAS's binary gates).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dnas
from dnas.relaxations import get_relaxation
from dnas.supernet.chain import KEEP_OPS, MB_OPS, ChainConfig, chain_plan
from dnas.supernet.genotype import ChainGenotype
from dnas.supernet.layers import Ctx
from dnas.supernet.nnx_space import NNXSpace
from dnas.supernet.spaces import build_space
from examples.nnx_chain import ChainNet, MBConv, load_builtin_weights

# width 0.25, one stage of two blocks: the first changes the shape ("reshape"), the second keeps
# it ("keep": a residual connection and ``zero`` among its options)
OPTIONS = {"width_mult": 0.25, "stage_widths": (24,), "stage_depths": (2,), "stage_strides": (2,), "stem_stride": 1}
SIDE, BATCH = 8, 8


def _pair():
    builtin = build_space("chain", in_channels=1, num_classes=10, **OPTIONS)
    params, state = builtin.init(jax.random.PRNGKey(0))
    model = ChainNet(nnx.Rngs(1), ChainConfig(in_channels=1, num_classes=10, **OPTIONS))
    load_builtin_weights(model, params)
    return builtin, params, state, model


def _per_block(builtin, weights):
    """The built-in space's group matrices as one row per block label."""
    return {f"block{b}": jax.tree_util.tree_map(lambda a: a[i][None], weights[g])
            for b, (g, i, *_rest) in enumerate(builtin.blocks)}


# DARTS's dense mix: pytest -m slow (21 s on 2 cores); the default run checks it on NAS-Bench-201
# (test_nnx_nb201.py) and ProxylessNAS's sampled path, the chain's own relaxation, here
@pytest.mark.parametrize("relaxation", [pytest.param("darts", marks=pytest.mark.slow), "proxyless"])
def test_chain_declared_with_nnx_choices_equals_the_built_in_space(relaxation):
    builtin, params, state, model = _pair()
    space = NNXSpace(model)
    assert builtin.groups == {"reshape": (1, 6), "keep": (1, 7)}
    assert space.groups == {f"block{b}": (1, 7 if g == "keep" else 6) for b, (g, *_r) in enumerate(builtin.blocks)}
    nparams, nstats = space.init(jax.random.PRNGKey(2))

    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((BATCH, SIDE, SIDE, 1)), jnp.float32)
    r = jnp.asarray(rng.standard_normal((BATCH, 10)), jnp.float32)
    alpha = {g: jnp.asarray(rng.standard_normal((n, k)), jnp.float32) for g, (n, k) in builtin.groups.items()}
    # DARTS: softmax(α) mixes every op; ProxylessNAS: two sampled ops per block, binary gates
    # whose straight-through value carries α's gradient (Cai et al. 2019, eq. 4)
    relax = get_relaxation(relaxation)
    key = jax.random.PRNGKey(4)
    ctx = Ctx(train=True)

    def builtin_loss(alpha):
        logits, new_state = builtin.apply(params, state, x, relax.sample(alpha, key, 1.0), relax.mix, ctx)
        return jnp.sum(logits * r), (logits, new_state)

    def nnx_loss(alpha):
        w = _per_block(builtin, relax.sample(alpha, key, 1.0))
        logits, new_stats = space.apply(nparams, nstats, x, w, relax.mix, ctx)
        return jnp.sum(logits * r), (logits, new_stats)

    (_, (want, want_state)), want_grad = jax.jit(jax.value_and_grad(builtin_loss, has_aux=True))(alpha)
    (_, (got, got_stats)), got_grad = jax.jit(jax.value_and_grad(nnx_loss, has_aux=True))(alpha)
    got_stats = space.unstacked(nparams, got_stats)[1]   # keyed as the model's layers
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
    for g in builtin.groups:   # ∂loss/∂α, every block's row
        np.testing.assert_allclose(got_grad[g], want_grad[g], rtol=2e-3, atol=2e-4)
    assert max(float(jnp.abs(a).max()) for a in want_grad.values()) > 1e-2   # a gradient that says something
    # inference with the running statistics the training step left
    weights = relax.sample(alpha, key, 1.0)
    infer = lambda apply, *args: jax.jit(lambda w: apply(*args, w, relax.mix, Ctx(train=False))[0])  # noqa: E731
    np.testing.assert_allclose(infer(space.apply, nparams, nstats, x)(_per_block(builtin, weights)),
                               infer(builtin.apply, params, state, x)(weights), rtol=2e-4, atol=2e-5)
    n = BATCH * SIDE * SIDE   # the stem's BatchNorm sees the whole batch at full resolution
    np.testing.assert_allclose(got_stats["stem"]["bn"]["mean"], want_state["stem"][0]["mean"], rtol=1e-4, atol=1e-6)
    # PyTorch's running variance is unbiased: 0.9 + 0.1 * var * n / (n - 1); Flax's biased
    np.testing.assert_allclose(got_stats["stem"]["bn"]["var"] - 0.9,
                               (want_state["stem"][0]["var"] - 0.9) * (n - 1) / n, rtol=1e-4, atol=1e-6)
    # the last block's first option's projection BatchNorm (deep in the network)
    last = len(builtin.blocks) - 1
    np.testing.assert_allclose(got_stats["blocks"][last]["candidates"][0]["project"]["bn"]["mean"],
                               want_state["blocks"][last][0][-1]["mean"], rtol=1e-3, atol=1e-5)


def test_nnx_chain_derives_the_built_in_genotype_and_fixes_it():
    """From the same α the NNX model's genotype is the built-in space's, block for block; the
    fixed network holds only the chosen MBConvs (none for a ``zero`` block) and computes what
    the built-in space's derived network computes from the same weights."""
    builtin, params, state, model = _pair()
    space = NNXSpace(model)
    rng = np.random.default_rng(5)
    alpha = {g: jnp.asarray(rng.standard_normal((n, k)), jnp.float32) for g, (n, k) in builtin.groups.items()}
    alpha["keep"] = alpha["keep"].at[0, KEEP_OPS.index("zero")].set(9.0)   # the keep block left out
    want = builtin.derive(alpha)
    g = space.derive(_per_block(builtin, alpha))
    assert isinstance(want, ChainGenotype) and "zero" in want.ops
    assert [g[f"block{b}"] for b in range(len(builtin.blocks))] == list(want.ops)

    fixed = dnas.fix(model, g)
    for b, op in enumerate(want.ops):
        kept = fixed.blocks[b]
        assert (op == "zero") == (not isinstance(kept, MBConv))
        if isinstance(kept, MBConv):   # the chosen kernel; the projection reads the depthwise output
            _, k, e = op.split("_")
            assert kept.depthwise.conv.kernel.shape[:2] == (int(k[1:]),) * 2
            assert kept.project.conv.kernel.shape[2] == kept.depthwise.conv.kernel.shape[3] == \
                (kept.expand.conv.kernel.shape[3] if kept.expand is not None else kept.project.conv.kernel.shape[2])

    net = builtin.network(want, in_channels=1, num_classes=10, **OPTIONS)
    nparams, nstate = net.init(jax.random.PRNGKey(0))
    # the derived network's blocks: the supernet's chosen candidate's weights
    for b, op in enumerate(want.ops):
        if op != "zero":
            o = builtin.group_op_names(builtin.blocks[b][0]).index(op)
            nparams["blocks"][b], nstate["blocks"][b] = params["blocks"][b][o], state["blocks"][b][o]
    nparams = {**nparams, "stem": params["stem"], "head": params["head"], "classifier": params["classifier"]}
    x = jnp.asarray(rng.standard_normal((4, SIDE, SIDE, 1)), jnp.float32)
    fixed.eval()
    np.testing.assert_allclose(fixed(x), net.apply(nparams, {**nstate, "stem": state["stem"], "head": state["head"]},
                                                   x, Ctx(train=False)).logits, rtol=2e-4, atol=2e-5)


def test_the_plan_is_the_built_in_spaces_layout():
    """``chain_plan`` is the one layout both forms build from: the NNX model's blocks have the
    plan's widths, strides and options (``zero`` exactly where the block keeps its shape)."""
    config = ChainConfig(in_channels=1, num_classes=10, **OPTIONS)
    plan, model = chain_plan(config), ChainNet(nnx.Rngs(0), config)
    for (group, _, c_in, c_out, stride), block in zip(plan.blocks, model.blocks, strict=True):
        assert tuple(block.names) == (KEEP_OPS if group == "keep" else MB_OPS)
        first = block.candidates[0]   # mb_k3_e3
        assert first.expand.conv.kernel.shape[2:] == (c_in, 3 * c_in)
        assert first.project.conv.kernel.shape[3] == c_out
        assert first.depthwise.conv.strides in (stride, (stride, stride))
        assert (group == "keep") == (stride == 1 and c_in == c_out)
    wide = dataclasses.replace(config, width_mult=1.5)
    assert chain_plan(wide).last == 1920 and chain_plan(config).last == 1280
