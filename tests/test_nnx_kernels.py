"""The kernel policy reaching a user's Flax NNX layers (dnas.supernet.nnx_kernels).

Each formulation is compared with Flax's own layer (values and gradients), and a user model
under XLA:CPU's policy with the same model under the native one (logits, gradients with respect
to weights and α, BatchNorm statistics), for a relaxation that mixes every candidate and one
that samples a candidate under ``lax.switch``."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

import dnas.nnx
from dnas.backend import NATIVE, XLA_CPU
from dnas.nnx import Choice, Identity, Zero
from dnas.relaxations import get_relaxation
from dnas.supernet.context import Ctx
from dnas.supernet.nnx_kernels import PolicyBatchNorm, PolicyConv, follow_policy, in_branch
from dnas.supernet.nnx_space import NNXSpace

CONVS = [
    pytest.param(dict(in_features=6, out_features=5, kernel_size=(3, 3)), id="3x3-same"),
    pytest.param(dict(in_features=6, out_features=5, kernel_size=(1, 1), padding="VALID"), id="1x1-matmul"),
    pytest.param(dict(in_features=6, out_features=5, kernel_size=(3, 3), strides=2, padding=[(1, 1)] * 2),
                 id="3x3-stride2"),
    pytest.param(dict(in_features=6, out_features=6, kernel_size=(3, 3), feature_group_count=6,
                      kernel_dilation=2, padding=[(2, 2)] * 2), id="depthwise-dilated"),
    pytest.param(dict(in_features=6, out_features=5, kernel_size=(3, 3), padding=[(0, 1), (1, 1)]),
                 id="asymmetric-fallback"),
]


@pytest.mark.parametrize("branch", [False, True], ids=["top-level", "switch-branch"])
@pytest.mark.parametrize("kw", CONVS)
def test_policy_convolution_equals_flax(kw, branch):
    conv = nnx.Conv(**kw, use_bias=False, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 9, 9, kw["in_features"]))
    graphdef, params = nnx.split(conv)

    def run(fn):
        def loss(p, x_):
            m = nnx.merge(graphdef, p)
            if fn is not None:
                m.conv_general_dilated = fn
            if branch:   # inside a switch, as a sampled op's candidate runs
                with in_branch():
                    return lax.switch(0, [lambda v: jnp.sum(jnp.sin(m(v))), lambda v: 0.0 * jnp.sum(v)], x_)
            return jnp.sum(jnp.sin(m(x_)))
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)

    (v1, g1), (v2, g2) = run(PolicyConv(XLA_CPU)), run(None)
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("affine", [True, False])
def test_policy_batchnorm_equals_flax(affine):
    """Training mode: output, gradients (input, scale, bias) and running statistics; then
    inference with the updated statistics."""
    bn = nnx.BatchNorm(5, momentum=0.8, epsilon=1e-3, use_scale=affine, use_bias=affine, rngs=nnx.Rngs(0))
    if affine:
        bn.scale[...] = jnp.linspace(0.5, 2.0, 5)
        bn.bias[...] = jnp.linspace(-1.0, 1.0, 5)
    x = 3.0 + 2.0 * jax.random.normal(jax.random.PRNGKey(1), (4, 6, 6, 5))
    graphdef, params, stats = nnx.split(bn, nnx.Param, nnx.BatchStat)

    def run(cls):
        def loss(p, x_):
            m = nnx.merge(graphdef, p, stats, copy=True)
            m.__class__ = cls
            y = m(x_)
            return jnp.sum(jnp.sin(y) * jnp.arange(5.0)), (y, nnx.state(m, nnx.BatchStat))
        (v, (y, new_stats)), g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
        m = nnx.merge(graphdef, params, new_stats, copy=True)
        m.__class__, m.use_running_average = cls, True
        return v, y, g, new_stats, m(x)

    got, want = run(PolicyBatchNorm), run(nnx.BatchNorm)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # the statistics moved: the comparison is not of two untouched copies
    assert not np.allclose(got[3]["mean"][...], 0.0)


@pytest.mark.parametrize("devices", [1, 2])
@pytest.mark.parametrize("kernels", [XLA_CPU, NATIVE], ids=["xla_cpu", "native"])
def test_torch_batchnorm_keeps_pytorchs_running_statistics(kernels, devices):
    """TorchBatchNorm normalises as nnx.BatchNorm does; its running variance moves by PyTorch's
    rule, 0.9 · var + 0.1 · (the batch's unbiased variance), the batch being every device's
    examples under a synchronised BatchNorm (``n`` = 2 · 4 · 6 · 6 there)."""
    x = 3.0 + 2.0 * jax.random.normal(jax.random.PRNGKey(1), (devices, 4, 6, 6, 5))
    want_y = nnx.BatchNorm(5, momentum=0.9, epsilon=1e-5, rngs=nnx.Rngs(0))(x.reshape((-1, 6, 6, 5)))

    def one(x_):
        bn = dnas.nnx.TorchBatchNorm(5, nnx.Rngs(0))
        dnas.nnx.set_search_mode(bn, train=True, axis_name="d" if devices > 1 else None)
        follow_policy(bn, kernels)
        return bn(x_), bn.mean[...], bn.var[...]

    y, mean, var = jax.vmap(one, axis_name="d")(x) if devices > 1 else jax.tree_util.tree_map(
        lambda a: a[None], one(x[0]))
    flat = np.asarray(x, np.float64).reshape((-1, 5))
    np.testing.assert_allclose(np.asarray(y).reshape(want_y.shape), want_y, rtol=1e-4, atol=1e-5)
    for d in range(devices):
        np.testing.assert_allclose(mean[d], 0.1 * flat.mean(0), rtol=1e-5)
        np.testing.assert_allclose(var[d], 0.9 + 0.1 * flat.var(0, ddof=1), rtol=1e-5)
    assert not np.allclose(0.9 + 0.1 * flat.var(0, ddof=0), 0.9 + 0.1 * flat.var(0, ddof=1), rtol=1e-4)


class Edge(nnx.Module):
    def __init__(self, c, k, groups, rngs):
        self.conv = nnx.Conv(c, c, (k, k), feature_group_count=groups, use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(c, use_scale=False, use_bias=False, rngs=rngs)

    def __call__(self, x):
        return self.bn(self.conv(jax.nn.relu(x)))


class Cells(nnx.Module):
    """Two cells of two nodes; every edge a choice among 1x1, 3x3, depthwise 3x3, skip, zero."""

    def __init__(self, rngs, c=8):
        self.stem = nnx.Conv(3, c, (3, 3), use_bias=False, rngs=rngs)
        self.stem_bn = nnx.BatchNorm(c, rngs=rngs)

        def edge(label):
            return Choice({"conv1": Edge(c, 1, 1, rngs), "conv3": Edge(c, 3, 1, rngs), "dw3": Edge(c, 3, c, rngs),
                           "skip": Identity(), "zero": Zero()}, label=label)
        self.cells = nnx.List([nnx.List([edge("0->1"), edge("0->2"), edge("1->2")]) for _ in range(2)])
        self.head = nnx.Linear(c, 10, rngs=rngs)

    def __call__(self, x):
        x = self.stem_bn(self.stem(x))
        for e in self.cells:
            n1 = e[0](x)
            x = e[1](x) + e[2](n1)
        return self.head(jnp.mean(x, axis=(1, 2)))


def _run(model, kernels, relaxation):
    space = NNXSpace(model)
    relax = get_relaxation(relaxation, space=space)
    params, stats = space.init(jax.random.PRNGKey(0))
    arch = relax.init(jax.random.PRNGKey(1), space.groups)
    x = jax.random.normal(jax.random.PRNGKey(2), (4, 10, 10, 3))
    y = jnp.arange(4)

    def loss(params, arch):
        samples = relax.sample(arch, jax.random.PRNGKey(3), 0.5)
        logits, new_stats = space.apply(params, stats, x, samples, relax.mix, Ctx(train=True, kernels=kernels))
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), y]), (logits, new_stats)

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    out = jax.device_get(fn(params, arch))
    return out, fn.lower(params, arch).compile().as_text()


@pytest.mark.parametrize("relaxation", ["darts", "gdas"])
def test_user_model_under_both_policies(relaxation):
    model = Cells(nnx.Rngs(0))
    ((v1, (l1, s1)), g1), hlo_cpu = _run(model, XLA_CPU, relaxation)
    ((v2, (l2, s2)), g2), hlo_native = _run(model, NATIVE, relaxation)
    np.testing.assert_allclose(l1, l2, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves((s1, g1)), jax.tree_util.tree_leaves((s2, g2))):
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-5)
    # the α gradient is not all zeros (GDAS's through its straight-through sample)
    assert max(float(np.abs(a).max()) for a in jax.tree_util.tree_leaves(g1[1])) > 1e-6
    # different programs: XLA:CPU's pins and matrix-product 1x1 convolutions are dots, and its
    # sampled convolutions carry their own backward pass (custom VJP)
    dots = lambda hlo: len(re.findall(r"= \S+ dot\(", hlo))  # noqa: E731
    assert dots(hlo_cpu) > dots(hlo_native)
    # the user's model is untouched: its layers are still Flax's own
    assert all(type(m) is nnx.BatchNorm for _, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm))
    assert all(m.conv_general_dilated is lax.conv_general_dilated
               for _, m in nnx.iter_modules(model) if isinstance(m, nnx.Conv))


def test_follow_policy_leaves_custom_layers_alone():
    """A convolution function the user set, and a BatchNorm subclass of theirs, are kept."""
    class MyBN(nnx.BatchNorm):
        pass

    def my_conv(*args, **kw):
        return lax.conv_general_dilated(*args, **kw)
    conv = nnx.Conv(3, 3, (3, 3), conv_general_dilated=my_conv, rngs=nnx.Rngs(0))
    plain = nnx.Conv(3, 3, (3, 3), rngs=nnx.Rngs(0))
    mods = nnx.List([conv, plain, MyBN(3, rngs=nnx.Rngs(0)), nnx.BatchNorm(3, rngs=nnx.Rngs(0))])
    follow_policy(mods, XLA_CPU)
    assert mods[0].conv_general_dilated is my_conv
    assert isinstance(mods[1].conv_general_dilated, PolicyConv)
    assert type(mods[2]) is MyBN and type(mods[3]) is PolicyBatchNorm


def test_tracing_a_user_model_never_walks_the_traced_program(monkeypatch):
    """Flax's ``variable[...] = tracer`` asks the tracer for its sharding, whose error message
    walks the whole traced program (``find_progenitors``): once per BatchNorm statistic, the
    trace cost grew with the square of the model. dnas's BatchNorm writes whole values; a
    traced search step of a user model must not walk the program at all."""
    from jax._src.interpreters import partial_eval as pe

    from dnas.searcher import make_searcher
    walks = []
    original = pe.JaxprStackFrame.find_progenitors

    def counting(self, tracer):
        walks.append(1)
        return original(self, tracer)
    monkeypatch.setattr(pe.JaxprStackFrame, "find_progenitors", counting)
    s = make_searcher(Cells(nnx.Rngs(0)), "darts")
    state = s.init(jax.random.PRNGKey(0))
    batch = (jnp.zeros((4, 10, 10, 3)), jnp.arange(4))
    s.compiled_step(donate=False).trace(state, batch, batch)
    assert not walks
    # the check would see them: Flax's own BatchNorm, traced the same way, walks the program
    graphdef, bn_state = nnx.split(nnx.BatchNorm(3, rngs=nnx.Rngs(0)))
    jax.jit(lambda st, v: nnx.merge(graphdef, st)(v)).trace(bn_state, jnp.ones((2, 4, 4, 3)))
    assert walks


@pytest.mark.slow  # 16-21 s on 2 cores; seeds vmapped on a built-in space: test_seeds.py
def test_user_model_seeds_vmapped_equal_each_seed_alone():
    """Two seeds in one vmapped program (per-member convolutions under XLA:CPU's policy) step
    like each seed's own search."""
    from dnas.searcher import make_searcher
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 4, 10, 10, 3)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, (2, 4)), jnp.int32)
    multi = make_searcher(lambda rngs: Cells(rngs), "gdas", num_seeds=2, total_steps=2)
    assert multi.member_convs
    state = multi.init_members((3, 7))
    state, _ = multi.compiled_step(donate=False)(state, (x, y), (x[:, ::-1], y[:, ::-1]))
    for i, seed in enumerate((3, 7)):
        one = make_searcher(lambda rngs: Cells(rngs), "gdas", total_steps=2)
        alone = one.init(jax.random.PRNGKey(seed))
        alone, _ = one.compiled_step(donate=False)(alone, (x[i], y[i]), (x[i, ::-1], y[i, ::-1]))
        member = multi.member(state, i)
        for a, b in zip(jax.tree_util.tree_leaves((alone.arch, alone.params, alone.batch_stats)),
                        jax.tree_util.tree_leaves((member.arch, member.params, member.batch_stats))):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("relaxation", ["gdas", "proxyless"])
