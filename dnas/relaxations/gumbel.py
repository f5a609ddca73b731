"""Gumbel-softmax relaxations: GDAS (hard, straight-through) and SNAS (soft).

Both perturb the log-probabilities ``log softmax(α)`` of every choice point with independent
Gumbel(0, 1) noise ``g`` and take ``softmax((log π + g) / τ)`` — the concrete / Gumbel-softmax
distribution (Jang et al. 2017; Maddison et al. 2017) — with a temperature ``τ`` annealed over
the search (``progress`` ∈ [0, 1]).

* **GDAS** (Dong & Yang, CVPR 2019, Sec. 3.2, eq. 5-7): the forward pass uses the hard
  one-hot ``h = one_hot(argmax(log π + g))``; gradients use the soft sample through the
  straight-through estimator ``w = h - sg(s) + s``. Only the sampled operation is computed
  on each edge (``Candidates.one``): its output is scaled by ``w[i]`` (value 1), so α receives
  ``∂L/∂w_i · ∂s_i/∂α`` for the sampled ``i``. ``τ`` falls linearly from 10 to 0.1.
  ``sampled_only=False`` computes every op (``Σ_j w_j o_j(x)``, still hard in the forward),
  which gives the full straight-through gradient at dense cost — for analysis and tests.
* **SNAS** (Xie et al., ICLR 2019, Sec. 2.2, eq. 2): the soft sample ``s`` weights every op
  (all computed); ``τ`` decays geometrically from 1.0 to 0.03.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dnas.relaxations.base import Relaxation, dense_mix, init_alpha, per_group, softmax_probs

_EPS = 1e-6


def gumbel_noise(key: jax.Array, shape) -> jax.Array:
    """Gumbel(0, 1) noise ``-log(-log u)``, ``u`` uniform clipped to ``[ε, 1-ε]`` so that the
    noise is always finite (``|g| ≤ ~14.5``)."""
    u = jax.random.uniform(key, shape, jnp.float32, minval=_EPS, maxval=1.0 - _EPS)
    return -jnp.log(-jnp.log(u))


def linear_tau(tau_max: float, tau_min: float):
    return lambda progress: tau_max - (tau_max - tau_min) * progress


def geometric_tau(tau_max: float, tau_min: float):
    return lambda progress: tau_max * (tau_min / tau_max) ** progress


def gumbel_softmax(alpha: jax.Array, key: jax.Array, tau) -> tuple[jax.Array, jax.Array]:
    """Soft sample ``softmax((log softmax(α) + g) / τ)`` and the perturbed logits."""
    logits = jax.nn.log_softmax(alpha, axis=-1) + gumbel_noise(key, alpha.shape)
    return jax.nn.softmax(logits / tau, axis=-1), logits


def straight_through(soft: jax.Array, index: jax.Array) -> jax.Array:
    """Hard one-hot in the forward pass, the gradient of ``soft`` in the backward pass."""
    hard = jax.nn.one_hot(index, soft.shape[-1], dtype=soft.dtype)
    return hard - jax.lax.stop_gradient(soft) + soft


def _sampled_mix(sample, candidates, x):
    y, state = candidates.one(sample["index"], x)
    return sample["weights"][sample["index"]].astype(y.dtype) * y, state


def _hard_dense_mix(sample, candidates, x):
    return dense_mix(sample["weights"], candidates, x)


def gdas(tau_max: float = 10.0, tau_min: float = 0.1, sampled_only: bool = True) -> Relaxation:
    tau = linear_tau(tau_max, tau_min)

    def sample(arch, key, progress):
        def one(alpha, k):
            soft, logits = gumbel_softmax(alpha, k, tau(progress))
            index = jnp.argmax(logits, axis=-1)
            return {"weights": straight_through(soft, index), "index": index.astype(jnp.int32)}
        return per_group(arch, key, one)

    def eval_sample(arch):
        def one(alpha):
            index = jnp.argmax(alpha, axis=-1).astype(jnp.int32)
            return {"weights": jax.nn.one_hot(index, alpha.shape[-1]), "index": index}
        return {g: one(a) for g, a in arch.items()}

    return Relaxation(name="gdas", init=init_alpha, sample=sample,
                      mix=_sampled_mix if sampled_only else _hard_dense_mix,
                      eval_sample=eval_sample, probs=softmax_probs)


def snas(tau_max: float = 1.0, tau_min: float = 0.03) -> Relaxation:
    tau = geometric_tau(tau_max, tau_min)

    def sample(arch, key, progress):
        return per_group(arch, key, lambda alpha, k: gumbel_softmax(alpha, k, tau(progress))[0])

    return Relaxation(name="snas", init=init_alpha, sample=sample, mix=dense_mix,
                      eval_sample=softmax_probs, probs=softmax_probs)
