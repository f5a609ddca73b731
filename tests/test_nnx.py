"""Choice points in a user's own Flax NNX model (dnas.nnx, dnas.supernet.nnx_space, dnas.search).

The supernet's output is checked against mixtures written by hand from the model's own
submodules, its one-hot case against the model dnas.fix returns, data parallel against one
device, and the second-order hypergradient against jax.grad of the explicit DARTS objective."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dnas
from dnas.hypergrad import ESTIMATORS
from dnas.nnx import Choice, Identity, InputChoice, Zero
from dnas.relaxations import dense_mix, get_relaxation
from dnas.relaxations.gumbel import _sampled_mix
from dnas.searcher import Hyper, make_searcher
from dnas.supernet.genotype import ChoiceGenotype, load_genotype
from dnas.supernet.context import Ctx
from dnas.supernet.nnx_space import NNXSpace


class ConvBN(nnx.Module):
    def __init__(self, c, k, rngs):
        self.conv = nnx.Conv(c, c, (k, k), use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(c, rngs=rngs)

    def __call__(self, x):
        return self.bn(self.conv(jax.nn.relu(x)))


class Net(nnx.Module):
    def __init__(self, rngs, c=4):
        self.stem = nnx.Conv(1, c, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(c, rngs=rngs)
        self.op = Choice({"conv3": ConvBN(c, 3, rngs), "conv5": ConvBN(c, 5, rngs), "skip": Identity(),
                          "zero": Zero()}, label="op")
        self.act = Choice({"relu": jax.nn.relu, "tanh": jnp.tanh}, label="act")
        self.merge = InputChoice(3, 2, label="merge")
        self.head = nnx.Linear(c, 10, rngs=rngs)

    def __call__(self, x):
        h0 = self.bn(self.stem(x))
        h1 = self.act(self.op(h0))
        return self.head(self.merge([h0, h1, 0.5 * h0 + h1]).mean((1, 2)))


def _x(n=8, seed=0):
    return jnp.asarray(np.random.RandomState(seed).randn(n, 6, 6, 1), jnp.float32)


def _set_train(model, train):
    for _, m in nnx.iter_modules(model):
        if isinstance(m, nnx.BatchNorm):
            m.use_running_average = not train


def _weights(space, seed):
    rng = np.random.RandomState(seed)
    return {g: jnp.asarray(rng.dirichlet(np.ones(n))[None], jnp.float32) for g, (_, n) in space.groups.items()}


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_soft_mixture_equals_hand_written(train):
    model = Net(nnx.Rngs(0))
    space = NNXSpace(model)
    params, stats = space.init(jax.random.PRNGKey(0))
    w = _weights(space, 1)
    x = _x()
    logits, new_stats = space.apply(params, stats, x, w, dense_mix, Ctx(train=train))
    new_stats = space.unstacked(params, new_stats)[1]       # keyed as the model's layers
    params, stats = space.unstacked(params, stats)

    ref = nnx.clone(model)
    _set_train(ref, train)
    h0 = ref.bn(ref.stem(x))
    h1 = sum(w["op"][0, i] * op(h0) for i, op in enumerate(ref.op.candidates))
    h2 = w["act"][0, 0] * jax.nn.relu(h1) + w["act"][0, 1] * jnp.tanh(h1)
    ins = [h0, h2, 0.5 * h0 + h2]
    want = ref.head(sum(w["merge"][0, i] * ins[i] for i in range(3)).mean((1, 2)))
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-6)
    want_stats = nnx.to_pure_dict(nnx.state(ref, nnx.BatchStat))
    for a, b in zip(jax.tree_util.tree_leaves(new_stats), jax.tree_util.tree_leaves(want_stats)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    if train:  # the candidates' BatchNorm statistics moved (all candidates ran)
        assert not np.allclose(new_stats["op"]["candidates"][1]["bn"]["mean"], stats["op"]["candidates"][1]["bn"]["mean"])


class SharedCells(nnx.Module):
    """Two cells whose choice points share labels, one decision for both (as DARTS's normal
    cells share one α): the second cell runs at half the resolution, twice the width."""

    def __init__(self, rngs, c=4):
        self.stem = nnx.Conv(1, c, (3, 3), rngs=rngs)
        self.cells = nnx.List([Choice({"conv3": ConvBN(w, 3, rngs), "skip": Identity(), "zero": Zero()}, label="edge")
                               for w in (c, 2 * c)])
        self.pick = nnx.List([InputChoice(2, 1, label="in") for _ in range(2)])
        self.widen = nnx.Conv(c, 2 * c, (1, 1), strides=2, rngs=rngs)
        self.head = nnx.Linear(2 * c, 10, rngs=rngs)

    def __call__(self, x):
        h = self.stem(x)
        h = self.pick[0]([h, self.cells[0](h)])
        h = self.widen(h)
        h = self.pick[1]([h, self.cells[1](h)])
        return self.head(h.mean((1, 2)))


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_choice_points_sharing_a_label_share_one_decision(train):
    """Choice points with one label are one row of α: every use mixes its own candidates with
    the same weights (checked against the hand-written mixture), the genotype has one choice
    per label, and fix() replaces every use (only the chosen candidates' weights remain)."""
    from dnas.latency.nnx_profile import choice_point_inputs
    model = SharedCells(nnx.Rngs(0))
    space = NNXSpace(model)
    assert space.groups == {"edge": (1, 3), "in": (1, 2)}
    params, stats = space.init(jax.random.PRNGKey(0))
    w = _weights(space, 4)
    x = _x(seed=5)
    logits, _ = space.apply(params, stats, x, w, dense_mix, Ctx(train=train))
    ref = nnx.clone(model)
    _set_train(ref, train)
    h = ref.stem(x)
    for k in range(2):
        if k:
            h = ref.widen(h)
        y = sum(w["edge"][0, i] * op(h) for i, op in enumerate(ref.cells[k].candidates))
        h = w["in"][0, 0] * h + w["in"][0, 1] * y
    np.testing.assert_allclose(logits, ref.head(h.mean((1, 2))), rtol=1e-5, atol=1e-6)

    g = space.derive({"edge": np.array([[0.1, 0.7, 0.2]]), "in": np.array([[0.2, 0.8]])})
    assert g.choices == {"edge": "skip", "in": (1,)}
    fixed = dnas.fix(model, {"edge": "conv3", "in": [1]})
    assert all(isinstance(c, ConvBN) for c in fixed.cells)
    n_fixed = sum(a.size for a in jax.tree_util.tree_leaves(nnx.state(fixed, nnx.Param)))
    n_convs = sum(a.size for c in model.cells for a in jax.tree_util.tree_leaves(nnx.state(c.candidates[0], nnx.Param)))
    n_rest = sum(a.size for m in (model.stem, model.widen, model.head) for a in jax.tree_util.tree_leaves(nnx.state(m, nnx.Param)))
    assert n_fixed == n_convs + n_rest
    # the latency profile sees each use at its own input shape
    assert choice_point_inputs(space, (6, 6, 1), batch_size=2)["edge"] == [(2, 6, 6, 4), (2, 3, 3, 8)]


@pytest.mark.parametrize("choice", [("conv5", (0, 2), "tanh"), ("conv3", (1, 2), "relu"), ("skip", (0, 1), "relu")])
@pytest.mark.parametrize("mix", ["dense", "sampled"])
def test_one_hot_equals_fixed_model(choice, mix):
    """Indicator weights (dense mix), or a hard sample that runs one candidate under lax.switch
    (GDAS's mix), give the fixed model's logits and BatchNorm statistics, in training mode."""
    op, inputs, act = choice
    model = Net(nnx.Rngs(3))
    space = NNXSpace(model)
    params, stats = space.init(jax.random.PRNGKey(0))
    genotype = ChoiceGenotype({"op": op, "merge": inputs, "act": act})
    hot = {label: np.zeros((1, n), np.float32) for label, (_, n) in space.groups.items()}
    hot["op"][0, space.group_op_names("op").index(op)] = 1
    hot["act"][0, space.group_op_names("act").index(act)] = 1
    hot["merge"][0, list(inputs)] = 1
    if mix == "dense":
        samples, fn = {k: jnp.asarray(v) for k, v in hot.items()}, dense_mix
    else:  # the input choice picks one input when sampled: make it pick the first chosen one
        hot["merge"][0] = 0
        hot["merge"][0, inputs[0]] = 1
        samples = {k: {"index": jnp.asarray([int(np.argmax(v[0]))]), "weights": jnp.asarray(v)} for k, v in hot.items()}
        fn = _sampled_mix
    x = _x(seed=2)
    logits, new_stats = jax.jit(lambda p, s: space.apply(p, s, x, samples, fn, Ctx(train=True)))(params, stats)
    new_stats = space.unstacked(params, new_stats)[1]    # keyed as the model's layers

    fixed = dnas.fix(model, genotype)
    if mix == "sampled":
        fixed.merge.indices = (inputs[0],)
    _set_train(fixed, True)
    np.testing.assert_allclose(logits, fixed(x), rtol=1e-5, atol=1e-5)
    got = {k: v for k, v in new_stats.items() if k != "op"}
    want = nnx.to_pure_dict(nnx.state(fixed, nnx.BatchStat))
    np.testing.assert_allclose(got["bn"]["mean"], want["bn"]["mean"], rtol=1e-5, atol=1e-7)
    if op.startswith("conv"):   # the chosen candidate's statistics are the fixed op's
        i = space.group_op_names("op").index(op)
        np.testing.assert_allclose(new_stats["op"]["candidates"][i]["bn"]["var"], want["op"]["bn"]["var"], rtol=1e-5)


def test_fixed_model_holds_only_the_chosen_parameters():
    model = Net(nnx.Rngs(0))
    fixed = dnas.fix(model, {"op": "conv3", "act": "relu", "merge": [0, 2]})
    assert isinstance(fixed.op, ConvBN) and fixed.op.conv.kernel.shape == (3, 3, 4, 4)
    assert isinstance(fixed.merge, dnas.nnx.FixedInputs) and fixed.merge.indices == (0, 2)
    size = lambda m: sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(nnx.state(m, nnx.Param)))
    assert size(fixed) == size(model.stem) + size(model.bn) + size(model.op.candidates[0]) + size(model.head)
    assert not dnas.nnx.choice_points(fixed)
    x = _x()
    _set_train(fixed, False)
    with pytest.raises(RuntimeError, match="outside a search"):
        model(x)
    assert fixed(x).shape == (8, 10)