def test_sampled_choice_points_recomputed_backward_equals_autodiff(relaxation):
    """A sampled choice point differentiated by its own backward pass (the sampled branch
    recomputed, ``dnas.nnx._ModuleBranch`` under ``switch_sampled``) gives autodiff's gradients of the plain
    switch (``Ctx.custom_vjp`` off), for weights and α, with the statistics threaded through
    ProxylessNAS's two sampled paths; and it keeps fewer bytes for the backward pass."""
    model = Cells(nnx.Rngs(0))
    space = NNXSpace(model)
    relax = get_relaxation(relaxation, space=space)
    params, stats = space.init(jax.random.PRNGKey(0))
    arch = relax.init(jax.random.PRNGKey(1), space.groups)
    x = jax.random.normal(jax.random.PRNGKey(2), (4, 10, 10, 3))

    def grads(custom_vjp):
        def loss(params, arch):
            samples = relax.sample(arch, jax.random.PRNGKey(3), 0.5)
            ctx = Ctx(train=True, kernels=XLA_CPU, custom_vjp=custom_vjp)
            logits, new_stats = space.apply(params, stats, x, samples, relax.mix, ctx)
            return jnp.sum(jnp.sin(logits)), new_stats
        fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
        return jax.device_get(fn(params, arch)), fn.lower(params, arch).compile().memory_analysis()
    ((v1, s1), g1), mem1 = grads(True)
    ((v2, s2), g2), mem2 = grads(False)
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    # float32's sum order: the backward pass from a candidate's output rounds otherwise
    # (exact in float64: test_sampled_candidate_backward_from_its_output_is_exact)
    for a, b in zip(jax.tree_util.tree_leaves((s1, g1)), jax.tree_util.tree_leaves((s2, g2))):
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=3e-5)
    assert max(float(np.abs(a).max()) for a in jax.tree_util.tree_leaves(g1[0])) > 1e-4
    assert mem1.temp_size_in_bytes < mem2.temp_size_in_bytes


