"""The built-in ProxylessNAS chain is a Flax NNX model with ``dnas.nnx`` choice points
(``dnas.supernet.chain.ChainNet``): one ``Choice`` per MBConv block, labelled ``block{b}``, with
``zero`` among a shape-keeping block's options. Its numbers against the code before it was one
(``tests/test_space_reference.py``); here its layout, derivation and fixed network."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import dnas
from dnas.supernet.chain import KEEP_OPS, MB_OPS, ChainConfig, ChainNet, MBConv, chain_plan
from dnas.supernet.genotype import ChainGenotype
from dnas.supernet.spaces import build_space

# width 0.25, one stage of two blocks: the first changes the shape ("reshape"), the second keeps
# it ("keep": a residual connection and ``zero`` among its options)
OPTIONS = {"width_mult": 0.25, "stage_widths": (24,), "stage_depths": (2,), "stage_strides": (2,), "stem_stride": 1}


def test_the_model_follows_the_plan():
    """The model's blocks have the plan's widths, strides and options (``zero`` exactly where
    the block keeps its shape); the head widens with the width multiplier only above 1."""
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


def test_the_chain_derives_its_genotype_and_fixes_it():
    """From α the space derives every block's best op as a ``ChainGenotype``; the fixed network
    holds only the chosen MBConvs (none for a ``zero`` block) and computes what the one-hot
    supernet computes from the same weights, in inference too."""
    space = build_space("chain", in_channels=1, num_classes=10, **OPTIONS)
    assert space.groups == {"block0": (1, 6), "block1": (1, 7)}
    rng = np.random.default_rng(5)
    alpha = {g: jnp.asarray(rng.standard_normal((n, k)), jnp.float32) for g, (n, k) in space.groups.items()}
    alpha["block1"] = alpha["block1"].at[0, KEEP_OPS.index("zero")].set(9.0)   # the keep block left out
    g = space.derive(alpha)
    assert isinstance(g, ChainGenotype)
    assert g.ops == (MB_OPS[int(jnp.argmax(alpha["block0"][0]))], "zero")

    params, stats = space.init(jax.random.PRNGKey(0))
    fixed = dnas.fix(space.module(params, stats), g)
    assert isinstance(fixed.blocks[0], MBConv) and isinstance(fixed.blocks[1], dnas.nnx.Zero)
    _, k, _ = g.ops[0].split("_")
    assert fixed.blocks[0].depthwise.conv.kernel.shape[:2] == (int(k[1:]),) * 2

    x = jnp.asarray(rng.standard_normal((4, 8, 8, 1)), jnp.float32)
    onehot = {lab: jax.nn.one_hot(jnp.asarray([space.group_op_names(lab).index(op)]), space.groups[lab][1])
              for lab, op in g.items()}
    from dnas.relaxations.base import dense_mix
    from dnas.supernet.context import Ctx
    want, _ = space.apply(params, stats, x, onehot, dense_mix, Ctx(train=False))
    fixed.eval()
    np.testing.assert_allclose(fixed(x), want, rtol=2e-4, atol=2e-5)


def test_the_search_records_the_layout_dnas_train_rebuilds():
    """What a search run records of the space (``resolved.space_options``: ``describe()``, as
    JSON) gives ``dnas train`` the searched block layout, whatever the network's defaults."""
    import json

    from dnas.train import _network_options, TrainConfig

    space = build_space("chain", in_channels=1, num_classes=10, width_mult=0.25, stem_stride=1,
                        stage_depths=(1, 1, 1, 1, 1, 1))
    recorded = json.loads(json.dumps({"resolved": {"space_options": space.describe()}}))

    class Data:
        image_shape, num_classes = (8, 8, 1), 10
    opts = _network_options(TrainConfig(genotype="unused"), "chain", recorded, Data(), {"auxiliary_weight": 0.0})
    net = ChainConfig(**opts)
    assert chain_plan(net) == space.plan and net.in_channels == 1 and net.num_classes == 10
