"""Separable convolutions (ReLU, depthwise kxk, pointwise 1x1) on XLA:CPU, three formulations.

* ``grouped``: XLA's grouped convolution (``feature_group_count=C``), then the pointwise conv.
* ``dense``: one dense kxk convolution with the kernel ``dw[i,j,c] * pw[c,o]``
  (``layers.separable_conv(impl="dense")``).
* ``views``: the depthwise convolution as shifted views (``dnas.kernels.cpu.depthwise``), then
  the pointwise conv as a matrix product (what ``impl="auto"`` runs on CPU off the branch path).

For each shape of the DARTS space (B=64; 32x32x16, 16x16x32, 8x8x64; 3x3 and 5x5, dilation 1
and 2, stride 1 and 2) it times the forward pass, the forward pass with the input gradient
(what the alpha step needs), and the forward pass with all gradients (the weight step), and
checks that every formulation computes the same gradients. Prints one JSON object per shape.
Run: ``python benchmarks/bench_separable_conv.py`` (``--quick`` for the 32x32 3x3 shape only).

``--branch``: the same inside a ``lax.switch`` (a sampled op: GDAS, ProxylessNAS), where
``grouped`` is what autodiff of the grouped convolution gives there and ``branch_views`` is
``depthwise.branch_depthwise_conv`` (the views with a convolution-free backward pass, what
``K.conv`` runs on CPU on the branch path); ``branch_dense`` is the dense fused kernel
through ``branch_conv.conv2d`` (``separable_conv(impl="dense")`` on the branch path).
The ``dnas`` command's XLA flag is applied here too (``dnas.xla_flags``).
"""
from __future__ import annotations

import argparse
import json
import os

from dnas.xla_flags import apply_cpu_defaults

apply_cpu_defaults(os.environ)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

from dnas.bench import median_ms  # noqa: E402
from dnas.kernels import dispatch as K  # noqa: E402
from dnas.kernels.cpu.depthwise import branch_depthwise_conv, depthwise_conv  # noqa: E402

_DN = ("NHWC", "HWIO", "NHWC")
SHAPES = [  # (H, C, kernel, stride, dilation)
    (32, 16, 3, 1, 1), (32, 16, 5, 1, 1), (32, 16, 3, 1, 2), (32, 16, 5, 1, 2), (32, 16, 3, 2, 1),
    (16, 32, 3, 1, 1), (16, 32, 5, 1, 1), (8, 64, 3, 1, 1), (8, 64, 5, 1, 2),
]


def _pointwise(y, pw):
    return K.conv(y, pw[None, None], 1, 0, 1)   # a matrix product on CPU, as in the supernet


def grouped(x, dw, pw, stride, pad, dil):
    y = lax.conv_general_dilated(x, dw[:, :, None, :], (stride, stride), ((pad, pad), (pad, pad)),
                                 rhs_dilation=(dil, dil), dimension_numbers=_DN,
                                 feature_group_count=x.shape[-1])
    return _pointwise(y, pw)


def dense(x, dw, pw, stride, pad, dil):
    kernel = dw[:, :, :, None] * pw[None, None]
    return lax.conv_general_dilated(x, kernel, (stride, stride), ((pad, pad), (pad, pad)),
                                    rhs_dilation=(dil, dil), dimension_numbers=_DN)


def views(x, dw, pw, stride, pad, dil):
    return _pointwise(depthwise_conv(x, dw, stride, pad, dil), pw)


def branch_views(x, dw, pw, stride, pad, dil):
    return _pointwise(branch_depthwise_conv(x, dw, stride, pad, dil), pw)


def branch_dense(x, dw, pw, stride, pad, dil):
    kernel = dw[:, :, :, None] * pw[None, None]
    return K.conv(x, kernel, stride, pad, dil, branch=True)


FORMS = {"grouped": grouped, "dense": dense, "views": views}
BRANCH_FORMS = {"grouped": grouped, "branch_dense": branch_dense, "branch_views": branch_views}


def in_switch(form):
    """``form`` as the taken branch of a two-way ``lax.switch`` (the other branch a constant
    of the same shape), as a sampled op runs; the index is 0 at run time but unknown to XLA."""
    def switched(x, dw, pw, stride, pad, dil):
        def taken(x, dw, pw):
            return form(x, dw, pw, stride, pad, dil)
        out = jax.eval_shape(taken, x, dw, pw)
        index = (x[0, 0, 0, 0] > 1e9).astype(jnp.int32)
        return lax.switch(index, [taken, lambda x, dw, pw: jnp.ones(out.shape, out.dtype)], x, dw, pw)
    return switched


def measure(h, c, k, stride, dil, forms=FORMS, repeats=15):
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    pad = dil * (k - 1) // 2
    x = jax.random.normal(keys[0], (64, h, h, c))
    dw = jax.random.normal(keys[1], (k, k, c)) / k
    pw = jax.random.normal(keys[2], (c, c)) / c ** 0.5
    g = jax.random.normal(keys[3], (64, h // stride, h // stride, c))
    row = {"shape": [64, h, h, c], "kernel": k, "stride": stride, "dilation": dil}
    grads = {}
    for name, form in forms.items():
        def fwd(x, dw, pw, form=form):
            return form(jax.nn.relu(x), dw, pw, stride, pad, dil)

        def with_input_grad(x, dw, pw, g, fwd=fwd):
            y, back = jax.vjp(lambda x: fwd(x, dw, pw), x)
            return y, back(g)

        def with_all_grads(x, dw, pw, g, fwd=fwd):
            y, back = jax.vjp(fwd, x, dw, pw)
            return y, back(g)

        grads[name] = jax.jit(with_all_grads)(x, dw, pw, g)[1]
        row[name] = {"forward_ms": median_ms(jax.jit(fwd), x, dw, pw, n=repeats),
                     "forward_input_grad_ms": median_ms(jax.jit(with_input_grad), x, dw, pw, g, n=repeats),
                     "forward_all_grads_ms": median_ms(jax.jit(with_all_grads), x, dw, pw, g, n=repeats)}
    ref = grads["grouped"] if "grouped" in grads else next(iter(grads.values()))
    row["max_rel_grad_diff"] = max(
        float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
        for gr in grads.values() for a, b in zip(gr, ref))
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="only the 32x32x16 3x3 shape")
    ap.add_argument("--branch", action="store_true",
                    help="inside a lax.switch: grouped, branch_dense, branch_views")
    ap.add_argument("--repeats", type=int, default=15, help="timed calls per figure (median)")
    args = ap.parse_args()
    forms = {n: in_switch(f) for n, f in BRANCH_FORMS.items()} if args.branch else FORMS
    for shape in SHAPES[:1] if args.quick else SHAPES:
        row = measure(*shape, forms=forms, repeats=args.repeats)
        row["inside_switch"] = args.branch
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
