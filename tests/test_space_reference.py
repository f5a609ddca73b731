"""Each built-in space is one module whose supernet, stand-alone network and latency walk follow
from one description (dnas.supernet.nb201, .darts, .chain). These reference values were computed
by the code before that change (commit cc72bf6, where the three were written apart in spaces.py,
derived.py and space_latency.py): for fixed weights and α the supernets must give the same
logits, gradients and BatchNorm statistics, the derived networks the same logits and the latency
walks the same table keys.

Regenerate (only when a change of numbers is intended): ``python tests/test_space_reference.py``.
The DARTS space and the chain take about a minute each and run under ``-m slow``.
"""
from __future__ import annotations

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dnas.latency.space_latency import describe_space
from dnas.relaxations.base import dense_mix
from dnas.supernet.derived import build_network
from dnas.supernet.genotype import DARTS_V2, ChainGenotype, parse_nb201
from dnas.supernet.layers import Ctx
from dnas.supernet.spaces import build_space

CONFIGS = {"nb201": dict(channels=4, cells_per_stage=2, num_classes=5),
           "darts": dict(channels=4, layers=3, num_classes=5, impl="dense"),
           "chain": dict(width_mult=0.25, stage_depths=(2, 1, 1, 1, 1, 1), stem_stride=1, num_classes=5)}
NB201_CELL = "|nor_conv_3x3~0|+|none~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_1x1~1|nor_conv_3x3~2|"


def _norm(tree) -> float:
    return float(jnp.sqrt(sum(jnp.sum(jnp.square(a)) for a in jax.tree_util.tree_leaves(tree))))


def fingerprint(name: str) -> dict:
    space = build_space(name, **CONFIGS[name])
    params, state = space.init(jax.random.PRNGKey(1))
    x = jax.random.normal(jax.random.PRNGKey(2), (4, 8, 8, 3))
    y = jnp.arange(4) % 5
    alpha = {g: jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(3), i), shape)
             for i, (g, shape) in enumerate(sorted(space.groups.items()))}

    @jax.jit
    def loss(p, a):
        w = {g: jax.nn.softmax(v, -1) for g, v in a.items()}
        logits, st = space.apply(p, state, x, w, dense_mix, Ctx(train=True))
        return jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), y]), (logits, st)

    (_, (logits, new_state)), (g_w, g_a) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, alpha)
    keys = describe_space(space, input_size=8).keys()
    if name == "chain":
        genotype = ChainGenotype([space.group_op_names(g)[(i * 3) % len(space.group_op_names(g))]
                                  for i, (g, *_r) in enumerate(space.blocks)])
        net, xd = build_network(genotype, **CONFIGS[name]), x
    elif name == "darts":   # the auxiliary head needs 32x32 inputs
        net = build_network(DARTS_V2, auxiliary=True, **CONFIGS[name])
        xd = jax.random.normal(jax.random.PRNGKey(2), (2, 32, 32, 3))
    else:
        net, xd = build_network(parse_nb201(NB201_CELL), **CONFIGS[name]), x
    p, s = net.init(jax.random.PRNGKey(5))
    out = jax.jit(lambda p, s, x: net.apply(p, s, x, Ctx(train=True)))(p, s, xd)
    return {"logits": np.asarray(logits).tolist(), "grad_w": _norm(g_w), "grad_alpha": _norm(g_a),
            "bn_abs_sum": float(sum(jnp.sum(jnp.abs(a)) for a in jax.tree_util.tree_leaves(new_state))),
            "latency_keys": [len(keys), hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]],
            "derived_logits": np.asarray(out.logits).tolist(),
            "derived_aux": None if out.aux_logits is None else float(jnp.sum(out.aux_logits))}


