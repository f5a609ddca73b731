"""Reference values of the ``chain`` space from the code before it was declared with ``dnas.nnx``
(commit 20c0786, where the supernet was still a ``SearchSpace`` over dnas's layer kit).

That code's supernet initialised its weights (``init(PRNGKey(1))``), which were written into the
NNX model's layout (``examples/nnx_chain.py``'s ``load_builtin_weights`` at that commit) and
stored with the input, α and the supernet's logits, loss gradients and BatchNorm statistics,
and the logits of that code's derived network holding the supernet's chosen ops' weights, in
``tests/data/chain_reference.npz``. ``tests/test_space_reference.py`` checks the current chain
against them.

Rerun at that commit (``git checkout 20c0786 && PYTHONPATH=. python tests/chain_reference.py``);
the current code has no second description of the chain to run it against.
"""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

#: a small chain: a stem, one stage of two blocks (the first changes the shape, the second keeps
#: it: a residual connection and ``zero`` among its options), a 64-channel head
OPTIONS = dict(in_channels=3, num_classes=5, width_mult=0.25, stage_widths=(24,), stage_depths=(2,),
               stage_strides=(2,), stem_stride=1, last_channels=64)
GENOTYPE = ("mb_k5_e3", "mb_k7_e6")   # block0 (6 options), block1 (7 options)
PATH = Path(__file__).parent / "data" / "chain_reference.npz"


def flat(tree, prefix: str) -> dict:
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out[prefix + "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)] = np.asarray(leaf)
    return out


def generate() -> None:   # pragma: no cover - runs at commit 20c0786 only
    from flax import nnx

    from dnas.relaxations.base import dense_mix
    from dnas.supernet.chain import ChainConfig, chain_network
    from dnas.supernet.genotype import ChainGenotype
    from dnas.supernet.layers import Ctx
    from dnas.supernet.spaces import build_space
    from examples.nnx_chain import ChainNet, load_builtin_weights

    space = build_space("chain", **OPTIONS)
    params, state = space.init(jax.random.PRNGKey(1))
    x = jax.random.normal(jax.random.PRNGKey(2), (4, 8, 8, 3))
    y = jnp.arange(4) % 5
    alpha = {g: jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(3), i), shape)
             for i, (g, shape) in enumerate(sorted(space.groups.items()))}

    def loss(p, a):
        w = {g: jax.nn.softmax(v, -1) for g, v in a.items()}
        logits, st = space.apply(p, state, x, w, dense_mix, Ctx(train=True))
        return jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), y]), (logits, st)

    (_, (logits, new_state)), (g_w, g_a) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        params, alpha)
    model = ChainNet(nnx.Rngs(0), ChainConfig(**OPTIONS))
    load_builtin_weights(model, params)
    weights = flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)), "param/")
    # α and its gradient per block label (the old space's groups hold one row per block)
    per_block = {}
    for b, (g, i, *_r) in enumerate(space.blocks):
        per_block[f"alpha/block{b}"] = np.asarray(alpha[g][i])
        per_block[f"grad_alpha/block{b}"] = np.asarray(g_a[g][i])

    # the derived network of GENOTYPE holding the supernet's weights of the chosen ops
    net = chain_network(ChainGenotype(GENOTYPE), **{k: v for k, v in OPTIONS.items()})
    ops = [space.group_op_names(g) for g, *_r in space.blocks]
    dparams = {"stem": params["stem"], "head": params["head"], "classifier": params["classifier"],
               "blocks": [params["blocks"][b][ops[b].index(op)] for b, op in enumerate(GENOTYPE)]}
    dstate = {"stem": state["stem"], "head": state["head"],
              "blocks": [state["blocks"][b][ops[b].index(op)] for b, op in enumerate(GENOTYPE)]}
    out = net.apply(dparams, dstate, x, Ctx(train=True))
    norm = lambda t: float(jnp.sqrt(sum(jnp.sum(jnp.square(a)) for a in jax.tree_util.tree_leaves(t))))  # noqa: E731
    PATH.parent.mkdir(exist_ok=True)
    np.savez_compressed(PATH, x=np.asarray(x), y=np.asarray(y), logits=np.asarray(logits),
                        grad_w_norm=norm(g_w), grad_alpha_norm=norm(g_a),
                        bn_abs_sum=float(sum(jnp.sum(jnp.abs(a)) for a in jax.tree_util.tree_leaves(new_state))),
                        derived_logits=np.asarray(out.logits), **weights, **per_block)


if __name__ == "__main__":
    generate()
