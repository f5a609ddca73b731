"""``pinned(t)``: ``t`` stored once, through a product with the identity matrix.

XLA:CPU fuses cheap elementwise expressions into every consumer instead of storing them, and
when such fusions grow large it may give up and store every operand instead. A dot is a
library call that XLA neither fuses nor simplifies away, so ``t @ I`` (exact at ``HIGHEST``
precision, ``2·C`` FLOPs per element) makes ``t`` one fusion of its own, stored once. Its
transpose is the same product, so the pin holds for the cotangent in the backward pass too.
Used for the cell nodes' sums (:func:`dnas.supernet.mixed.node_sum`), for a depthwise
convolution's input gradient (:mod:`dnas.kernels.cpu.depthwise`) and, on the CPU, for BatchNorm's
output (:func:`dnas.kernels.dispatch.batch_normalize`); ``docs/benchmarks.md``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def pinned(t: jax.Array, group: int | None = None) -> jax.Array:
    """``t``, stored once. ``group``: the identity is applied to blocks of ``group`` channels
    (``2·group`` FLOPs per element instead of ``2·C``), which pins just as well: the dot is what
    XLA does not fuse, not its width. Where ``group`` does not divide the last axis, the whole
    axis is one block."""
    c = t.shape[-1]
    g = c if group is None or c % group else group
    blocks = t.reshape(t.shape[:-1] + (c // g, g))
    out = jnp.einsum("...c,cd->...d", blocks, jnp.eye(g, dtype=t.dtype), precision=lax.Precision.HIGHEST)
    return out.reshape(t.shape)
