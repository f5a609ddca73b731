"""The backend seam (dnas.backend): the built-in supernets under XLA:CPU's kernel policy and under
the native one (what GPUs and TPUs run) compute the same logits, gradients and BatchNorm
statistics, on this CPU. The native formulation is otherwise never run by the CPU test suite."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dnas.backend import NATIVE, XLA_CPU, resolve
from dnas.relaxations import get_relaxation
from dnas.supernet.context import Ctx
from dnas.supernet.spaces import build_space

# the DARTS space's compile is 45-90 s on 2 cores: `pytest -m slow`; its separable convolutions
# under both policies are compared layer by layer below in the default run
SPACES = [pytest.param("nb201", {"channels": 4, "cells_per_stage": 1}, id="nb201"),
          pytest.param("darts", {"channels": 4, "layers": 3}, id="darts", marks=pytest.mark.slow),
          pytest.param("chain", {"width_mult": 0.25, "stage_depths": (1, 1, 1, 1, 1, 1), "stem_stride": 1},
                       id="chain", marks=pytest.mark.slow)]


def _run(space_name, opts, kernels, relaxation):
    space = build_space(space_name, in_channels=3, num_classes=10, kernels=kernels, **opts)
    relax = get_relaxation(relaxation, space=space)
    params, stats = space.init(jax.random.PRNGKey(0))
    arch = relax.init(jax.random.PRNGKey(1), space.groups)
    x = jax.random.normal(jax.random.PRNGKey(2), (4, 16, 16, 3))
    y = jnp.arange(4) % 10

    def loss(params, arch):
        samples = relax.sample(arch, jax.random.PRNGKey(3), 0.5)
        logits, new_stats = space.apply(params, stats, x, samples, relax.mix, Ctx(train=True))
        ce = -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), y])
        return ce, (logits, new_stats)

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    (value, (logits, new_stats)), grads = fn(params, arch)
    hlo = fn.lower(params, arch).compile().as_text()
    if hasattr(space, "unrolled"):   # NB201's loop mode differs by policy: compare cell by cell
        grads_w, new_stats = space.unrolled(grads[0], new_stats)
        grads = (grads_w, grads[1])
    return jax.device_get((value, logits, new_stats, grads)), hlo


@pytest.mark.parametrize("relaxation", ["darts", "gdas"])
@pytest.mark.parametrize("space,opts", SPACES)
def test_both_kernel_policies_compute_the_same(space, opts, relaxation):
    (v1, l1, s1, g1), hlo_cpu = _run(space, opts, "xla_cpu", relaxation)
    (v2, l2, s2, g2), hlo_native = _run(space, opts, "native", relaxation)
    # float32 sums in another order (shifted views, matrix products, pins): equal to ~1e-5 of
    # the values' scale; a wrong formulation differs by far more
    scale = lambda tree: max(float(np.abs(a).max()) for a in jax.tree_util.tree_leaves(tree))  # noqa: E731
    np.testing.assert_allclose(l1, l2, rtol=1e-3, atol=1e-4 * scale(l1))
    assert abs(float(v1) - float(v2)) < 1e-5 * max(1.0, abs(float(v1)))
    for a, b in zip(jax.tree_util.tree_leaves(s1), jax.tree_util.tree_leaves(s2)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * scale(s1))
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-4 * scale(g1))
    # and they are different programs: XLA:CPU's matrix-product 1x1 convolutions and pins are dots
    dots = lambda hlo: len(re.findall(r"= \S+ dot\(", hlo))  # noqa: E731
    assert dots(hlo_cpu) > dots(hlo_native)


@pytest.mark.parametrize("branch", [False, True], ids=["top-level", "sampled-branch"])
@pytest.mark.parametrize("stride,dilation", [(1, 1), (2, 2)])
def test_separable_convolution_under_both_policies(stride, dilation, branch):
    """DARTS's separable convolution: XLA:CPU's shifted-view depthwise + matrix-product 1x1
    (and, in a sampled op's branch, the custom-VJP convolutions) against JAX's grouped and
    1x1 convolutions: the same output and gradients."""
    from dnas.supernet import layers as L
    layer = L.separable_conv(8, 8, 3, stride, dilation)
    params, state = layer.init(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 9, 9, 8))

    def run(kernels):
        ctx = Ctx(train=True, kernels=kernels, branch=branch and kernels.branch_convs)
        f = lambda p, x_: jnp.sum(jnp.sin(layer.apply(p, state, x_, ctx)[0]))  # noqa: E731
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(params, x)
    (v1, g1), (v2, g2) = run(XLA_CPU), run(NATIVE)
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_policy_resolution():
    assert resolve("auto") is (XLA_CPU if jax.default_backend() == "cpu" else NATIVE)
    assert resolve("native") is NATIVE and resolve(XLA_CPU) is XLA_CPU
    with pytest.raises(ValueError, match="unknown kernel policy 'gpu'"):
        resolve("gpu")
    with pytest.raises(ValueError, match="unknown kernel policy"):
        build_space("nb201", kernels="fast")
    native = build_space("nb201", channels=4, cells_per_stage=1, kernels="native")
    cpu = build_space("nb201", channels=4, cells_per_stage=1, kernels="xla_cpu")
    assert native.scan_cells and not cpu.scan_cells     # scanned cells natively, unrolled on XLA:CPU
