"""Differentiable expected latency and the latency-aware losses of the DNAS literature.

Expected latency
----------------
For an architecture distribution ``p`` — ``{group: (num_choice_points, num_ops)}``, the
relaxation's ``probs(arch)`` (softmax for DARTS; a Gumbel sample, the ProxylessNAS gates or
PC-DARTS' edge-weighted probabilities when the search uses those) — and a latency matrix
from :func:`dnas.latency.space_latency.latency_matrix`,

    E[LAT](α) = LAT_fixed + Σ_groups Σ_choice points Σ_ops p(op | α) · LAT(op)

(ProxylessNAS, Cai, Zhu & Han, ICLR 2019, Sec. 3.3 "Handling non-differentiable hardware
metrics": ``E[latency] = Σ_i E[latency_i]`` with ``E[latency_i] = Σ_j p_j^i · F(o_j^i)``;
FBNet, Wu et al., CVPR 2019, Sec. 3.2: the architecture's latency is the sum of its
layers' table latencies, weighted by the Gumbel-softmax mask during search). It is linear in ``p``, so its gradient w.r.t. α
flows through whatever produced ``p``.

Latency losses
--------------
Every form maps ``(ce, lat)`` — the task loss (cross-entropy) and the expected latency in
ms — to the total architecture loss (:func:`latency_penalty` builds one by name):

``fbnet``            ``CE · β · log(LAT)^γ``                     FBNet, Wu et al., CVPR 2019, Eq. 2
                      (there ``α·log(LAT)^β``; defaults β = 0.2, γ = 0.6 as in jh88/fbnet);
``additive``         ``CE + λ · LAT``                             ProxylessNAS, Cai et al., ICLR 2019,
                                                                  Sec. 3.3 (``+ λ₂·E[latency]``);
``additive_relative`` ``CE + λ · (LAT − T) / T``                  ProxylessNAS' released code
                                                                  (``grad_reg_loss_type = "add#linear"``);
``multiplicative``   ``CE · (LAT / T)^w``                         the loss-space form of MnasNet's
                      soft objective ``ACC · (LAT/T)^w`` (Tan et al., CVPR 2019, Eq. 2, with w = −0.07;
                      here the exponent is applied to the loss, so a positive w = 0.07 penalises
                      LAT > T and rewards LAT < T); ``w_above`` may differ for LAT > T (MnasNet's
                      α/β pair, Eq. 2: hard-ish constraint with β ≪ α);
``mul_log``          ``α · CE · (log LAT / log T)^β``             ProxylessNAS' released code
                                                                  (``"mul#log"``; defaults α = 1, β = 0.6);
``hinge``            ``CE + λ · max(0, LAT / T − 1)``             a one-sided penalty that is zero
                                                                  under the target (cf. the clipped
                                                                  resource losses of TuNAS, Bender et al.,
                                                                  CVPR 2020, Eq. 1, which uses |·| − 1).

The log forms need ``LAT > 1`` in the table's unit; ``unit_ms`` rescales (``unit_ms=1e-3``:
microseconds, jh88/fbnet's convention). ``log`` is clipped at a tiny positive value so a
latency under one unit gives a finite (flat) loss instead of NaN.
"""
from __future__ import annotations

import inspect
from typing import Callable, Mapping

import jax.numpy as jnp

_EPS = 1e-6


class UnknownLatencyLossError(ValueError):
    """A latency-loss name that is not registered."""


def expected_latency(probs: Mapping, matrix: Mapping, fixed_ms=0.0):
    """``fixed_ms + Σ_g Σ_i Σ_j probs[g][i, j] · matrix[g][i, j]`` (a differentiable scalar).

    ``probs`` and ``matrix`` must have the same groups and shapes (every group of the
    space; a relaxation that adds leaves passes its ``probs(arch)``).
    """
    if set(probs) != set(matrix):
        raise ValueError(f"expected_latency: probability groups {sorted(probs)} do not match the latency "
                         f"matrix groups {sorted(matrix)}")
    total = jnp.asarray(fixed_ms, jnp.float32)
    for g in sorted(matrix):
        p, m = jnp.asarray(probs[g]), jnp.asarray(matrix[g], jnp.float32)
        if p.shape != m.shape:
            raise ValueError(f"expected_latency: group {g!r} has probabilities of shape {p.shape} but a latency "
                             f"matrix of shape {m.shape}")
        total = total + jnp.sum(p.astype(jnp.float32) * m)
    return total


