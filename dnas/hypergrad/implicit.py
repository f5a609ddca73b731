"""Implicit hypergradients: the implicit function theorem at an approximate inner optimum.

At a stationary point of the inner objective ``f(w, φ) = L_train + ½·wd·‖w‖²`` the implicit
function theorem gives ``dw*/dφ = -H⁻¹·∂_φ∇_w f`` with ``H = ∇²_w f``, hence (Pedregosa,
ICML 2016; Lorraine et al., AISTATS 2020, eq. 2-3)::

    dL_val/dφ = ∂_φ L_val - (∂_φ ∇_w f)ᵀ q,     H q = ∇_w L_val

The linear system is solved matrix-free, with Hessian-vector products only: by conjugate
gradient on ``H + δI`` (the damping ``δ`` keeps CG well posed where the network's Hessian is
indefinite), or by the truncated Neumann series ``H⁻¹ ≈ η Σ_{j=0}^{J} (I - ηH)^j`` (Lorraine
et al., Algorithm 3). The current weights stand in for ``w*`` (the search interleaves the
weight steps). A learning rate has no effect on ``w*``, so these estimators give it no
hypergradient (the search refuses to tune it with them).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from dnas.hypergrad.base import (Bilevel, hvp, mixed_vjp, tree_axpy, tree_scale, tree_vdot,
                                 tree_zeros_like)
from dnas.supernet.context import unroll_loops


def _loop(n: int, body, carry, unroll: bool | None):
    """``n`` applications of ``body`` — unrolled at trace time on CPU (XLA:CPU runs backward
    convolutions inside loops far slower, see :func:`dnas.supernet.context.unroll_loops`), a ``fori_loop``
    elsewhere."""
    if unroll_loops(unroll):
        for _ in range(n):
            carry = body(carry)
        return carry
    return lax.fori_loop(0, n, lambda _, c: body(c), carry)


def conjugate_gradient(matvec, b, iters: int, unroll: bool | None = None):
    """``iters`` iterations of CG on ``A x = b`` from x = 0, over pytrees.

    Exact after ``dim`` iterations when ``A`` is symmetric positive definite. If a search
    direction of non-positive curvature (``pᵀAp ≤ 0``) appears — a network's Hessian is
    indefinite — the iteration stops there and keeps the iterate reached so far (Steihaug's
    truncated CG); a residual that has reached zero also stops it (no division by zero).
    """
    def body(c):
        x, r, p, rr, done = c
        ap = matvec(p)
        pap = tree_vdot(p, ap)
        done = done | (pap <= 0) | (rr <= 0)
        alpha = jnp.where(done, 0.0, rr / jnp.where(done, 1.0, pap))
        x = tree_axpy(alpha, p, x)
        r = tree_axpy(-alpha, ap, r)
        rr_new = tree_vdot(r, r)
        beta = jnp.where(done, 0.0, rr_new / jnp.where(done, 1.0, rr))
        p = tree_axpy(beta, p, r)
        return x, r, p, rr_new, done

    x0 = tree_zeros_like(b)
    x, *_ = _loop(iters, body, (x0, b, b, tree_vdot(b, b), jnp.zeros((), bool)), unroll)
    return x


def neumann_inverse(matvec, b, terms: int, lr: float, unroll: bool | None = None):
    """``η Σ_{j=0}^{terms} (I - ηA)^j b`` — converges to ``A⁻¹ b`` when the eigenvalues of
    ``ηA`` lie in (0, 2)."""
    def body(c):
        p, acc = c
        p = tree_axpy(-lr, matvec(p), p)
        return p, jax.tree_util.tree_map(jnp.add, acc, p)

    _, acc = _loop(terms, body, (b, b), unroll)
    return tree_scale(lr, acc)


def _implicit(problem: Bilevel, w, outer, solve):
    (loss, aux), (v_w, v_outer) = jax.value_and_grad(problem.val_loss, argnums=(0, 1), has_aux=True)(w, outer)
    q = solve(lambda v: hvp(lambda w_: problem.inner_objective(w_, outer), w, v), v_w)
    second = mixed_vjp(problem.inner_objective, w, outer, q)
    return jax.tree_util.tree_map(jnp.subtract, v_outer, second), (loss, aux)


def implicit_cg(problem: Bilevel, w, opt_state, outer, iters: int = 10, damping: float = 1.0,
                unroll: bool | None = None):
    """Implicit hypergradient with ``(H + δI) q = ∇_w L_val`` solved by ``iters`` CG steps.

    ``H + δI`` is exactly the Hessian of the proximally regularised inner problem
    ``L_train + ½wd‖w‖² + ½δ‖w - w_t‖²`` (as in iMAML, Rajeswaran et al., NeurIPS 2019), so the
    damping is a regulariser with a meaning, not only a numerical guard: a supernet's Hessian
    has negative curvature of order 0.1-1 early in a search (measured on NB201), where plain
    CG breaks down. ``damping=0`` gives the unregularised implicit gradient for convex inner
    problems (ridge regression in the tests).
    """
    def solve(matvec, b):
        return conjugate_gradient(lambda v: tree_axpy(damping, v, matvec(v)), b, iters, unroll)
    return _implicit(problem, w, outer, solve)


def implicit_neumann(problem: Bilevel, w, opt_state, outer, terms: int = 10, lr: float = 0.01,
                     unroll: bool | None = None):
    """Implicit hypergradient with ``H⁻¹`` replaced by ``terms`` Neumann-series terms of step
    ``lr`` (Lorraine et al. 2020)."""
    return _implicit(problem, w, outer, lambda matvec, b: neumann_inverse(matvec, b, terms, lr, unroll))
