"""ProxylessNAS binary gates (Cai, Zhu & Han, ICLR 2019, Sec. 3.2, eq. 3-4).

Per choice point, with path probabilities ``p = softmax(α)``:

1. sample two distinct candidate paths ``i, j`` from the multinomial ``p`` (without
   replacement, by the Gumbel top-2 trick);
2. over those two, the rescaled probabilities ``p' = softmax(α_i, α_j)`` pick the active
   path; its binary gate is 1, the other's 0;
3. only the two sampled ops are computed (``Candidates.one`` each); the output is
   ``g_i·o_i(x) + g_j·o_j(x)`` = the active path's output, so only its weights get gradients;
4. α gets the BinaryConnect-style gradient through the gates, rescaled to the two paths
   (eq. 4 restricted to them): ``∂L/∂α_k = Σ_{m∈{i,j}} ∂L/∂g_m · p'_m (δ_km − p'_k)`` for
   ``k ∈ {i, j}``, 0 for the other ops. This is the straight-through form
   ``g = hard − sg(p') + p'``.

Memory therefore stays at two paths per choice point whatever the number of candidates.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dnas.relaxations.base import Relaxation, init_alpha, per_group, softmax_probs
from dnas.relaxations.gumbel import gumbel_noise


def _sample_group(alpha: jax.Array, key: jax.Array) -> dict:
    k_paths, k_active = jax.random.split(key)
    logp = jax.nn.log_softmax(alpha, axis=-1)
    _, paths = jax.lax.top_k(logp + gumbel_noise(k_paths, alpha.shape), 2)      # (n, 2) distinct
    pair = jnp.take_along_axis(alpha, paths, axis=-1)                             # α_i, α_j
    p2 = jax.nn.softmax(pair, axis=-1)                                            # rescaled p'
    active = jax.random.bernoulli(k_active, jax.lax.stop_gradient(p2[..., 1])).astype(jnp.int32)
    hard = jax.nn.one_hot(active, 2, dtype=p2.dtype)
    gates = hard - jax.lax.stop_gradient(p2) + p2
    return {"paths": paths.astype(jnp.int32), "gates": gates}


def _two_path_mix(sample, candidates, x):
    y0, state = candidates.one(sample["paths"][0], x)
    y1, state = candidates.one(sample["paths"][1], x, state)
    g = sample["gates"].astype(y0.dtype)
    return g[0] * y0 + g[1] * y1, state


def proxyless() -> Relaxation:
    def sample(arch, key, progress):
        return per_group(arch, key, _sample_group)

    def eval_sample(arch):
        out = {}
        for g, a in arch.items():
            best = jnp.argmax(a, axis=-1).astype(jnp.int32)
            out[g] = {"paths": jnp.stack([best, best], -1),
                      "gates": jnp.tile(jnp.asarray([1.0, 0.0]), a.shape[:-1] + (1,))}
        return out

    return Relaxation(name="proxyless", init=init_alpha, sample=sample, mix=_two_path_mix,
                      eval_sample=eval_sample, probs=softmax_probs)
