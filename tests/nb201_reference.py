"""Reference values of the ``nb201`` space from the code before it was declared with ``dnas.nnx``
(commit 9771e79, where the supernet was a ``SearchSpace`` over dnas's layer kit, its cells
stacked, and the stand-alone network a second description in the same module).

That code's supernet initialised its weights (``init(PRNGKey(1))``); they are stored in the NNX
model's layout (attribute paths ``stem/kernel``, ``stages/0/1/edges/3/candidates/2/conv/kernel``,
...) with the input, α and the supernet's logits, loss gradients and BatchNorm statistics, GDAS's logits and
∂loss/∂α for one sample, and (under ``pc/``) a PC-DARTS supernet's (K=2) weights, logits and
∂loss/∂(α, β). The old stand-alone network of :data:`CELL` initialised its own weights (``init(PRNGKey(5))``; its
cells' BatchNorm affine), stored under ``derived/`` in the layout of the fixed NNX model, with
its logits. ``tests/test_space_reference.py`` checks the current space against them.

The generator ran at that commit and only there (it builds the old ``SearchSpace``, which no
longer exists): ``git checkout 9771e79 && PYTHONPATH=. python tests/nb201_reference.py``.
"""
from __future__ import annotations

from pathlib import Path

#: a small supernet: two cells per stage, 2/4/8 channels, 8x8 RGB inputs, 5 classes
OPTIONS = dict(channels=2, cells_per_stage=2, num_classes=5, in_channels=3)
CELL = "|nor_conv_3x3~0|+|none~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_1x1~1|nor_conv_3x3~2|"
PATH = Path(__file__).parent / "data" / "nb201_reference.npz"


def generate() -> None:   # pragma: no cover - runs at commit 9771e79 only
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dnas.relaxations.base import dense_mix
    from dnas.supernet.derived import build_network
    from dnas.supernet.genotype import NB201_EDGES, NB201_OPS, parse_nb201
    from dnas.supernet.context import Ctx
    from dnas.supernet.spaces import build_space

    out = {}

    def put(prefix, tree):
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            out[prefix + "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)] = np.asarray(leaf)

    def macro(prefix, p):   # stem, reductions, head, classifier: the same in both networks
        put(prefix + "stem/", {"kernel": p["stem"][0]["w"]})
        put(prefix + "stem_bn/", p["stem"][1])
        for i in range(2):
            r = p[f"reduce{i}"]
            for part in ("a", "b"):
                put(prefix + f"reductions/{i}/{part}/", {"conv": {"kernel": r[part][1]["w"]}, "bn": r[part][2]})
            put(prefix + f"reductions/{i}/short/", {"kernel": r["short"][1]["w"]})
        put(prefix + "head_bn/", p["head_bn"])
        put(prefix + "classifier/", {"kernel": p["classifier"]["w"], "bias": p["classifier"]["b"]})

    def supernet(prefix, p):   # the fixed parts, and every cell's convolutions (no BatchNorm weights)
        macro(prefix, p)
        for i in range(3):
            for c in range(OPTIONS["cells_per_stage"]):
                for e in range(len(NB201_EDGES)):
                    for j, op in enumerate(NB201_OPS):
                        if op.startswith("nor_conv"):
                            conv = jax.tree_util.tree_map(lambda a: a[c, e], p[f"stage{i}"][j])
                            put(f"{prefix}stages/{i}/{c}/edges/{e}/candidates/{j}/", {"conv": {"kernel": conv[1]["w"]}})

    space = build_space("nb201", **OPTIONS)
    params, state = space.init(jax.random.PRNGKey(1))
    x = jax.random.normal(jax.random.PRNGKey(2), (4, 8, 8, 3))
    y = jnp.arange(4) % 5
    alpha = jax.random.normal(jax.random.PRNGKey(3), (6, 5))

    def loss(p, a):
        logits, st = space.apply(p, state, x, {"cell": jax.nn.softmax(a, -1)}, dense_mix, Ctx(train=True))
        return jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), y]), (logits, st)

    (_, (logits, new_state)), (g_w, g_a) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        params, alpha)
    supernet("param/", params)
    norm = lambda t: float(jnp.sqrt(sum(jnp.sum(jnp.square(a)) for a in jax.tree_util.tree_leaves(t))))  # noqa: E731

    net = build_network(parse_nb201(CELL), **OPTIONS)
    dp, ds = net.init(jax.random.PRNGKey(5))
    dout = jax.jit(lambda p, s: net.apply(p, s, x, Ctx(train=True)))(dp, ds)
    macro("derived/", dp)
    kept = [e for e, op in enumerate(parse_nb201(CELL).ops) if op != "none"]
    for i in range(3):
        for c, cell in enumerate(dp[f"stage{i}"]):
            for e, p in zip(kept, cell):
                if p:    # a convolution: (relu, conv, bn)
                    put(f"derived/stages/{i}/{c}/edges/{e}/", {"conv": {"kernel": p[1]["w"]}, "bn": p[2]})
    # GDAS (a sampled op per edge, the rest of the row's weights zero) on the same weights
    from dnas.relaxations import get_relaxation
    gdas = get_relaxation("gdas", space=space)

    def gdas_loss(a):
        samples = gdas.sample({"cell": a}, jax.random.PRNGKey(7), 1.0)
        logits, _ = space.apply(params, state, x, samples, gdas.mix, Ctx(train=True))
        return jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), y]), logits

    (_, gdas_logits), gdas_grad = jax.jit(jax.value_and_grad(gdas_loss, has_aux=True))(alpha)
    # PC-DARTS with K=2: candidates on half the channels, β's edge normalisation
    space2 = build_space("nb201", partial_channels=2, **OPTIONS)
    p2, s2 = space2.init(jax.random.PRNGKey(11))
    pc = get_relaxation("pc_darts", space=space2, k=2)
    beta = jax.random.normal(jax.random.PRNGKey(12), (6,))

    def pc_loss(a, b):
        samples = pc.sample({"alpha": {"cell": a}, "beta": {"cell": b}}, None, 0.0)
        logits, _ = space2.apply(p2, s2, x, samples, pc.mix, Ctx(train=True))
        return jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), y]), logits

    (_, pc_logits), (pc_ga, pc_gb) = jax.jit(jax.value_and_grad(pc_loss, argnums=(0, 1), has_aux=True))(alpha, beta)
    supernet("pc/", p2)
    PATH.parent.mkdir(exist_ok=True)
    np.savez_compressed(PATH, gdas_logits=np.asarray(gdas_logits), gdas_grad_alpha=np.asarray(gdas_grad),
                        beta=np.asarray(beta), pc_logits=np.asarray(pc_logits), pc_grad_alpha=np.asarray(pc_ga),
                        pc_grad_beta=np.asarray(pc_gb), x=np.asarray(x), y=np.asarray(y), alpha=np.asarray(alpha), logits=np.asarray(logits),
                        grad_alpha=np.asarray(g_a), grad_w_norm=norm(g_w),
                        bn_abs_sum=float(sum(jnp.sum(jnp.abs(a)) for a in jax.tree_util.tree_leaves(new_state))),
                        derived_logits=np.asarray(dout.logits), **out)


if __name__ == "__main__":
    generate()
