"""``pinned(t)``: ``t`` stored once, through a product with the identity matrix.

XLA:CPU fuses cheap elementwise expressions into every consumer instead of storing them, and
when such fusions grow large it may give up and store every operand instead. A dot is a
library call that XLA neither fuses nor simplifies away, so ``t @ I`` (exact at ``HIGHEST``
precision, ``2·C`` FLOPs per element) makes ``t`` one fusion of its own, stored once. Its
transpose is the same product, so the pin holds for the cotangent in the backward pass too.
Used for the cell nodes' sums (:func:`dnas.supernet.mixed._node_sum`) and for a depthwise
convolution's input gradient (:mod:`dnas.supernet.depthwise`); ``docs/benchmarks.md``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def pinned(t: jax.Array) -> jax.Array:
    c = t.shape[-1]
    return jnp.einsum("...c,cd->...d", t, jnp.eye(c, dtype=t.dtype), precision=lax.Precision.HIGHEST)