class ScannedCells(nnx.Module):
    """Three cells with stacked weights (``nnx.vmap``) run by ``dnas.nnx.scan``."""

    def __init__(self, rngs, c=8, n=3):
        self.stem = nnx.Conv(3, c, (3, 3), use_bias=False, rngs=rngs)

        @nnx.split_rngs(splits=n)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return Choice({"conv3": Edge(c, 3, 1, rngs), "conv1": Edge(c, 1, 1, rngs), "skip": Identity()},
                          label="edge")
        self.cells = make(rngs)
        self.head = nnx.Linear(c, 10, rngs=rngs)

    def __call__(self, x):
        x = dnas.nnx.scan(lambda cell, h: h + cell(h), in_axes=(0, nnx.Carry), out_axes=nnx.Carry)(
            self.cells, self.stem(x))
        return self.head(jnp.mean(x, axis=(1, 2)))


def test_scanned_cells_take_the_policys_loop_convolutions():
    """``dnas.nnx.scan``: under XLA:CPU's policy the loop body's convolutions carry their own
    backward pass (XLA:CPU's own is many times slower inside a loop), as the built-in scanned
    cells' do; not under the native policy, nor when the estimator differentiates twice. The
    numbers are the same under both policies."""
    model = ScannedCells(nnx.Rngs(0))
    space = NNXSpace(model)
    assert space.groups == {"edge": (1, 3)}   # one choice point, shared by the three cells
    params, stats = space.init(jax.random.PRNGKey(0))
    w = {"edge": jnp.asarray([[0.5, 0.3, 0.2]])}
    x = jax.random.normal(jax.random.PRNGKey(2), (4, 10, 10, 3))
    mix = get_relaxation("darts", space=space).mix

    def grads(ctx):
        def loss(params, w):
            logits, _ = space.apply(params, stats, x, w, mix, ctx)
            return jnp.sum(logits ** 2)
        fn = jax.value_and_grad(loss, argnums=(0, 1))
        # the forward pass's program: a custom VJP shows there as custom_vjp_call (only the
        # loop body's 3x3 convolution can be one: the stem is outside the loop, 1x1 is a matmul)
        return jax.device_get(jax.jit(fn)(params, w)), str(jax.make_jaxpr(loss)(params, w))

    (v1, g1), jaxpr_cpu = grads(Ctx(train=True, kernels=XLA_CPU))
    (v2, g2), jaxpr_native = grads(Ctx(train=True, kernels=NATIVE))
    _, jaxpr_twice = grads(Ctx(train=True, kernels=XLA_CPU, custom_vjp=False))
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-5)
    assert "scan[" in jaxpr_cpu and jaxpr_cpu.count("custom_vjp_call") == 1
    assert "custom_vjp_call" not in jaxpr_native and "custom_vjp_call" not in jaxpr_twice


