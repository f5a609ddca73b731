"""Hypergradients through unrolled inner steps: first order, DARTS second order, K-step TBPTT.

All estimators share the signature ``estimate(problem, w, opt_state, outer) ->
(grad_outer, (val_loss, val_aux))`` (see :class:`~dnas.hypergrad.base.Bilevel`).
"""
from __future__ import annotations

import jax

from dnas.hypergrad.base import Bilevel, mixed_vjp, mixed_vjp_fd, tree_add


def first_order(problem: Bilevel, w, opt_state, outer):
    """``∂_φ L_val(w, φ)``: ``w`` held fixed (DARTS eq. 6 with ξ = 0). Gives exactly zero for
    outer variables that only act through ``w`` (learning rate, weight decay)."""
    (loss, aux), g = jax.value_and_grad(problem.val_loss, argnums=1, has_aux=True)(w, outer)
    return g, (loss, aux)


def _one_step(problem: Bilevel, w, opt_state, outer, mixed):
    """``d/dφ L_val(w'(φ), φ)`` for one inner step ``w' = U(G(φ), φ)``, ``G = ∇_w L_train``.

    By the chain rule, with ``v = ∇_{w'} L_val(w', φ)`` and ``(u_G, u_φ) = (∂U/∂G, ∂U/∂φ)ᵀ v``
    (a cheap vector-Jacobian product of the optimizer update alone)::

        dL_val/dφ = ∂_φ L_val(w', φ) + u_φ + (∂_φ G)ᵀ u_G

    and the last term is the mixed second derivative ``∇_φ⟨∇_w L_train, u_G⟩`` evaluated by
    ``mixed`` (exactly, or by DARTS's finite difference). For plain SGD ``u_G = -ξ·v`` and
    this is DARTS eq. 7.
    """
    g_train = problem.train_grad(w, outer)
    w_new, vjp_update = jax.vjp(lambda g, o: problem.update(g, w, opt_state, o)[0], g_train, outer)
    (loss, aux), (v_w, v_outer) = jax.value_and_grad(problem.val_loss, argnums=(0, 1), has_aux=True)(w_new, outer)
    u_g, u_outer = vjp_update(v_w)
    second = mixed(lambda w_, o: problem.train_loss(w_, o)[0], w, outer, u_g)
    return tree_add(v_outer, u_outer, second), (loss, aux)


def unrolled(problem: Bilevel, w, opt_state, outer):
    """DARTS second order (Liu et al. 2019, eq. 7) with the exact Hessian-vector product
    (forward-over-reverse, :func:`~dnas.hypergrad.base.mixed_vjp`), through the real inner
    update (momentum, weight decay, clipping, learning rate)."""
    return _one_step(problem, w, opt_state, outer, mixed_vjp)


def unrolled_fd(problem: Bilevel, w, opt_state, outer, radius: float = 0.01):
    """As :func:`unrolled`, with DARTS's finite-difference approximation of the mixed term
    (eq. 8, ``ε = 0.01/‖v‖``), kept for comparison with published numbers."""
    return _one_step(problem, w, opt_state, outer,
                     lambda f, w_, o, v: mixed_vjp_fd(f, w_, o, v, radius))


def unrolled_k(problem: Bilevel, w, opt_state, outer, steps: int = 2):
    """Truncated back-propagation through ``steps`` inner optimizer steps (on the current
    training batch), then ``∇_φ L_val(w_K(φ), φ)`` by reverse mode through all of them.
    ``steps=1`` equals :func:`unrolled`; for the learning rate it is online hypergradient
    descent (Baydin et al., ICLR 2018)."""
    if steps < 1:
        raise ValueError(f"unrolled-k needs at least one inner step, got {steps}")

    def objective(o):
        w_k, s_k = w, opt_state
        for _ in range(steps):  # short and static: unrolled at trace time
            w_k, s_k = problem.update(problem.train_grad(w_k, o), w_k, s_k, o)
        return problem.val_loss(w_k, o)

    (loss, aux), g = jax.value_and_grad(objective, has_aux=True)(outer)
    return g, (loss, aux)