def test_bad_choice_points_and_genotypes_are_refused():
    with pytest.raises(ValueError, match="at least two"):
        Choice({"a": Identity()}, label="x")
    with pytest.raises(ValueError, match="label"):
        Choice({"a": Identity(), "b": Zero()}, label="")
    with pytest.raises(ValueError, match="n_chosen"):
        InputChoice(2, 2, label="m")
    model = Net(nnx.Rngs(0))
    with pytest.raises(ValueError, match="no choice for"):
        dnas.fix(model, {"op": "conv3", "act": "relu"})
    with pytest.raises(ValueError, match="not one of its candidates"):
        dnas.fix(model, {"op": "conv7", "act": "relu", "merge": [0, 1]})
    with pytest.raises(ValueError, match="distinct indices"):
        dnas.fix(model, {"op": "conv3", "act": "relu", "merge": [0, 0]})

    class Twice(nnx.Module):   # one label, two different candidate sets: not one decision
        def __init__(self):
            self.a = Choice({"x": Identity(), "y": Zero()}, label="same")
            self.b = Choice({"x": Identity(), "z": Zero()}, label="same")
    with pytest.raises(ValueError, match="share the label 'same' but not their candidates"):
        NNXSpace(Twice())
    with pytest.raises(ValueError, match="no choice points"):
        NNXSpace(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="1/4 of the channels"):
        make_searcher(Net(nnx.Rngs(0)), "pc_darts")

    class NoComputeDtype(NNXSpace):   # a space that does not say it runs convolutions in bfloat16
        honours_compute_dtype = False
    with pytest.raises(ValueError, match="--precision bfloat16 sets the compute dtype"):
        make_searcher(NoComputeDtype(Net(nnx.Rngs(0))), "darts", precision="bfloat16")