#: computed at cc72bf6 by ``python tests/test_space_reference.py``
REFERENCE = {'chain': {'bn_abs_sum': 9735.07421875,
           'derived_aux': None,
           'derived_logits': [[-0.37742072343826294, 0.35679519176483154, -0.10726194828748703,
                               0.28827226161956787, 0.48702871799468994],
                              [-0.9941157102584839, 0.17851288616657257, -0.2648046314716339,
                               0.362845242023468, 0.01516430452466011],
                              [-0.7368916869163513, -0.13080698251724243, -0.4155818223953247,
                               -0.06992018222808838, -0.5317413210868835],
                              [-0.35946041345596313, 0.3454176187515259, -0.5768462419509888,
                               0.6662904620170593, 0.032358620315790176]],
           'grad_alpha': 38.98575973510742,
           'grad_w': 796.4783325195312,
           'latency_keys': [46, '4b26df40a5da87a4'],
           'logits': [[0.522525429725647, 0.19502118229866028, -0.24176153540611267, -0.4684982895851135,
                       0.39490556716918945],
                      [-0.039432041347026825, 0.7215772867202759, 0.19201482832431793, 0.16145434975624084,
                       0.2810419499874115],
                      [0.557651162147522, -0.12988080084323883, -0.4786098301410675, -0.6403524279594421,
                       0.345622181892395],
                      [0.12048611789941788, 0.018466424196958542, -0.6127246022224426, -0.1434604972600937,
                       0.18113243579864502]]},
 'darts': {'bn_abs_sum': 3425.00341796875,
           'derived_aux': 0.5081237554550171,
           'derived_logits': [[2.217736005783081, -2.336153507232666, 1.2071075439453125, -0.827413022518158,
                               -1.5698717832565308],
                              [2.131298780441284, -2.1688947677612305, 0.7787439227104187, -1.066498041152954,
                               -1.446398138999939]],
           'grad_alpha': 0.5906014442443848,
           'grad_w': 7.158409595489502,
           'latency_keys': [54, '3fff4b43f99b49d2'],
           'logits': [[0.7990235090255737, 0.3046317398548126, -0.33053889870643616, -0.4813244342803955,
                       -0.07009562849998474],
                      [-0.397981733083725, 0.4670080542564392, 0.30111420154571533, 1.4955790042877197,
                       -0.1312943696975708],
                      [-0.48445597290992737, -0.3142167329788208, -0.09366624057292938, 0.2678043842315674,
                       0.09536181390285492],
                      [0.5580382347106934, 0.0270053893327713, 0.20759302377700806, -0.8974834084510803,
                       0.30778831243515015]]},
 'nb201': {'bn_abs_sum': 760.0431518554688,
           'derived_aux': None,
           'derived_logits': [[0.09232749044895172, -0.04328829050064087, 0.9082110524177551,
                               0.4316239356994629, 0.43466871976852417],
                              [0.01492360234260559, -0.048720382153987885, 0.4530760645866394,
                               0.0997290313243866, 0.20879757404327393],
                              [0.14457295835018158, -0.056307658553123474, 0.8628753423690796,
                               -0.009280279278755188, 0.20350398123264313],
                              [-0.07304108142852783, -0.26671791076660156, 0.6613584756851196,
                               0.3057206869125366, 0.3670686185359955]],
           'grad_alpha': 0.4614033102989197,
           'grad_w': 3.9634463787078857,
           'latency_keys': [22, '5751f5e0af79d333'],
           'logits': [[0.21081335842609406, 0.049139171838760376, 0.23151278495788574, -0.2762262225151062,
                       -0.3552395701408386],
                      [0.3030111789703369, 0.0775156021118164, 0.32456710934638977, 0.5017679333686829,
                       0.10636943578720093],
                      [0.48241502046585083, -0.01902129501104355, 0.24035778641700745, -0.242783784866333,
                       -0.5837982296943665],
                      [0.37769028544425964, -0.3481605052947998, 0.5958569645881653, 0.1160670816898346,
                       0.3596683740615845]]}}


@pytest.mark.parametrize("name", ["nb201", pytest.param("darts", marks=pytest.mark.slow),
                                  pytest.param("chain", marks=pytest.mark.slow)])
def test_space_gives_the_numbers_of_the_code_before_one_description(name):
    ref, got = REFERENCE[name], fingerprint(name)
    # the reference ran at XLA's default optimisation level, the tests at a lower one (conftest):
    # float reassociation moves logits by ~1e-4; a different op or weight moves them by > 1e-2
    np.testing.assert_allclose(got["logits"], ref["logits"], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(got["derived_logits"], ref["derived_logits"], rtol=1e-3, atol=1e-3)
    for k in ("grad_w", "grad_alpha", "bn_abs_sum"):
        assert got[k] == pytest.approx(ref[k], rel=1e-3), k
    if ref["derived_aux"] is None:
        assert got["derived_aux"] is None
    else:   # a sum of 10 logits
        assert got["derived_aux"] == pytest.approx(ref["derived_aux"], abs=1e-2)
    assert got["latency_keys"] == ref["latency_keys"]


if __name__ == "__main__":
    import json
    import pprint
    print("REFERENCE = " + pprint.pformat(json.loads(json.dumps({n: fingerprint(n) for n in CONFIGS})),
                                          width=110, compact=True))
