"""Bilevel hypergradient estimators, independent of the relaxation and the space.

``dnas search --hypergrad NAME`` picks one:

==================  ==========================================================  ===============
name                what ``dw*/dφ`` is taken to be                               tunes
==================  ==========================================================  ===============
``first``           zero (DARTS first order)                                    α
``unrolled``        one inner step, exact Hessian-vector product (DARTS 2nd)    α, lr, wd
``unrolled-fd``     one inner step, DARTS's finite difference                   α, lr, wd
``unrolled-k``      K inner steps, reverse mode through all (``steps=K``)       α, lr, wd
``implicit-cg``     implicit function theorem, CG solve (``iters``, ``damping``)  α, wd
``implicit-neumann``  implicit function theorem, Neumann series (``terms``, ``lr``)  α, wd
==================  ==========================================================  ===============

Each estimator is ``estimate(problem, w, opt_state, outer) -> (grad_outer, (val_loss, aux))``
over a :class:`~dnas.hypergrad.base.Bilevel`; :func:`get_hypergrad` binds its options.
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable

from dnas.hypergrad.base import Bilevel, hvp, mixed_vjp, mixed_vjp_fd
from dnas.hypergrad.implicit import conjugate_gradient, implicit_cg, implicit_neumann, neumann_inverse
from dnas.hypergrad.unrolled import first_order, unrolled, unrolled_fd, unrolled_k

ESTIMATORS: dict[str, Callable] = {
    "first": first_order,
    "unrolled": unrolled,
    "unrolled-fd": unrolled_fd,
    "unrolled-k": unrolled_k,
    "implicit-cg": implicit_cg,
    "implicit-neumann": implicit_neumann,
}

#: Which tunable hyperparameters each estimator gives a non-zero hypergradient.
TUNABLE: dict[str, frozenset] = {
    "first": frozenset(),
    "unrolled": frozenset({"lr", "wd"}),
    "unrolled-fd": frozenset({"lr", "wd"}),
    "unrolled-k": frozenset({"lr", "wd"}),
    "implicit-cg": frozenset({"wd"}),
    "implicit-neumann": frozenset({"wd"}),
}

#: Estimators that differentiate the losses once only (no Hessian-vector products, no
#: reverse mode through inner steps).
FIRST_DERIVATIVES_ONLY: frozenset = frozenset({"first", "unrolled-fd"})

_WHY_NOT = {
    ("first", "lr"): "first order holds w fixed, and the learning rate acts on L_val only through w",
    ("first", "wd"): "first order holds w fixed, and weight decay acts on L_val only through w",
    ("implicit-cg", "lr"): "the learning rate does not change the inner optimum w*, so implicit "
                           "differentiation gives it an exactly zero hypergradient",
    ("implicit-neumann", "lr"): "the learning rate does not change the inner optimum w*, so implicit "
                                "differentiation gives it an exactly zero hypergradient",
}


class UnknownHypergradError(ValueError):
    pass


def check_tunable(name: str, tune) -> None:
    """Refuse hyperparameters whose hypergradient ``name`` would silently make zero."""
    unknown = set(tune) - {"lr", "wd"}
    if unknown:
        raise ValueError(f"--tune: unknown hyperparameter(s) {sorted(unknown)}; tunable: lr, wd")
    for h in sorted(tune):
        if h not in TUNABLE[name]:
            ok = sorted(n for n, t in TUNABLE.items() if h in t)
            raise ValueError(f"--tune {h} with --hypergrad {name}: {_WHY_NOT[(name, h)]}; "
                             f"use --hypergrad {' | '.join(ok)}")


def get_hypergrad(name: str, **options) -> Callable:
    """The estimator ``name`` with its options bound; unknown names/options are errors."""
    if name not in ESTIMATORS:
        raise UnknownHypergradError(f"unknown hypergradient estimator {name!r}; "
                                    f"known: {', '.join(ESTIMATORS)}")
    fn = ESTIMATORS[name]
    accepted = set(list(inspect.signature(fn).parameters)[4:])
    bad = set(options) - accepted
    if bad:
        raise ValueError(f"--hypergrad {name} takes option(s) {sorted(accepted) or 'none'}, "
                         f"not {sorted(bad)}")
    return functools.partial(fn, **options) if options else fn


__all__ = ["Bilevel", "ESTIMATORS", "TUNABLE", "UnknownHypergradError", "check_tunable",
           "conjugate_gradient", "get_hypergrad", "hvp", "implicit_cg", "implicit_neumann",
           "mixed_vjp", "mixed_vjp_fd", "neumann_inverse", "first_order", "unrolled",
           "unrolled_fd", "unrolled_k"]