def _step_twice(s, x, y):
    state = s.replicate(s.init(jax.random.PRNGKey(0)))
    f = s.compiled_step(donate=False)
    for i in range(2):
        state, m = f(state, s.shard((x, y)), s.shard((x[::-1], y[::-1])))
    return jax.device_get(state), jax.device_get(m)


@pytest.mark.skipif(jax.local_device_count() < 8, reason="needs 8 (simulated) devices; see tests/conftest.py")
@pytest.mark.parametrize("relaxation", ["darts", "gdas"])
def test_user_model_eight_devices_equal_one(relaxation):
    """BatchNorm is synchronised over the devices (its axis_name set by the space), so the
    data-parallel step is the one-device step on the global batch."""
    x, y = _x(16, seed=4), jnp.arange(16) % 10
    out = [_step_twice(make_searcher(Net(nnx.Rngs(0)), relaxation, num_devices=n, total_steps=4), x, y) for n in (1, 8)]
    (s1, m1), (s8, m8) = out
    assert abs(float(m1["val_loss"]) - float(m8["val_loss"])) < 1e-5
    for a, b in zip(jax.tree_util.tree_leaves((s1.arch, s1.params, s1.batch_stats)),
                    jax.tree_util.tree_leaves((s8.arch, s8.params, s8.batch_stats))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("relaxation", ["darts", "gdas"])
def test_user_model_unrolled_hypergradient_equals_explicit_objective(relaxation):
    """DARTS's second-order hypergradient through a user model: jax.grad of
    L_val(w - ξ(∇_w L_train(w, α) + wd·w), α), written out by hand. GDAS's sampled choice
    points differentiate twice through JAX's own switch (no custom backward pass there)."""
    s = make_searcher(Net(nnx.Rngs(0)), relaxation, hypergrad="unrolled",
                      hyper=Hyper(w_lr=0.5, w_grad_clip=1e9))
    state = s.init(jax.random.PRNGKey(0))
    tb, vb = (_x(8, 5), jnp.arange(8) % 10), (_x(8, 6), (jnp.arange(8) + 3) % 10)
    k = jax.random.PRNGKey(1)
    lr, wd = s.hparams({}, 0)

    def objective(arch):
        g = jax.grad(lambda w_: s.train_loss(w_, arch, state.batch_stats, tb, k, 0.0)[0])(state.params)
        w1 = jax.tree_util.tree_map(lambda wi, gi: wi - lr * (gi + wd * wi), state.params, g)
        return s.val_loss(arch, w1, state.batch_stats, vb, k, 0.0)[0]

    truth = jax.jit(jax.grad(objective))(state.arch)
    got, _ = jax.jit(lambda st: s.outer_grad(st, tb, vb, k, k, 0.0))(state)
    for label in truth:
        np.testing.assert_allclose(got["arch"][label], truth[label], rtol=1e-3, atol=1e-7)
    first = jax.grad(lambda a: s.val_loss(a, state.params, state.batch_stats, vb, k, 0.0)[0])(state.arch)
    # the second-order term is far above the tolerance: dropping it would fail the comparison
    gap = max(float(jnp.abs(first[g] - truth[g]).max()) for g in truth)
    assert gap > 10 * (1e-7 + 1e-3 * max(float(jnp.abs(truth[g]).max()) for g in truth))


class NarrowNet(Net):
    """``Net`` whose layer choice is built for ``1/partial_channels`` of the channels (PC-DARTS)."""

    def __init__(self, rngs, c=4, partial_channels=1):
        super().__init__(rngs, c)
        n = c // partial_channels
        self.op = Choice({"conv3": ConvBN(n, 3, rngs), "conv5": ConvBN(n, 5, rngs), "skip": Identity(),
                          "zero": Zero()}, label="op")


def test_pc_darts_partial_channels_on_a_user_model():
    """PC-DARTS (Xu et al., ICLR 2020, eq. 2) on a user model whose factory takes
    ``partial_channels``: the layer choice mixes its candidates on the first C/K channels, the
    rest bypass it and the channels are shuffled; the input choice mixes whole inputs. Checked
    against that mixture written by hand, then a search step through make_searcher. A model
    instance cannot rebuild its candidates narrower and is refused, naming the option."""
    from dnas.relaxations.pc_darts import channel_shuffle, partial_mix
    from dnas.supernet.spaces import build_space
    space = build_space(NarrowNet, partial_channels=2)
    assert space.groups == {"op": (1, 4), "act": (1, 2), "merge": (1, 3)}
    params, stats = space.init(jax.random.PRNGKey(0))
    w, x = _weights(space, 2), _x()
    logits, _ = space.apply(params, stats, x, w, partial_mix(2), Ctx(train=False))

    ref = space.module(params, stats)
    _set_train(ref, False)
    h0 = ref.bn(ref.stem(x))
    part = sum(w["op"][0, i] * op(h0[..., :2]) for i, op in enumerate(ref.op.candidates))
    h1 = channel_shuffle(jnp.concatenate([part, h0[..., 2:]], -1), 2)
    # the activation choice is a layer choice too: its (parameter-free) candidates see half the channels
    h2 = channel_shuffle(jnp.concatenate([w["act"][0, 0] * jax.nn.relu(h1[..., :2])
                                          + w["act"][0, 1] * jnp.tanh(h1[..., :2]), h1[..., 2:]], -1), 2)
    ins = [h0, h2, 0.5 * h0 + h2]
    want = ref.head(sum(w["merge"][0, i] * ins[i] for i in range(3)).mean((1, 2)))
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-6)

    s = make_searcher(NarrowNet, "pc_darts", relaxation_options={"k": 2}, total_steps=2)
    assert s.space.points["op"].candidates[0].conv.kernel.shape[-2:] == (2, 2)   # built narrow
    _, m = _step_twice(s, _x(8), jnp.arange(8) % 10)
    assert all(np.isfinite(float(v)) for v in m.values()) and float(m["a_grad_norm"]) > 0
    with pytest.raises(ValueError, match="must take the option partial_channels=K"):
        make_searcher(NarrowNet(nnx.Rngs(0)), "pc_darts", relaxation_options={"k": 2})