class SummedCells(Cells):
    """:class:`Cells` with each cell's output node summed by :func:`dnas.nnx.node_sum`."""

    def __call__(self, x):
        x = self.stem_bn(self.stem(x))
        for e in self.cells:
            n1 = e[0](x)
            x = dnas.nnx.node_sum([e[1](x), e[2](n1)])
        return self.head(jnp.mean(x, axis=(1, 2)))


def _forward_jaxpr_and_grads(model, kernels):
    space = NNXSpace(model)
    relax = get_relaxation("darts", space=space)
    params, stats = space.init(jax.random.PRNGKey(0))
    arch = relax.init(jax.random.PRNGKey(1), space.groups)
    arch = jax.tree_util.tree_map(lambda a: a + jax.random.normal(jax.random.PRNGKey(4), a.shape), arch)
    x = jax.random.normal(jax.random.PRNGKey(2), (4, 10, 10, 3))

    def loss(params, arch):
        samples = relax.sample(arch, jax.random.PRNGKey(3), 0.5)
        logits, _ = space.apply(params, stats, x, samples, relax.mix, Ctx(train=True, kernels=kernels))
        return jnp.sum(jnp.sin(logits))
    dots = sum(1 for eq in jax.make_jaxpr(loss)(params, arch).jaxpr.eqns if eq.primitive.name == "dot_general")
    return dots, jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, arch)


