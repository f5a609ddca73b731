"""Convolutions inside control flow on XLA:CPU: six 3x3 convolutions, unrolled vs
``lax.scan`` vs ``fori_loop`` vs each conv inside a ``lax.switch``.

Prints one JSON object with median times (ms) of the forward pass and of the gradient
w.r.t. input and weights, for each form. On XLA:CPU the backward convolutions inside a while
loop (scan/fori) or a conditional (switch) are 10-500x slower than at the top level, while the
forward convolution is not; this is why dnas unrolls its loops on CPU, and why a sampled
relaxation (GDAS) that selects its op with ``lax.switch`` is slow there.
Run: ``python benchmarks/bench_scan_conv.py``.
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dnas.bench import median_ms


def _conv(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))


def unrolled(x, w):
    for i in range(w.shape[0]):
        x = jax.nn.relu(_conv(x, w[i]))
    return x


def scanned(x, w):
    return lax.scan(lambda h, wi: (jax.nn.relu(_conv(h, wi)), None), x, w)[0]


def scanned_branch(x, w):
    """``scanned`` with :func:`dnas.kernels.cpu.branch_conv.conv2d` (backward pass written as
    forward-style convolutions)."""
    from dnas.kernels.cpu.branch_conv import conv2d
    return lax.scan(lambda h, wi: (jax.nn.relu(conv2d(h, wi, 1, 1, 1)), None), x, w)[0]


def fori(x, w):
    return lax.fori_loop(0, w.shape[0], lambda i, h: jax.nn.relu(_conv(h, w[i])), x)


def switched(x, w):
    index = (w[:, 0, 0, 0, 0] * 0).astype(jnp.int32)  # traced (always 0): a real conditional
    for i in range(w.shape[0]):
        x = lax.switch(index[i], [lambda h, wi=w[i]: jax.nn.relu(_conv(h, wi)), lambda h: h * 0.5], x)
    return x


def main(batch=64, size=32, channels=16, layers=6):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, size, size, channels)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((layers, 3, 3, channels, channels)), jnp.float32) * 0.1
    result = {"device_kind": jax.devices()[0].device_kind, "jax_version": jax.__version__,
              "shape": [batch, size, size, channels], "layers": layers}
    for name, f in (("unrolled", unrolled), ("scan", scanned), ("scan_branch_conv", scanned_branch), ("fori_loop", fori), ("switch", switched)):
        loss = lambda x, w, f=f: jnp.sum(f(x, w) ** 2)  # noqa: E731
        result[name] = {"fwd_ms": median_ms(jax.jit(f), x, w),
                        "grad_x_ms": median_ms(jax.jit(jax.grad(loss, argnums=0)), x, w),
                        "grad_w_ms": median_ms(jax.jit(jax.grad(loss, argnums=1)), x, w)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