def test_a_narrowing_relaxation_builds_the_space_once_and_must_say_so():
    """A relaxation whose candidates run on 1/K of the channels names the option that gives K
    (``partial_channels_option``), so make_searcher builds the space once, narrow, instead of
    once at full width and again narrow: the model factory is called once, with K, both for K
    given and for PC-DARTS's default. A factory that narrows without saying so is refused."""
    from dnas.relaxations import REGISTRY, get_relaxation, partial_channels
    from dnas.relaxations.pc_darts import pc_darts
    calls = []

    def factory(rngs, partial_channels=1):
        calls.append(partial_channels)
        return NarrowNet(rngs, c=8, partial_channels=partial_channels)

    s = make_searcher(factory, "pc_darts", relaxation_options={"k": "2"})
    assert calls == [2] and s.relax.partial_channels == 2
    calls.clear()
    make_searcher(factory, "pc_darts")
    assert calls == [4] == [partial_channels("pc_darts")]
    assert partial_channels("darts") == 1 and partial_channels("pc_darts", k=1) == 1

    def quiet(space, k: int = 2):          # narrows, and does not say so
        return pc_darts(space, k=k)._replace(name="quiet")

    REGISTRY["quiet-test"] = quiet
    try:
        with pytest.raises(ValueError, match="partial_channels_option"):
            make_searcher(factory, "quiet-test")
        quiet.partial_channels_option = "k"
        calls.clear()
        assert make_searcher(factory, "quiet-test").relax.name == "quiet" and calls == [2]
        quiet.partial_channels_option = "nope"
        with pytest.raises(ValueError, match="partial_channels_option"):
            get_relaxation("quiet-test", space=s.space)
    finally:
        REGISTRY.pop("quiet-test", None)


# every estimator through a user model (unrolled is checked exactly above): `pytest -m slow`
@pytest.mark.slow
@pytest.mark.parametrize("estimator", sorted(set(ESTIMATORS) - {"first", "unrolled"}))
def test_every_estimator_runs_on_a_user_model(estimator):
    s = make_searcher(Net(nnx.Rngs(0)), "darts", hypergrad=estimator, total_steps=2)
    state, m = _step_twice(s, _x(8), jnp.arange(8) % 10)
    assert all(np.isfinite(float(v)) for v in m.values())
    assert float(m["a_grad_norm"]) > 0


def test_search_api_writes_a_run_and_its_genotype(tmp_path):
    """dnas.search on the embedded digits with a model factory and two seeds (vmapped): each
    seed's weights start from its own key, and each seed's genotype file reads back."""
    calls = []

    def factory(rngs):
        calls.append(1)
        return Net(rngs)
    result = dnas.search(factory, "digits", relaxation="gdas", epochs=1, max_steps=3, batch_size=16,
                         seeds=(0, 1), out=str(tmp_path / "run"), progress=False)
    assert isinstance(result.genotype, ChoiceGenotype) and set(result.genotype) == {"op", "act", "merge"}
    for seed, g in zip((0, 1), result.genotypes):
        assert load_genotype(tmp_path / "run" / f"seed-{seed}" / "genotype.json") == g
        alphas = json.loads((tmp_path / "run" / f"seed-{seed}" / "alphas.json").read_text())
        assert alphas["groups"]["op"]["op_names"] == ["conv3", "conv5", "skip", "zero"]
    assert (tmp_path / "run" / "seed-0" / "genotype.png").stat().st_size > 0
    members = [result.searcher.member(result.state, i) for i in (0, 1)]
    stem = [np.asarray(result.searcher.space.unstacked(m.params, m.batch_stats)[0]["stem"]["kernel"]) for m in members]
    assert not np.allclose(stem[0], stem[1])
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["space"] == "Net" and config["resolved"]["space_options"]["kind"] == "nnx"
    fixed = dnas.fix(result.supernet(1), result.genotypes[1])
    assert fixed(_x(2)).shape == (2, 10)


def test_plugin_space_and_relaxation_through_the_cli(tmp_path):
    """A space (with a candidate op dnas does not ship) and a relaxation from a user module
    (tests/dnas_test_plugin.py), loaded by import spec: the run's α probabilities are the
    plugin's tempered softmax of its α, not DARTS's."""
    from dnas.cli import main
    out = tmp_path / "run"
    rc = main(["search", "--space", "dnas_test_plugin:space", "--space-option", "width=4",
               "--relaxation", "dnas_test_plugin:sharp_softmax", "--relaxation-option", "temperature=0.25",
               "--epochs", "1", "--max-steps", "3", "--batch-size", "16", "--no-progress", "--out", str(out)])
    assert rc == 0
    g = json.loads((out / "genotype.json").read_text())
    assert g["space"] == "choices" and g["model"] == "Tiny" and g["choices"]["block"] in ("gated", "conv1", "skip", "zero")
    a = json.loads((out / "alphas.json").read_text())
    assert a["relaxation"] == "sharp_softmax"
    alpha = np.asarray(a["groups"]["block"]["alpha"])
    np.testing.assert_allclose(a["groups"]["block"]["probs"], jax.nn.softmax(alpha / 0.25, axis=-1), rtol=1e-5)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["resolved"]["space_options"]["choice_points"]["block"] == ["gated", "conv1", "skip", "zero"]
    # the built-in spaces' flags are refused for a plugin space, before anything is written
    with pytest.raises(SystemExit, match="--channels applies to the built-in spaces"):
        main(["search", "--space", "dnas_test_plugin:space", "--channels", "4", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("train", [False, True])
def test_derived_network_of_a_user_model_is_the_fixed_model(train):
    """``dnas train``'s network of a user model (``NNXSpace.network``) computes what
    ``dnas.fix`` of the freshly initialised model computes, BatchNorm in either mode, holds
    only the chosen candidates' parameters, and updates the running statistics in training."""
    from dnas.supernet.network import count_params
    space = NNXSpace(lambda rngs: Net(rngs))
    g = ChoiceGenotype({"op": "conv5", "act": "tanh", "merge": (0, 2)}, "Net")
    net = space.network(g, num_classes=10, in_channels=1)
    params, stats = net.init(jax.random.PRNGKey(3))
    fixed = dnas.fix(Net(nnx.Rngs(jax.random.PRNGKey(3))), g)
    _set_train(fixed, train)
    x = _x(8, seed=1)
    out = net.apply(params, stats, x, Ctx(train=train))
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(fixed(x)), rtol=1e-5, atol=1e-6)
    assert out.aux_logits is None
    assert count_params(params) == sum(a.size for a in jax.tree_util.tree_leaves(nnx.state(fixed, nnx.Param)))
    assert count_params(params) < count_params(space.init(jax.random.PRNGKey(3))[0])
    moved = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), out.state, stats)
    assert any(jax.tree_util.tree_leaves(moved)) == train
    with pytest.raises(ValueError, match="no option"):
        space.network(g, channels=8)