def test_node_sum_is_the_sum_stored_once():
    """``dnas.nnx.node_sum`` computes the plain sum (values, gradients for weights and α) under
    both policies and outside a search. Under XLA:CPU's it stores the node once: the last
    cell's output, which no choice point reads, gains its pin (one more identity product than the
    plain sum), and a node that choice points read is not pinned a second time by them."""
    plain, summed = Cells(nnx.Rngs(0)), SummedCells(nnx.Rngs(0))
    for kernels in (XLA_CPU, NATIVE):
        (d_plain, (v1, g1)), (d_summed, (v2, g2)) = (_forward_jaxpr_and_grads(m, kernels) for m in (plain, summed))
        np.testing.assert_allclose(v1, v2, rtol=1e-5)
        for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
        assert d_summed == d_plain + (1 if kernels is XLA_CPU else 0)
    # outside a search it is Python's sum, and one term is returned as it is
    terms = [jnp.ones(3), 2 * jnp.ones(3), 3 * jnp.ones(3)]
    np.testing.assert_array_equal(dnas.nnx.node_sum(terms), 6 * jnp.ones(3))
    assert dnas.nnx.node_sum(terms[:1]) is terms[0]
    with pytest.raises(ValueError, match="at least one term"):
        dnas.nnx.node_sum([])


class _ConvBN(nnx.Module):
    """``relu → conv → BN``, optionally followed by ``relu`` or with an affine BN."""

    def __init__(self, c, k, rngs, groups=1, affine=False, relu_after=False, dtype=jnp.float64):
        self.conv = nnx.Conv(c, c, (k, k), feature_group_count=groups, use_bias=False, param_dtype=dtype,
                             rngs=rngs)
        self.bn = nnx.BatchNorm(c, use_scale=affine, use_bias=affine, param_dtype=dtype, rngs=rngs)
        self.relu_after = relu_after

    def __call__(self, x):
        y = self.bn(self.conv(jax.nn.relu(x)))
        return jax.nn.relu(y) if self.relu_after else y


