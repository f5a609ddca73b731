"""Reference values of the ``darts`` space from the code before it is declared with ``dnas.nnx``
(commit b29d4b5, where the supernet is a ``SearchSpace`` over dnas's layer kit with its edges
stacked, and the evaluation network a second description in the same module).

That code's supernet initialises its weights (``init(PRNGKey(1))``, one normal cell and two
reduction cells, the second after the first: every kind of preprocessing and stride); they are
stored in the layout of the NNX model ``examples/nnx_darts.py`` writes (attribute paths
``stem/conv/kernel``, ``cells/1/edges/3/candidates/4/a/dw/kernel``, ...; written there by its
``load_builtin_weights``), which is the layout of ``dnas.supernet.darts.DartsNet`` with the input, α and the supernet's logits, ∂loss/∂α, weight-gradient
norm and BatchNorm-statistics sum; GDAS's logits and ∂loss/∂α for one sample; and (under
``pc/``) a PC-DARTS supernet's (K=2) weights, logits and ∂loss/∂(α, β). The old evaluation
network of :data:`dnas.supernet.genotype.DARTS_V2` with its auxiliary head initialises its own
weights (``init(PRNGKey(5))``; affine BatchNorm, plain pooling), stored under ``derived/`` in
the layout of :data:`DERIVED_LAYOUT` with its training logits, auxiliary logits and inference
logits on 32x32 inputs (the auxiliary head needs 8x8 maps after the second reduction); its
2x2 convolution's weights are not stored but drawn on both sides (:func:`aux_conv2_kernel`).

The generator runs at that commit and only there (it builds the old ``SearchSpace``):
``git checkout b29d4b5 && PYTHONPATH=. python tests/darts_reference.py``.
"""
from __future__ import annotations

from pathlib import Path

#: a small supernet: normal, reduction, reduction cells; 4/8/16 channels, 5 classes
OPTIONS = dict(channels=4, layers=3, num_classes=5, in_channels=3)
PATH = Path(__file__).parent / "data" / "darts_reference.npz"
#: where the evaluation network's weights go: per DARTS op, the attribute paths of its
#: convolutions and affine BatchNorms in the fixed NNX model (pooling and identity have none)
DERIVED_LAYOUT = {"sep_conv": ("a/dw", "a/pw", "a/bn", "b/dw", "b/pw", "b/bn"), "dil_conv": ("dw", "pw", "bn"),
                  "factorized_reduce": ("a", "b", "bn"), "relu_conv_bn": ("conv", "bn"),
                  "aux": ("conv1", "bn1", "conv2", "bn2", "linear")}


def aux_conv2_kernel():
    """The auxiliary head's 2x2 convolution to 768 channels (393,216 weights, three quarters of
    what the reference would store) is set to these values on both sides instead of stored:
    He-normal draws from a fixed key."""
    import jax
    return jax.random.normal(jax.random.PRNGKey(99), (2, 2, 128, 768)) * (2.0 / (2 * 2 * 128)) ** 0.5


