"""Extreme eigenvalues of a Hessian, matrix-free: Lanczos on Hessian-vector products.

RobustDARTS (Zela et al., "Understanding and Robustifying Differentiable Architecture Search",
ICLR 2020) observed that DARTS's collapse to parameter-free cells goes with a growing dominant
eigenvalue of the Hessian of the validation loss with respect to the architecture,
``λ_max(∇²_α L_val(w*, α))``: a sharp minimum in α, which the discretisation after the search
leaves badly (their Fig. 4/5). They track it during the search and stop early when it rises
(DARTS-ES, :mod:`dnas.stopping`).

The Hessian is never formed. :func:`lanczos` runs ``m`` steps of the Lanczos iteration with
full re-orthogonalisation, each needing one Hessian-vector product
``H v = ∂/∂ε ∇f(α + εv)`` (forward-over-reverse: one ``jax.jvp`` of ``jax.grad``, about the
cost of two gradients). The eigenvalues of the ``m × m`` tridiagonal matrix (Ritz values)
converge to the extreme eigenvalues of ``H`` first; with ``m`` equal to the dimension they
are exact up to rounding. The iteration is one ``lax.scan``, so the HVP is compiled once
whatever ``m`` is.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree


def lanczos(hvp: Callable[[jax.Array], jax.Array], dim: int, key: jax.Array, iters: int) -> jax.Array:
    """The Ritz values (ascending) of ``iters`` Lanczos steps on the symmetric operator ``hvp``
    of dimension ``dim``, from a random unit start vector drawn with ``key``.

    ``iters`` is capped at ``dim``. On an early breakdown (the Krylov space is invariant:
    ``β_j ≈ 0``) the remaining steps repeat the first Rayleigh quotient with zero coupling, a
    value inside the spectrum, so the extreme Ritz values are those of the invariant space."""
    m = max(1, min(int(iters), int(dim)))
    q0 = jax.random.normal(key, (dim,), jnp.float32)
    q0 = q0 / jnp.linalg.norm(q0)
    basis = jnp.zeros((m + 1, dim), jnp.float32).at[0].set(q0)
    rows = jnp.arange(m + 1)

    def body(carry, j):
        basis, done, first = carry
        q = basis[j]
        w = hvp(q)
        a = jnp.vdot(q, w)
        first = jnp.where(j == 0, a, first)
        for _ in range(2):   # full re-orthogonalisation (twice is enough, Parlett & Kahan)
            coeff = (basis @ w) * (rows <= j)
            w = w - coeff @ basis
        b = jnp.linalg.norm(w)
        breakdown = done | (b <= 1e-6 * jnp.maximum(jnp.abs(a), 1.0))
        basis = basis.at[j + 1].set(jnp.where(breakdown, 0.0, w / jnp.where(b > 0, b, 1.0)))
        a_out = jnp.where(done, first, a)
        b_out = jnp.where(breakdown, 0.0, b)
        return (basis, breakdown, first), (a_out, b_out)

    (_, _, _), (alphas, betas) = jax.lax.scan(body, (basis, jnp.bool_(False), jnp.float32(0.0)), jnp.arange(m))
    tri = jnp.diag(alphas) + jnp.diag(betas[:-1], 1) + jnp.diag(betas[:-1], -1)
    return jnp.linalg.eigvalsh(tri)


def hessian_extremes(f: Callable, x, key: jax.Array, iters: int = 20) -> tuple[jax.Array, jax.Array]:
    """``(λ_max, λ_min)`` of the Hessian of the scalar function ``f`` at the pytree ``x``,
    by :func:`lanczos` with forward-over-reverse Hessian-vector products."""
    flat, unravel = ravel_pytree(x)
    flat = flat.astype(jnp.float32)

    def f_flat(v):
        return f(unravel(v))

    grad = jax.grad(f_flat)

    def hvp(v):
        return jax.jvp(grad, (flat,), (v,))[1].astype(jnp.float32)

    ritz = lanczos(hvp, flat.shape[0], key, iters)
    return ritz[-1], ritz[0]


__all__ = ["lanczos", "hessian_extremes"]
