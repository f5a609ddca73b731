"""The bilevel problem every hypergradient estimator works on, and its derivative kernels.

DNAS is the bilevel problem (DARTS, Liu et al., ICLR 2019, eq. 3-4)::

    min_φ  L_val(w*(φ), φ)    s.t.  w*(φ) = argmin_w  L_train(w, φ) + ½·wd(φ)·‖w‖²

with outer variables ``φ`` = the architecture α and, optionally, hyperparameters of the inner
optimizer (log learning rate, log weight decay). The hypergradient is::

    dL_val/dφ = ∂_φ L_val + (dw*/dφ)ᵀ ∇_w L_val

and the estimators of this package differ only in how they approximate ``dw*/dφ``. They see
the problem through :class:`Bilevel`, a record of pure functions closed over the current
batches and PRNG keys, so the same estimator serves every relaxation and space, on one device
or data parallel (the losses are already averaged over devices).

Second derivatives are never materialised: :func:`hvp` (``∇²_w f · v``) and
:func:`mixed_vjp` (``∂_φ(∇_w f)ᵀ · v = ∇_φ ⟨∇_w f, v⟩``) are both forward-over-reverse:
a ``jax.jvp`` along ``v`` of a reverse-mode gradient, about the cost of two to three gradient
evaluations.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

Tree = Any


class Bilevel(NamedTuple):
    """A bilevel problem at the current inner iterate.

    ``train_loss(w, outer) -> (loss, aux)``
        ``L_train`` on the current training batch, *without* weight decay.
    ``val_loss(w, outer) -> (loss, aux)``
        ``L_val`` on the current validation batch (plus any architecture penalty).
    ``update(grads, w, opt_state, outer) -> (w_new, opt_state_new)``
        One step of the inner optimizer (weight decay, momentum, clipping, learning rate
        included) given ``∇_w L_train``; must be differentiable in ``grads``, ``w`` and
        ``outer`` (the tuned learning rate and weight decay are read from ``outer``).
    ``weight_decay(outer) -> scalar``
        The L2 coefficient of the inner objective, ``½·wd·‖w‖²`` (implicit estimators).
    """

    train_loss: Callable[[Tree, Tree], tuple[jax.Array, Any]]
    val_loss: Callable[[Tree, Tree], tuple[jax.Array, Any]]
    update: Callable[[Tree, Tree, Tree, Tree], tuple[Tree, Tree]]
    weight_decay: Callable[[Tree], jax.Array]

    def inner_objective(self, w, outer) -> jax.Array:
        """``L_train(w, φ) + ½·wd(φ)·‖w‖²``, whose stationary point defines ``w*(φ)``."""
        loss, _ = self.train_loss(w, outer)
        return loss + 0.5 * self.weight_decay(outer) * tree_vdot(w, w)

    def train_grad(self, w, outer) -> Tree:
        """``∇_w L_train(w, φ)`` (what the inner optimizer is fed)."""
        return jax.grad(lambda w_: self.train_loss(w_, outer)[0])(w)


# ---------------------------------------------------------------------- tree arithmetic
def tree_vdot(a: Tree, b: Tree) -> jax.Array:
    """``Σ_leaves ⟨a, b⟩`` in float32."""
    leaves = [jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32))
              for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))]
    return sum(leaves, jnp.zeros((), jnp.float32))


def tree_axpy(alpha, x: Tree, y: Tree) -> Tree:
    """``alpha·x + y`` leafwise."""
    return jax.tree_util.tree_map(lambda a, b: (alpha * a + b).astype(b.dtype), x, y)


def tree_scale(alpha, x: Tree) -> Tree:
    return jax.tree_util.tree_map(lambda a: (alpha * a).astype(a.dtype), x)


def tree_add(*trees: Tree) -> Tree:
    return jax.tree_util.tree_map(lambda *xs: sum(xs[1:], xs[0]), *trees)


def tree_zeros_like(x: Tree) -> Tree:
    return jax.tree_util.tree_map(jnp.zeros_like, x)


def tree_norm(x: Tree) -> jax.Array:
    return jnp.sqrt(tree_vdot(x, x))


# ---------------------------------------------------------------------- derivative kernels
def hvp(f: Callable[[Tree], jax.Array], w: Tree, v: Tree) -> Tree:
    """``∇²f(w)·v`` by forward-over-reverse (Pearlmutter 1994): the directional derivative of
    ``∇f`` along ``v``."""
    return jax.jvp(jax.grad(f), (w,), (v,))[1]


def mixed_vjp(f: Callable[[Tree, Tree], jax.Array], w: Tree, outer: Tree, v: Tree) -> Tree:
    """``(∂_φ ∇_w f(w, φ))ᵀ·v = ∇_φ ⟨∇_w f(w, φ), v⟩``, computed as the directional derivative
    of ``∇_φ f`` along ``v`` in ``w`` (symmetry of mixed partials; forward-over-reverse)."""
    return jax.jvp(lambda w_: jax.grad(f, argnums=1)(w_, outer), (w,), (v,))[1]


def mixed_vjp_fd(f: Callable[[Tree, Tree], jax.Array], w: Tree, outer: Tree, v: Tree,
                 radius: float = 0.01) -> Tree:
    """The finite-difference form of :func:`mixed_vjp` used by DARTS (eq. 8): a central
    difference of ``∇_φ f`` at ``w ± ε·v`` with ``ε = radius/‖v‖``."""
    eps = radius / jnp.maximum(tree_norm(v), 1e-12)
    g_plus = jax.grad(f, argnums=1)(tree_axpy(eps, v, w), outer)
    g_minus = jax.grad(f, argnums=1)(tree_axpy(-eps, v, w), outer)
    return jax.tree_util.tree_map(lambda a, b: (a - b) / (2 * eps), g_plus, g_minus)
