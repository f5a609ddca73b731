"""DrNAS: mixing weights drawn from a learned Dirichlet (Chen et al., ICLR 2021, Sec. 2.2).

DrNAS treats the mixing weights θ of each choice point as a random variable,
``θ ~ Dir(β)``, and learns the concentration β by minimising the expected validation loss
``E_{θ~Dir(β)}[L_val(w, θ)] + λ·d(β, β̂)`` (Sec. 2.2, eq. 2).

* **Concentration.** β must be positive; like the paper we use the shifted ELU
  ``β = elu(α) + 1``, so ``α = 0`` is the uniform ``Dir(1)`` (the anchor β̂ = 1) and the
  DARTS-style initialisation ``α ~ 1e-3·N(0, 1)`` starts every choice point near it. It is
  evaluated as ``α + 1`` / ``exp(α)`` (in float32 ``elu(α) + 1`` rounds to 0 below
  ``α ≈ -17.5``) and floored at ``_MIN_BETA``.
* **Sample.** ``jax.random.dirichlet`` normalises Gamma draws whose gradient w.r.t. the
  concentration is the implicit reparameterisation (pathwise) gradient, the estimator the
  paper relies on (Sec. 2.2; Jankowiak & Obermeyer 2018; Figurnov et al. 2018): ∂θ/∂β is
  exact for the drawn θ, so α is trained by ordinary backprop through ``sample``.
* **Mix.** Dense: ``Σ_o θ_o · o(x)``, every op evaluated, as in DARTS.
* **Evaluation / derivation.** The mean ``E[θ] = β / Σβ``.
* **Penalty.** ``reg_scale · Σ (β - β̂)²`` with ``β̂ = 1`` (the L2 anchor of eq. 2). The default
  ``reg_scale = 0`` is a deliberate choice: the searcher's architecture optimizer already adds
  L2 decay ``1e-3·α`` (``Hyper.a_weight_decay``), which pulls α to 0, i.e. β to the anchor;
  the authors' code implements its default L2 regulariser the same way (Adam
  ``weight_decay=reg_scale=1e-3`` on α). Set ``reg_scale`` (e.g. 1e-3) to add the explicit
  penalty on β on top.

Not included: the paper's progressive partial-channel schedule with op pruning (Sec. 2.4).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dnas.relaxations.base import Relaxation, dense_mix, init_alpha, per_group

_MIN_BETA = 1e-6  # keeps Dir(β) well defined if some α drifts very negative


def concentration(alpha: jax.Array) -> jax.Array:
    """β = elu(α) + 1 > 0 (Sec. 2.2), computed without cancellation for negative α; the inner
    ``where`` keeps ``exp`` finite (and its gradient NaN-free) for large positive α."""
    positive = alpha > 0
    beta = jnp.where(positive, alpha + 1.0, jnp.exp(jnp.where(positive, 0.0, alpha)))
    return jnp.maximum(beta, _MIN_BETA)


def dirichlet_mean(arch: dict) -> dict:
    """E[θ] = β / Σβ per choice point: the deterministic weights and the distribution."""
    out = {}
    for g, a in arch.items():
        beta = concentration(a)
        out[g] = beta / jnp.sum(beta, axis=-1, keepdims=True)
    return out


def sample_dirichlet(arch: dict, key: jax.Array, progress=None) -> dict:
    """θ ~ Dir(β) per choice point, one independent key per group (sorted names);
    reparameterised: gradients flow from θ to α. ``progress`` is unused (no schedule)."""
    return per_group(arch, key, lambda alpha, k: jax.random.dirichlet(k, concentration(alpha)))


def anchor_penalty(arch: dict, reg_scale: float, anchor: float = 1.0) -> jax.Array:
    """``reg_scale · Σ_g Σ (β - anchor)²``: the L2 distance d(β, β̂) of eq. 2."""
    total = sum(jnp.sum((concentration(a) - anchor) ** 2) for a in arch.values())
    return reg_scale * jnp.asarray(total, jnp.float32)


def drnas(reg_scale: float = 0.0, anchor: float = 1.0) -> Relaxation:
    """DrNAS; ``reg_scale`` weights the explicit L2 anchor penalty (0: rely on α's weight decay)."""
    penalty = None if reg_scale == 0 else (lambda arch, progress: anchor_penalty(arch, reg_scale, anchor))
    return Relaxation(name="drnas", init=init_alpha, sample=sample_dirichlet, mix=dense_mix,
                      eval_sample=dirichlet_mean, probs=dirichlet_mean, penalty=penalty)