def generate() -> None:   # pragma: no cover - runs at commit b29d4b5 only
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import examples.nnx_darts as twin
    from dnas.relaxations import get_relaxation
    from dnas.relaxations.base import dense_mix
    from dnas.supernet.darts import darts_plan
    from dnas.supernet.derived import build_network
    from dnas.supernet.genotype import DARTS_EDGES, DARTS_V2
    from dnas.supernet.context import Ctx
    from dnas.supernet.spaces import build_space

    out = {}

    def put(prefix, tree):
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            out[prefix + "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)] = np.asarray(leaf)

    def twin_weights(prefix, space, params, k=1):
        """The old supernet's weights in the NNX model's layout (PC-DARTS: ops on C/k channels)."""
        ops = twin.darts_ops
        twin.darts_ops = lambda c, stride, rngs: ops(c // k, stride, rngs)
        try:
            model = twin.DartsNet(nnx.Rngs(0), channels=OPTIONS["channels"], layers=OPTIONS["layers"],
                                  in_channels=OPTIONS["in_channels"], num_classes=OPTIONS["num_classes"])
        finally:
            twin.darts_ops = ops
        twin.load_builtin_weights(model, params, space.runs)
        tree = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        tree["stem"] = {"conv": tree["stem"], "bn": tree.pop("stem_bn")}   # the model's Stem module
        put(prefix, tree)

    space = build_space("darts", unroll=True, **OPTIONS)
    params, state = space.init(jax.random.PRNGKey(1))
    x = jax.random.normal(jax.random.PRNGKey(2), (4, 8, 8, 3))
    y = jnp.arange(4) % 5
    alpha = {g: jax.random.normal(jax.random.PRNGKey(3 + i), (len(DARTS_EDGES), 8)) for i, g in
             enumerate(("normal", "reduce"))}

    def loss(p, a):
        logits, st = space.apply(p, state, x, {g: jax.nn.softmax(v, -1) for g, v in a.items()}, dense_mix,
                                 Ctx(train=True))
        return jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), y]), (logits, st)

    (_, (logits, new_state)), (g_w, g_a) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        params, alpha)
    twin_weights("param/", space, params)
    norm = lambda t: float(jnp.sqrt(sum(jnp.sum(jnp.square(a)) for a in jax.tree_util.tree_leaves(t))))  # noqa: E731

    gdas = get_relaxation("gdas", space=space)

    def gdas_loss(a):
        logits, _ = space.apply(params, state, x, gdas.sample(a, jax.random.PRNGKey(7), 1.0), gdas.mix,
                                Ctx(train=True))
        return jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), y]), logits

    (_, gdas_logits), gdas_grad = jax.jit(jax.value_and_grad(gdas_loss, has_aux=True))(alpha)

    space2 = build_space("darts", unroll=True, partial_channels=2, **OPTIONS)
    p2, s2 = space2.init(jax.random.PRNGKey(11))
    pc = get_relaxation("pc_darts", space=space2, k=2)
    beta = {g: jax.random.normal(jax.random.PRNGKey(12 + i), (len(DARTS_EDGES),)) for i, g in
            enumerate(("normal", "reduce"))}

    def pc_loss(a, b):
        logits, _ = space2.apply(p2, s2, x, pc.sample({"alpha": a, "beta": b}, None, 0.0), pc.mix, Ctx(train=True))
        return jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), y]), logits

    (_, pc_logits), (pc_ga, pc_gb) = jax.jit(jax.value_and_grad(pc_loss, argnums=(0, 1), has_aux=True))(alpha, beta)
    twin_weights("pc/", space2, p2, k=2)

    # the evaluation network of DARTS-V2 with its auxiliary head, on 32x32 inputs
    net = build_network(DARTS_V2, auxiliary=True, **OPTIONS)
    dp, ds = net.init(jax.random.PRNGKey(5))
    assert dp["aux"]["body"][5]["w"].shape == aux_conv2_kernel().shape
    dp["aux"]["body"][5]["w"] = aux_conv2_kernel()
    x32 = jax.random.normal(jax.random.PRNGKey(6), (2, 32, 32, 3))
    train_out = jax.jit(lambda p, s: net.apply(p, s, x32, Ctx(train=True)))(dp, ds)
    eval_out = jax.jit(lambda p, s: net.apply(p, s, x32, Ctx(train=False)))(dp, ds)

    def unit(prefix, names, leaves):   # convolutions ({"w": ..} or an array) and BatchNorms in order
        for name, leaf in zip(names, leaves, strict=True):
            if isinstance(leaf, dict) and "scale" in leaf:
                put(f"{prefix}{name}/", {"scale": leaf["scale"], "bias": leaf["bias"]})
            else:
                put(f"{prefix}{name}/", {"kernel": leaf["w"] if isinstance(leaf, dict) else leaf})

    def pre(prefix, p):
        if isinstance(p, dict):           # factorized reduce
            unit(prefix, DERIVED_LAYOUT["factorized_reduce"], (p["a"], p["b"], p["bn"]))
        else:                             # (relu, conv, bn)
            unit(prefix, DERIVED_LAYOUT["relu_conv_bn"], (p[1], p[2]))

    put("derived/stem/conv/", {"kernel": dp["stem"][0]["w"]})
    put("derived/stem/bn/", {"scale": dp["stem"][1]["scale"], "bias": dp["stem"][1]["bias"]})
    plan = darts_plan(OPTIONS["channels"], OPTIONS["layers"], 3)
    for i, cell in enumerate(dp["cells"]):
        pre(f"derived/cells/{i}/pre0/", cell["pre0"])
        pre(f"derived/cells/{i}/pre1/", cell["pre1"])
        kind = "reduce" if plan[i].reduction else "normal"
        for j, (op, src) in enumerate(DARTS_V2.cell(kind)):
            e = DARTS_EDGES.index((src, 2 + j // 2))
            p = cell["ops"][j]
            where = f"derived/cells/{i}/edges/{e}/"
            if op.startswith("sep_conv"):
                unit(where, DERIVED_LAYOUT["sep_conv"], (p[1]["dw"], p[1]["pw"], p[2], p[4]["dw"], p[4]["pw"], p[5]))
            elif op.startswith("dil_conv"):
                unit(where, DERIVED_LAYOUT["dil_conv"], (p[1]["dw"], p[1]["pw"], p[2]))
            elif isinstance(p, dict) and "a" in p:    # a skip at stride 2
                pre(where, p)
            else:
                assert not jax.tree_util.tree_leaves(p), (op, p)
    body = dp["aux"]["body"]
    unit("derived/aux/", DERIVED_LAYOUT["aux"], (body[2], body[3], body[5], body[6], dp["aux"]["fc"]))
    put("derived/aux/linear/", {"bias": dp["aux"]["fc"]["b"]})
    put("derived/classifier/", {"kernel": dp["classifier"]["w"], "bias": dp["classifier"]["b"]})
    n_derived = sum(np.size(a) for a in jax.tree_util.tree_leaves(dp))
    assert sum(np.size(v) for k, v in out.items() if k.startswith("derived/")) == n_derived
    del out["derived/aux/conv2/kernel"]                          # aux_conv2_kernel()

    PATH.parent.mkdir(exist_ok=True)
    np.savez_compressed(
        PATH, x=np.asarray(x), y=np.asarray(y), logits=np.asarray(logits), grad_w_norm=norm(g_w),
        bn_abs_sum=float(sum(jnp.sum(jnp.abs(a)) for a in jax.tree_util.tree_leaves(new_state))),
        gdas_logits=np.asarray(gdas_logits), pc_logits=np.asarray(pc_logits), x32=np.asarray(x32),
        derived_logits=np.asarray(train_out.logits), derived_aux_logits=np.asarray(train_out.aux_logits),
        derived_eval_logits=np.asarray(eval_out.logits),
        **{f"alpha/{g}": np.asarray(v) for g, v in alpha.items()},
        **{f"grad_alpha/{g}": np.asarray(v) for g, v in g_a.items()},
        **{f"gdas_grad_alpha/{g}": np.asarray(v) for g, v in gdas_grad.items()},
        **{f"beta/{g}": np.asarray(v) for g, v in beta.items()},
        **{f"pc_grad_alpha/{g}": np.asarray(v) for g, v in pc_ga.items()},
        **{f"pc_grad_beta/{g}": np.asarray(v) for g, v in pc_gb.items()}, **out)


if __name__ == "__main__":
    generate()