def _log(lat, unit_ms):
    return jnp.log(jnp.maximum(lat / unit_ms, 1.0 + _EPS))


def fbnet_loss(ce, lat, weight: float = 0.2, exponent: float = 0.6, unit_ms: float = 1.0):
    """FBNet (Wu et al., CVPR 2019, Eq. 2): ``CE · weight · log(LAT/unit)^exponent``."""
    return ce * weight * _log(lat, unit_ms) ** exponent


def additive_loss(ce, lat, weight: float):
    """ProxylessNAS (Cai et al., ICLR 2019, Sec. 3.3): ``CE + weight · LAT`` (LAT in ms)."""
    return ce + weight * lat


def additive_relative_loss(ce, lat, target: float, weight: float = 0.1):
    """ProxylessNAS' code (``add#linear``): ``CE + weight · (LAT − target) / target``."""
    return ce + weight * (lat - target) / target


def multiplicative_loss(ce, lat, target: float, weight: float = 0.07, weight_above: float | None = None):
    """MnasNet's soft objective (Tan et al., CVPR 2019, Eq. 2) as a loss: ``CE · (LAT/target)^w``
    with ``w = weight`` when ``LAT ≤ target`` and ``w = weight_above`` (default ``weight``)
    above it."""
    ratio = lat / target
    w = weight if weight_above is None else jnp.where(ratio <= 1.0, weight, weight_above)
    return ce * ratio ** w


def mul_log_loss(ce, lat, target: float, weight: float = 1.0, exponent: float = 0.6, unit_ms: float = 1.0):
    """ProxylessNAS' code (``mul#log``): ``weight · CE · (log LAT / log target)^exponent``."""
    ref = jnp.log(jnp.maximum(target / unit_ms, 1.0 + _EPS))
    return weight * ce * (_log(lat, unit_ms) / ref) ** exponent


def hinge_loss(ce, lat, target: float, weight: float = 1.0):
    """``CE + weight · max(0, LAT/target − 1)``: no penalty under the target."""
    return ce + weight * jnp.maximum(0.0, lat / target - 1.0)


#: name -> loss function ``(ce, lat, **params) -> total loss``.
LATENCY_LOSSES: dict[str, Callable] = {
    "fbnet": fbnet_loss,
    "additive": additive_loss,
    "additive_relative": additive_relative_loss,
    "multiplicative": multiplicative_loss,
    "mul_log": mul_log_loss,
    "hinge": hinge_loss,
}


def latency_penalty(name: str, **params) -> Callable:
    """The latency loss ``name`` with its parameters bound: returns ``fn(ce, lat) -> loss``.

    Parameters are the keyword arguments of the loss function (``weight``, ``target``,
    ``exponent``, ``unit_ms``, ``weight_above``); ``None`` values are dropped so CLI flags
    left unset fall back to the defaults. An unknown name, an unknown parameter or a missing
    required one (e.g. ``target`` for ``hinge``) raises a ``ValueError`` naming it.
    """
    if name not in LATENCY_LOSSES:
        raise UnknownLatencyLossError(f"unknown latency loss {name!r}; available: {', '.join(sorted(LATENCY_LOSSES))}")
    fn = LATENCY_LOSSES[name]
    sig = inspect.signature(fn)
    accepted = [p for p in sig.parameters if p not in ("ce", "lat")]
    params = {k: v for k, v in params.items() if v is not None}
    bad = sorted(set(params) - set(accepted))
    if bad:
        raise ValueError(f"latency loss {name!r} has no parameter(s) {bad}; parameters: {accepted}")
    missing = [p for p in accepted if sig.parameters[p].default is inspect.Parameter.empty and p not in params]
    if missing:
        raise ValueError(f"latency loss {name!r} needs parameter(s) {missing} "
                         f"(e.g. --latency-target MS for 'target', --latency-weight for 'weight')")
    for k in ("target", "unit_ms"):
        if k in params and not params[k] > 0:
            raise ValueError(f"latency loss {name!r}: {k} must be > 0, got {params[k]}")

    def loss(ce, lat):
        return fn(ce, lat, **params)

    loss.__name__ = f"{name}_latency_loss"
    loss.params = dict(params)  # type: ignore[attr-defined]
    return loss
