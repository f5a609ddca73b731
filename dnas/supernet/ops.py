"""Candidate operations of the DARTS and NAS-Bench-201 search spaces.

DARTS (Liu, Simonyan & Yang, ICLR 2019, Sec. 3 / App. A.1): ``none``, 3x3 max and average
pooling, identity (a factorized reduce at stride 2), separable convolutions 3x3/5x5 (the
ReLU-dwconv-pwconv-BN unit applied twice), dilated separable convolutions 3x3/5x5 (dilation
2, applied once). During search BatchNorm has no affine parameters, and pooling is followed by
an affine-free BN, as in the paper's search code.

NAS-Bench-201 (Dong & Yang, ICLR 2020, Sec. 2.1): ``none``, ``skip_connect``, ReLU-conv-BN
with 1x1 and 3x3 kernels, 3x3 average pooling.
"""
from __future__ import annotations

from typing import Callable

from dnas.supernet import layers as L
from dnas.supernet.genotype import DARTS_OPS, NB201_OPS


class UnknownOpError(ValueError):
    """An operation name that the space does not define."""


def _unknown(name: str, valid) -> UnknownOpError:
    return UnknownOpError(f"unknown operation {name!r}; valid operations are: {', '.join(valid)}")


def _sep_conv(c: int, kernel: int, stride: int, affine: bool, impl) -> L.Layer:
    return L.sequential(
        L.relu(), L.separable_conv(c, c, kernel, stride, 1, impl), L.batchnorm(c, affine),
        L.relu(), L.separable_conv(c, c, kernel, 1, 1, impl), L.batchnorm(c, affine))


def _dil_conv(c: int, kernel: int, stride: int, affine: bool, impl) -> L.Layer:
    return L.sequential(L.relu(), L.separable_conv(c, c, kernel, stride, 2, impl), L.batchnorm(c, affine))


def _pool(pool: L.Layer, c: int, pool_bn: bool) -> L.Layer:
    """Pooling followed by an affine-free BN during search (DARTS's search code), plain pooling
    in the evaluation network."""
    return L.sequential(pool, L.batchnorm(c, False)) if pool_bn else pool


DARTS_OP_BUILDERS: dict[str, Callable[..., L.Layer]] = {
    "none": lambda c, stride, affine, impl, pool_bn: L.zero(stride),
    "max_pool_3x3": lambda c, stride, affine, impl, pool_bn: _pool(L.max_pool(3, stride, 1), c, pool_bn),
    "avg_pool_3x3": lambda c, stride, affine, impl, pool_bn: _pool(L.avg_pool(3, stride, 1), c, pool_bn),
    "skip_connect": lambda c, stride, affine, impl, pool_bn: (L.identity() if stride == 1
                                                              else L.factorized_reduce(c, c, affine)),
    "sep_conv_3x3": lambda c, stride, affine, impl, pool_bn: _sep_conv(c, 3, stride, affine, impl),
    "sep_conv_5x5": lambda c, stride, affine, impl, pool_bn: _sep_conv(c, 5, stride, affine, impl),
    "dil_conv_3x3": lambda c, stride, affine, impl, pool_bn: _dil_conv(c, 3, stride, affine, impl),
    "dil_conv_5x5": lambda c, stride, affine, impl, pool_bn: _dil_conv(c, 5, stride, affine, impl),
}
assert tuple(DARTS_OP_BUILDERS) == DARTS_OPS


def darts_op(name: str, c: int, stride: int, affine: bool = False, impl: str | None = None,
             pool_bn: bool = True) -> L.Layer:
    """One DARTS candidate op mapping ``c`` channels to ``c`` channels at ``stride``.

    Used during search (with ``affine=False`` and pooling followed by BN) and, with
    ``affine=True`` and ``pool_bn=False`` (plain pooling, as in the DARTS evaluation network),
    when retraining a derived network (:mod:`dnas.supernet.derived`).
    """
    if name not in DARTS_OP_BUILDERS:
        raise _unknown(name, DARTS_OPS)
    return DARTS_OP_BUILDERS[name](c, stride, affine, impl, pool_bn)


def nb201_op(name: str, c: int, stride: int = 1, affine: bool = False, impl: str | None = None) -> L.Layer:
    """One NAS-Bench-201 candidate op (``c`` -> ``c`` channels) in dnas's layer kit. The ``nb201``
    space declares its ops as Flax modules (:func:`dnas.supernet.nb201.nb201_op`); these serve the
    layer kit's own tests (mixed ops, the sampled op's backward pass), which the DARTS space runs on."""
    if name == "none":
        return L.zero(stride)
    if name == "skip_connect":
        return L.identity() if stride == 1 else L.factorized_reduce(c, c, affine)
    if name == "nor_conv_1x1":
        return L.relu_conv_bn(c, c, 1, stride, 0, 1, affine)
    if name == "nor_conv_3x3":
        return L.relu_conv_bn(c, c, 3, stride, 1, 1, affine)
    if name == "avg_pool_3x3":
        return L.avg_pool(3, stride, 1)
    raise _unknown(name, NB201_OPS)


def candidate_ops(space: str, names, c: int, stride: int, affine: bool = False, impl: str | None = None) -> list[L.Layer]:
    build = {"darts": darts_op, "nb201": nb201_op}[space]
    return [build(n, c, stride, affine, impl) for n in names]