def test_derived_network_of_a_user_model_computes_in_bfloat16():
    """``dnas train --precision bfloat16`` on a user model: the fixed model's convolutions read
    bfloat16 (the kernel policy's convolution casts input and kernel), its logits stay float32
    and within bfloat16's precision of the float32 network's."""
    space = NNXSpace(lambda rngs: Net(rngs))
    g = ChoiceGenotype({"op": "conv5", "act": "tanh", "merge": (0, 2)}, "Net")
    net = space.network(g, num_classes=10, in_channels=1)
    params, stats = net.init(jax.random.PRNGKey(3))
    x = _x(8, seed=1)

    def logits(dtype):
        return net.apply(params, stats, x, Ctx(train=True, compute_dtype=dtype)).logits
    l32, l16 = np.asarray(logits(None)), np.asarray(logits(jnp.bfloat16))
    assert l16.dtype == np.float32 and not np.array_equal(l16, l32)
    np.testing.assert_allclose(l16, l32, rtol=5e-2, atol=2e-2 * float(np.abs(l32).max()))

    def conv_operands(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                yield tuple(str(v.aval.dtype) for v in eqn.invars)
            for sub in eqn.params.values():
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from conv_operands(inner)
    convs = list(conv_operands(jax.make_jaxpr(lambda: logits(jnp.bfloat16))().jaxpr))
    assert len(convs) == 2 and all(c == ("bfloat16", "bfloat16") for c in convs), convs   # stem and conv5


class DropNet(nnx.Module):
    """A choice point, then dropout, then a linear readout (``readout=False``: the dropout's
    output is the logits)."""

    def __init__(self, rngs, with_rngs=True, readout=False):
        self.op = Choice({"id": Identity(), "neg": jnp.negative}, label="op")
        self.drop = nnx.Dropout(0.5, rngs=rngs if with_rngs else None)
        self.head = nnx.Linear(100, 10, rngs=rngs) if readout else None

    def __call__(self, x):
        h = self.drop(self.op(x))
        return h if self.head is None else self.head(h)


@pytest.mark.parametrize("with_rngs", [True, False])
def test_fixed_model_trains_with_its_dropout_and_searches_without(with_rngs):
    """``dnas train`` runs a user model's dropout, its masks a function of the step's key; the
    evaluation and the search run without it. The kept entries of a tensor of ones are
    1/(1 - 0.5) = 2 (negated by the chosen op), the dropped ones 0, each with probability 0.5."""
    from dnas.supernet.network import DropPath
    space = NNXSpace(lambda rngs: DropNet(rngs, with_rngs=with_rngs))
    net = space.network(ChoiceGenotype({"op": "neg"}, "DropNet"))
    assert net.stochastic
    params, stats = net.init(jax.random.PRNGKey(0))
    x = jnp.ones((64, 100))
    train_logits = jax.jit(lambda key: net.apply(params, stats, x, Ctx(train=True), DropPath(key, 0.0)).logits)
    a, b = np.asarray(train_logits(jax.random.PRNGKey(1))), np.asarray(train_logits(jax.random.PRNGKey(2)))
    assert set(np.unique(a)) == {-2.0, 0.0}
    assert abs(np.mean(a == 0) - 0.5) < 0.03          # 6,400 draws: 4.8 standard deviations
    np.testing.assert_array_equal(a, train_logits(jax.random.PRNGKey(1)))   # the key decides the masks
    assert 0.4 < np.mean(a != b) < 0.6                 # another key, independent masks (0.5 expected)
    np.testing.assert_array_equal(net.apply(params, stats, x, Ctx(train=False)).logits, -x)
    p, s = space.init(jax.random.PRNGKey(0))
    searched, _ = space.apply(p, s, x, {"op": jnp.array([[0.0, 1.0]])}, dense_mix, Ctx(train=True))
    np.testing.assert_array_equal(searched, -x)


def test_trainer_draws_a_user_models_dropout_per_step():
    """Through the trainer: each step draws new masks (step 0 and step 1 of the same weights
    give different losses), the same step the same ones; a model without dropout gets no key."""
    from dnas.supernet.space_base import GENERIC_TRAIN_PROTOCOL
    from dnas.train import Trainer
    net = NNXSpace(lambda rngs: DropNet(rngs, readout=True)).network(ChoiceGenotype({"op": "id"}, "DropNet"))
    trainer = Trainer(net, GENERIC_TRAIN_PROTOCOL, total_steps=10)
    state = trainer.init(jax.random.PRNGKey(0))
    x = jnp.asarray(np.random.RandomState(0).randn(32, 100), jnp.float32)
    y = jnp.asarray(np.arange(32) % 10, jnp.int32)
    step = jax.jit(trainer.step)
    loss = [float(step(state._replace(step=jnp.int32(i)), x, y, 0.0)[1]["train_loss"]) for i in (0, 1, 0)]
    assert loss[0] == loss[2] and loss[0] != loss[1]
    plain = NNXSpace(Net(nnx.Rngs(0))).network(ChoiceGenotype({"op": "conv3", "act": "relu", "merge": (0, 1)},
                                                              "Net"))
    assert not plain.stochastic


def test_dnas_train_retrains_a_user_models_search(tmp_path):
    """``dnas train RUN`` on a search of a user's model (by import spec): the space is rebuilt
    from the run's config, the network is the fixed model under the generic protocol, and the
    regularisers its network does not have are refused before anything is written."""
    from dnas.cli import main
    from dnas.supernet.space_base import GENERIC_TRAIN_PROTOCOL
    run = tmp_path / "run"
    assert main(["search", "--space", "dnas_test_plugin:space", "--space-option", "width=4", "--epochs", "1",
                 "--max-steps", "3", "--batch-size", "16", "--no-progress", "--out", str(run)]) == 0
    chosen = json.loads((run / "genotype.json").read_text())["choices"]
    out = tmp_path / "train"
    assert main(["train", str(run), "--epochs", "6", "--batch-size", "32", "--lr", "0.2", "--no-progress",
                 "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    conf = json.loads((out / "config.json").read_text())["resolved"]
    assert summary["space"] == conf["space"] == "Tiny" and conf["network"]["choices"] == chosen
    assert conf["protocol"]["nesterov"] == GENERIC_TRAIN_PROTOCOL["nesterov"] and conf["protocol"]["lr"] == 0.2
    from dnas_test_plugin import Tiny
    fixed = dnas.fix(Tiny(1, 10, 4, nnx.Rngs(0)), chosen)
    assert summary["params"] == sum(a.size for a in jax.tree_util.tree_leaves(nnx.state(fixed, nnx.Param)))
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in epochs if "test_acc" in r]
    assert len(epochs) == 6 and epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert epochs[-1]["test_acc"] > 0.25      # 10 classes: chance is 0.1 (measured 0.32)
    for flags, what in ((["--drop-path", "0.1"], "no drop path"), (["--auxiliary-weight", "0.4"], "no auxiliary head")):
        assert main(["train", str(run), "--epochs", "1", "--no-progress", "--out", str(tmp_path / "bad"), *flags]) == 2
        assert not (tmp_path / "bad").exists(), what
    (tmp_path / "bare.json").write_text((run / "genotype.json").read_text())
    assert main(["train", str(tmp_path / "bare.json"), "--no-progress", "--out", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()


def test_unknown_specs_name_the_problem():
    with pytest.raises(ValueError, match="cannot import module 'no_such_pkg.spaces'"):
        make_searcher("no_such_pkg.spaces:net")
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        make_searcher("dnas_test_plugin:nope")
    with pytest.raises(ValueError, match="has no option"):
        make_searcher("dnas_test_plugin:space", space_options={"in_channels": 1, "num_classes": 10, "depth": 3})
    with pytest.raises(ValueError, match="unknown relaxation"):
        make_searcher(Net(nnx.Rngs(0)), "no_such_relaxation")
    with pytest.raises(ValueError, match="not a dnas.relaxations.Relaxation"):
        get_relaxation("dnas_test_plugin:space", in_channels=1, num_classes=10)


def test_registered_names():
    from dnas import plugins
    from dnas.relaxations import REGISTRY
    import dnas_test_plugin as plugin
    dnas.register_space("tiny-test", plugin.space)
    dnas.register_relaxation("sharp-test", plugin.sharp_softmax)
    try:
        s = make_searcher("tiny-test", "sharp-test", space_options={"in_channels": 1, "num_classes": 10, "width": 4},
                          relaxation_options={"temperature": 2.0})
        assert s.relax.name == "sharp_softmax" and s.space.name == "Tiny"
        with pytest.raises(ValueError, match="built-in space"):
            dnas.register_space("nb201", plugin.space)
    finally:
        plugins.USER_SPACES.pop("tiny-test", None)
        REGISTRY.pop("sharp-test", None)


def test_latency_profile_and_objective_of_a_user_model(tmp_path):
    """`dnas latency profile` of a plugin model gives a table keyed by its choice point; the
    search's expected latency is Σ_o p_o · table[o] + fixed under that table."""
    from dnas.cli import main
    from dnas.latency.table import LatencyTable
    path = tmp_path / "tiny.json"
    assert main(["latency", "profile", "--space", "dnas_test_plugin:space", "--space-option", "width=8",
                 "--input-size", "8", "--in-channels", "1", "--repeats", "3", "--warmup", "1", "--no-progress",
                 "--out", str(path)]) == 0
    table = LatencyTable.load(path)
    ops = ("gated", "conv1", "skip", "zero")
    assert set(table.keys()) == {f"choice/block/0/{o}" for o in ops} | {"fixed"}
    assert table.meta["granularity"] == "choice_point" and table.meta["space"] == "Tiny"
    ms = {o: table.entries[f"choice/block/0/{o}"]["mean_ms"] for o in ops}
    assert all(np.isfinite(v) and v >= 0 for v in ms.values())
    s = make_searcher("dnas_test_plugin:space", "darts", space_options={"in_channels": 1, "num_classes": 10},
                      latency={"table_path": str(path), "loss": "hinge", "target": 1.0, "weight": 0.1})
    probs = {"block": jnp.asarray([[0.1, 0.2, 0.3, 0.4]])}
    want = sum(p * ms[o] for p, o in zip([0.1, 0.2, 0.3, 0.4], ops)) + table.entries["fixed"]["mean_ms"]
    np.testing.assert_allclose(float(s.latency.expected(probs)), want, rtol=1e-5)


# ----------------------------------------------------------------------------- cell nodes (DARTS's rule)

class DartsShapedCells(nnx.Module):
    """DARTS's normal and reduction cells as labelled edges: node ``d`` (2..5) sums one
    ``Choice(node=, keep=2)`` per predecessor, over DARTS's op names. The candidates are
    parameter-free stand-ins (derivation reads names and scores only)."""

    def __init__(self, keep: int = 2):
        from dnas.supernet.genotype import DARTS_EDGES, DARTS_OPS, edge_label

        def ops():
            return {name: Zero() if name == "none" else Identity() if name == "skip_connect"
                    else (lambda x, k=k: x * (k + 1)) for k, name in enumerate(DARTS_OPS)}
        self.edges = DARTS_EDGES
        self.cells = nnx.List([nnx.List([Choice(ops(), label=f"{kind}/{edge_label(s, d)}", node=f"{kind}/{d}",
                                                keep=keep) for s, d in DARTS_EDGES])
                               for kind in ("normal", "reduce")])

    def __call__(self, x):
        out = 0.0
        for cell in self.cells:
            states = [x, x]
            for d in range(2, 6):
                states.append(sum(edge(states[s]) for edge, (s, dd) in zip(cell, self.edges) if dd == d))
            out = out + sum(states[2:])
        return out.mean((1, 2))


def test_cell_node_edges_derive_by_darts_rule():
    """Choice points marked as a node's edges derive what dnas's DARTS derivation
    (``derive_darts``, DARTS's ``genotype()``) derives from the same scores, ties included
    (scores rounded to one decimal), dropped edges as ``none``; without the marks every edge
    takes its argmax, ``none`` included; ``dnas.fix`` puts Zero on the dropped edges."""
    from dnas.supernet.genotype import DARTS_EDGES, derive_darts, edge_label
    space = NNXSpace(DartsShapedCells())
    rng = np.random.default_rng(0)
    for _ in range(30):
        raw = {k: rng.random((14, 8)).round(1) for k in ("normal", "reduce")}
        want = derive_darts(raw["normal"], raw["reduce"])
        scores = {f"{k}/{edge_label(s, d)}": raw[k][e][None] for k in raw for e, (s, d) in enumerate(DARTS_EDGES)}
        got = space.derive(scores)
        assert got.choices == {label: want[label] for label in scores}
        assert sum(c != "none" for c in got.choices.values()) == 16
    fixed = dnas.fix(DartsShapedCells(), got)
    kept = [isinstance(e, Zero) for cell in fixed.cells for e in cell]
    assert kept == [got.choices[label] == "none" for label in scores]
    # keep=3: node 2 has two edges and keeps both; nodes 3-5 keep three
    g3 = NNXSpace(DartsShapedCells(keep=3)).derive(scores)
    assert sum(c != "none" for c in g3.choices.values()) == 2 * (2 + 3 + 3 + 3)


def test_cell_node_refusals():
    ops = {"none": Zero(), "skip": Identity(), "double": lambda x: 2 * x}
    with pytest.raises(ValueError, match="keep=2 needs a node"):
        Choice(ops, label="a", keep=2)
    with pytest.raises(ValueError, match="keep must be a positive"):
        Choice(ops, label="a", node="n", keep=0)
    with pytest.raises(ValueError, match="needs a 'zero' option"):
        Choice(ops, label="a", node="n", keep=1, none="zero")

    class Disagree(nnx.Module):
        def __init__(self):
            self.a = Choice(ops, label="a", node="n", keep=1)
            self.b = Choice(ops, label="b", node="n", keep=2)

        def __call__(self, x):
            return self.a(x) + self.b(x)
    with pytest.raises(ValueError, match="of node 'n' disagree: keep=1"):
        NNXSpace(Disagree())


def test_pc_darts_normalises_a_user_models_edges_over_their_node():
    """PC-DARTS's edge normalisation (Xu et al., ICLR 2020, eq. 4) on a user model: the edges
    marked with one node are separate choice points, each with its own β, and are weighted by
    the softmax of their β over that node (a reduction cell's node is not a normal cell's).
    The mixed output equals the mixture written by hand, and the derivation ranks edge weight
    × op weight, as DARTS's derivation of PC-DARTS's scores does."""
    from dnas.searcher import make_searcher
    from dnas.supernet.genotype import DARTS_EDGES, DARTS_OPS, derive_darts, edge_label
    s = make_searcher(DartsShapedCells(), "pc_darts", relaxation_options={"k": 1})
    rng = np.random.default_rng(0)
    kinds = ("normal", "reduce")
    labels = {k: [f"{k}/{edge_label(a, d)}" for a, d in DARTS_EDGES] for k in kinds}
    alpha = {k: rng.standard_normal((14, 8)) for k in kinds}
    beta = {k: 2.0 * rng.standard_normal(14) for k in kinds}
    arch = {"alpha": {lab: jnp.asarray(alpha[k][e][None], jnp.float32) for k in kinds
                      for e, lab in enumerate(labels[k])},
            "beta": {lab: jnp.asarray(beta[k][e:e + 1], jnp.float32) for k in kinds for e, lab in enumerate(labels[k])}}
    params, stats = s.space.init(jax.random.PRNGKey(0))
    x = jnp.ones((2, 4, 4, 3), jnp.float32)
    got, _ = s._forward(params, stats, arch, x, None, 0.0)

    # by hand: DartsShapedCells's op k scales its input by k + 1 (none by 0, skip_connect by 1)
    scale = np.asarray([0.0 if o == "none" else 1.0 if o == "skip_connect" else k + 1
                        for k, o in enumerate(DARTS_OPS)])
    total, scores = 0.0, {}
    for k in kinds:
        p = np.exp(alpha[k]) / np.exp(alpha[k]).sum(1, keepdims=True)
        edge_w = np.empty(14)
        for d in range(2, 6):
            into = [e for e, (_, dd) in enumerate(DARTS_EDGES) if dd == d]
            edge_w[into] = np.exp(beta[k][into]) / np.exp(beta[k][into]).sum()
        scores[k] = p * edge_w[:, None]
        states = [1.0, 1.0]
        for d in range(2, 6):
            states.append(sum(edge_w[e] * (p[e] @ scale) * states[a] for e, (a, dd) in enumerate(DARTS_EDGES)
                              if dd == d))
        total += sum(states[2:])
    np.testing.assert_allclose(np.asarray(got), np.full((2, 3), total), rtol=1e-5)

    g = s.space.derive(s.relax.derive_scores(arch))
    want = derive_darts(scores["normal"], scores["reduce"])
    assert g.choices == {lab: want[lab] for lab in g.choices}
    # the edge weights changed the derivation: op weights alone derive another cell
    plain = derive_darts(np.exp(alpha["normal"]), np.exp(alpha["reduce"]))
    assert any(plain[lab] != want[lab] for lab in g.choices)


class OneNode(nnx.Module):
    """A cell node summing three labelled edges that keep two, each a 3x3 convolution, a skip
    or ``none``."""

    def __init__(self, rngs, c=4, group=None):
        self.stem = nnx.Conv(1, c, (3, 3), rngs=rngs)
        self.edges = nnx.List([Choice({"conv": nnx.Conv(c, c, (3, 3), rngs=rngs), "skip": Identity(), "none": Zero()},
                                      label=f"e{i}", node="n", keep=2, group=group) for i in range(3)])
        self.head = nnx.Linear(c, 10, rngs=rngs)

    def __call__(self, x):
        h = self.stem(x)
        return self.head(sum(e(jnp.tanh((i + 1) * h)) for i, e in enumerate(self.edges)).mean((1, 2)))


def test_perturbation_selection_on_a_user_models_cell_node():
    """DARTS-PT (``dnas.select``) on a user model's node edges: every edge selects the op whose
    removal costs the supernet most (never ``none``), and the node keeps its two edges whose
    selected op costs most to remove, the third becoming ``none``."""
    from dnas.select import PTOptions, perturbation_select
    s = make_searcher(OneNode(nnx.Rngs(0)), "darts", total_steps=4)
    state = s.init(jax.random.PRNGKey(0))
    x, y = np.asarray(_x(96, seed=3)), np.arange(96) % 10
    sel = perturbation_select(s, state, (x[:64], y[:64]), (x[64:], y[64:]),
                              PTOptions(eval_examples=64, batch_size=64, tune_steps=2, tune_batch_size=16))
    chosen = {d["group"]: d for d in sel["decisions"]}      # a user model's group is its choice point
    assert sorted(chosen) == ["e0", "e1", "e2"]
    for d in chosen.values():
        assert d["chosen"] in ("conv", "skip")
        assert d["accuracy_without"][d["chosen"]] == min(d["accuracy_without"].values())
    cost = {label: max(d["accuracy"] - d["accuracy_without"][d["chosen"]], 0.0) for label, d in chosen.items()}
    dropped = min(sorted(cost), key=lambda label: (cost[label], -int(label[1])))   # ties: the later edge goes
    g = sel["genotype"]
    assert [g[label] for label in ("e0", "e1", "e2")] == [
        "none" if label == dropped else chosen[label]["chosen"] for label in ("e0", "e1", "e2")]


def test_grouped_choice_points_are_the_rows_of_one_alpha():
    """``Choice(..., group=)``: the choice points of a group are the rows of one α matrix (in
    graph order), and the search computes with it what it computes with one α row per label:
    the same logits and α-gradient, PC-DARTS's edge weights row by row, the same genotype."""
    grouped, plain = NNXSpace(OneNode(nnx.Rngs(0), group="cell")), NNXSpace(OneNode(nnx.Rngs(0)))
    labels = ["e0", "e1", "e2"]
    assert grouped.groups == {"cell": (3, 3)} and plain.groups == {lab: (1, 3) for lab in labels}
    assert grouped.choice_point_names("cell") == labels
    assert grouped.choice_point_nodes("cell") == [("node", "n")] * 3
    params, stats = grouped.init(jax.random.PRNGKey(0))
    pparams, pstats = plain.init(jax.random.PRNGKey(0))
    alpha = jnp.asarray(np.random.default_rng(1).standard_normal((3, 3)), jnp.float32)
    x = _x(4)

    def loss(space, p, s, to_samples):
        def f(a):
            logits, _ = space.apply(p, s, x, to_samples(jax.nn.softmax(a, -1)), dense_mix, Ctx(train=True))
            return jnp.sum(jnp.sin(logits)), logits
        return jax.value_and_grad(f, has_aux=True)(alpha)

    (_, got), got_g = loss(grouped, params, stats, lambda w: {"cell": w})
    (_, want), want_g = loss(plain, pparams, pstats, lambda w: {lab: w[i][None] for i, lab in enumerate(labels)})
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_g, want_g, rtol=1e-4, atol=1e-6)
    assert float(jnp.abs(got_g).max()) > 1e-3

    beta = jnp.asarray([0.3, -1.0, 2.0], jnp.float32)
    pg = get_relaxation("pc_darts", space=grouped, k=1).sample({"alpha": {"cell": alpha}, "beta": {"cell": beta}},
                                                               None, 0.0)
    pp = get_relaxation("pc_darts", space=plain, k=1).sample(
        {"alpha": {lab: alpha[i][None] for i, lab in enumerate(labels)},
         "beta": {lab: beta[i:i + 1] for i, lab in enumerate(labels)}}, None, 0.0)
    np.testing.assert_allclose(pg["cell"], np.concatenate([pp[lab] for lab in labels]), rtol=1e-6)
    assert not np.allclose(pg["cell"], jax.nn.softmax(alpha, -1), atol=1e-2)   # the edges are weighed by β

    g = grouped.derive({"cell": alpha})
    assert g.choices == plain.derive({lab: alpha[i][None] for i, lab in enumerate(labels)}).choices
    np.testing.assert_array_equal(grouped.genotype_indices(g)["cell"],
                                  [plain.genotype_indices(g)[lab][0] for lab in labels])


def test_a_group_of_choice_points_with_other_options_is_refused():
    class Mixed(nnx.Module):
        def __init__(self, rngs):
            self.a = Choice({"skip": Identity(), "none": Zero()}, label="a", group="g")
            self.b = Choice({"skip": Identity(), "tanh": jnp.tanh}, label="b", group="g")

        def __call__(self, x):
            return self.b(self.a(x))

    with pytest.raises(ValueError, match="'a' and 'b' of group 'g' offer different options"):
        NNXSpace(Mixed(nnx.Rngs(0)))