class _SepBN(nnx.Module):
    """DARTS's separable convolution shape: two (depthwise, pointwise, BN) units."""

    def __init__(self, c, rngs):
        self.a, self.b = _ConvBN(c, 3, rngs, groups=c), _ConvBN(c, 1, rngs)

    def __call__(self, x):
        return self.b(self.a(x))


class _PoolBN(nnx.Module):
    def __init__(self, c, rngs):
        self.bn = nnx.BatchNorm(c, use_scale=False, use_bias=False, param_dtype=jnp.float64, rngs=rngs)

    def __call__(self, x):
        return self.bn(nnx.avg_pool(x, (3, 3), strides=(1, 1), padding="SAME"))


def test_sampled_candidate_backward_from_its_output_is_exact(monkeypatch):
    """A sampled NNX candidate whose output is an affine-free BatchNorm's starts its backward
    pass from that output (``dnas.supernet.nnx_kernels.OutputTail``): in float64 its gradients
    (weights, input) equal autodiff of the plain switch to rounding, for every candidate; the
    candidates that end otherwise (affine BN, a ReLU after the BN, skip, zero) recompute."""
    from dnas.nnx import _ModuleBranch, _OpCandidates
    tails = {}
    forward = _ModuleBranch.forward

    def recording(self, *args):
        out = forward(self, *args)
        tails[self.i] = self.tail
        return out
    monkeypatch.setattr(_ModuleBranch, "forward", recording)
    names = ("conv_bn", "sep", "pool_bn", "affine_bn", "bn_relu", "skip", "zero")
    with jax.enable_x64(True):
        rngs, c = nnx.Rngs(0), 4
        cands = nnx.List([_ConvBN(c, 3, rngs), _SepBN(c, rngs), _PoolBN(c, rngs), _ConvBN(c, 3, rngs, affine=True),
                          _ConvBN(c, 1, rngs, relu_after=True), Identity(), Zero()])
        graphdef, state = nnx.split(cands)
        state = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), state)   # Flax's statistics are float32
        x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 6, 6, c)), jnp.float64)

        def loss_fn(custom):
            def loss(state, x, index):
                ops = follow_policy(nnx.merge(graphdef, state, copy=True), XLA_CPU)
                y, _ = _OpCandidates(ops, Ctx(train=True, kernels=XLA_CPU, custom_vjp=custom)).one(index, x)
                return jnp.sum(jnp.sin(y) * y)
            return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        own, autodiff = loss_fn(True), loss_fn(False)
        for i in range(len(names)):
            (l1, g1), (l0, g0) = own(state, x, jnp.int32(i)), autodiff(state, x, jnp.int32(i))
            np.testing.assert_allclose(l1, l0, rtol=1e-12)
            for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g0)):
                assert a.dtype == jnp.float64
                np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)
            if names[i] == "sep":   # the gradient reached the first unit's weights, before the inner BN
                assert float(jnp.abs(g1[0][1]["a"]["conv"]["kernel"][...]).max()) > 1e-3
    # which candidates started from their output: the index of their last BatchNorm call
    assert {names[i]: t for i, t in tails.items()} == {"conv_bn": 0, "sep": 1, "pool_bn": 0, "affine_bn": None,
                                                       "bn_relu": None, "skip": None, "zero": None}


@pytest.mark.skipif(jax.local_device_count() < 8, reason="needs 8 (simulated) devices; see tests/conftest.py")
def test_backward_from_the_output_with_batchnorm_synchronised_over_eight_devices():
    """GDAS on :class:`Cells` (three of each edge's five candidates end in an affine-free
    BatchNorm, so the sampled ones start their backward pass from their output): eight devices,
    whose BatchNorm statistics and their derivative are averaged over the device axis, step like
    one device on the global batch."""
    from dnas.searcher import make_searcher
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((16, 10, 10, 3)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, 16), jnp.int32)
    out = []
    for n in (1, 8):
        s = make_searcher(Cells(nnx.Rngs(0)), "gdas", num_devices=n, total_steps=4)
        state, step = s.replicate(s.init(jax.random.PRNGKey(0))), s.compiled_step(donate=False)
        for _ in range(2):
            state, metrics = step(state, s.shard((x, y)), s.shard((x[::-1], y[::-1])))
        out.append(jax.device_get((state.arch, state.params, state.batch_stats, metrics["val_loss"])))
    for a, b in zip(jax.tree_util.tree_leaves(out[0]), jax.tree_util.tree_leaves(out[1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_pytorch_convention_initialisers_draw_their_distributions():
    """HE_NORMAL: an untruncated normal of variance 2 / fan-in (fan-in = kernel pixels x input
    channels per group); torch_linear: weights and bias uniform in ±1/√fan-in."""
    from dnas.supernet.nnx_kernels import HE_NORMAL, torch_linear

    k = np.asarray(HE_NORMAL(jax.random.PRNGKey(0), (3, 3, 64, 64)))
    std = np.sqrt(2.0 / (3 * 3 * 64))
    assert abs(k.std() / std - 1) < 0.02 and abs(k.mean()) < 0.01 * std
    assert np.abs(k).max() > 3.5 * std                     # not truncated (Flax's he_normal cuts at 2σ)
    dw = np.asarray(HE_NORMAL(jax.random.PRNGKey(1), (5, 5, 1, 4096)))   # a depthwise kernel: fan-in 25
    assert abs(dw.std() / np.sqrt(2.0 / 25) - 1) < 0.02
    lin = torch_linear(400, 300, nnx.Rngs(2))
    w, b = np.asarray(lin.kernel[...]), np.asarray(lin.bias[...])
    bound = 1.0 / np.sqrt(400)
    assert np.abs(w).max() <= bound and np.abs(b).max() <= bound
    assert abs(w.std() / (bound / np.sqrt(3)) - 1) < 0.02 and abs(b.std() / (bound / np.sqrt(3)) - 1) < 0.15


def test_he_normal_draws_flaxs_numbers_from_few_programs():
    """HE_NORMAL draws each kernel as the prefix of a flat draw of a power-of-two size (one
    program per size class, not per shape): the numbers equal Flax's
    variance_scaling(2, fan_in, normal) exactly, for typed and raw keys and kernels of every
    size class; under a trace (vmap over seeds) and with another PRNG setting it draws as Flax
    does, so those equal it too."""
    from dnas.supernet import nnx_kernels as nk

    flax_he = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")
    shapes = [(1, 1, 1, 1), (2, 3), (1, 1, 4, 4), (3, 3, 1, 16), (5, 5, 1, 48), (3, 3, 16, 16), (1, 1, 48, 32),
              (3, 3, 3, 48), (7, 7, 3, 5), (1, 1, 256, 257), (3, 3, 64, 128)]
    sizes_before = nk._flat_normal._cache_size()
    for i, shape in enumerate(shapes):
        for key in (jax.random.key(i), jax.random.PRNGKey(i + 100)):
            got = nk.HE_NORMAL(key, shape)
            assert got.shape == shape and got.dtype == jnp.float32
            np.testing.assert_array_equal(got, flax_he(key, shape))
    classes = {max(nk._FLAT_DRAW_MIN, 1 << (int(np.prod(s)) - 1).bit_length()) for s in shapes}
    assert nk._flat_normal._cache_size() - sizes_before <= len(classes) < len(shapes)

    keys = jax.random.split(jax.random.key(7), 3)
    np.testing.assert_array_equal(jax.vmap(lambda k: nk.HE_NORMAL(k, (3, 3, 4, 8)))(keys),
                                  jax.vmap(lambda k: flax_he(k, (3, 3, 4, 8)))(keys))
    # the premise: a draw is the prefix of a longer one (same fan-in, so the same scale) with the
    # partitionable PRNG only; without it HE_NORMAL still gives Flax's numbers
    key = jax.random.key(3)
    np.testing.assert_array_equal(flax_he(key, (3, 3, 4, 8)).ravel(), flax_he(key, (3, 3, 4, 16)).ravel()[:288])
    with jax.threefry_partitionable(False):
        np.testing.assert_array_equal(nk.HE_NORMAL(key, (3, 3, 4, 8)), flax_he(key, (3, 3, 4, 8)))
        assert not np.array_equal(flax_he(key, (3, 3, 4, 8)).ravel(), flax_he(key, (3, 3, 4, 16)).ravel()[:288])
