"""The anti-collapse remedies that change the search step (dnas.remedies) and FairDARTS, each
against an independent truth: hand-written mixtures, closed-form gradients and maxima, the
statistics of the random perturbation, and 8 devices against 1."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dnas.cli import main
from dnas.relaxations import dense_mix, get_relaxation
from dnas.relaxations.fair_darts import zero_one_loss
from dnas.remedies import (auxiliary_skip, beta_decay_loss, get_remedies, linear_decay, perturb_samples, pgd_linf,
                           sdarts)
from dnas.searcher import make_searcher
from test_nnx import Net, _step_twice, _x


class _Ops:
    """Two candidate ops (x ↦ 2x, x ↦ x²) in the form a relaxation's mix consumes."""

    auxiliary_skip = True

    def all(self, x):
        return [2.0 * x, x * x], None


def test_darts_minus_adds_a_linearly_decaying_skip_to_the_mixture():
    """DARTS-: ō(x) = β·x + Σ w_o·o(x) with β = β₀(1 − progress), on a mixture written by hand."""
    relax = get_remedies({"darts_minus": {"beta0": 0.8}})[0].relaxation(get_relaxation("darts"))
    alpha = {"g": jnp.asarray([[0.3, -0.2]], jnp.float32)}
    x = jnp.asarray(np.random.RandomState(0).randn(2, 3, 3, 4), jnp.float32)
    w = np.exp([0.3, -0.2]) / np.exp([0.3, -0.2]).sum()
    for progress, beta in ((0.0, 0.8), (0.25, 0.6), (1.0, 0.0)):
        sample = jax.tree_util.tree_map(lambda a: a[0], relax.sample(alpha, jax.random.PRNGKey(0), progress)["g"])
        y, _ = relax.mix(sample, _Ops(), x)
        want = beta * np.asarray(x) + w[0] * 2 * np.asarray(x) + w[1] * np.asarray(x) ** 2
        np.testing.assert_allclose(np.asarray(y), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose([float(linear_decay(1.0)(p)) for p in (0, 0.5, 1)], [1, 0.5, 0])


def test_darts_minus_skip_on_a_reducing_edge_is_the_average_pool():
    x = np.random.RandomState(1).randn(2, 8, 8, 3).astype(np.float32)
    got = auxiliary_skip(jnp.asarray(x), (2, 4, 4, 3))
    np.testing.assert_allclose(np.asarray(got), x.reshape(2, 4, 2, 4, 2, 3).mean((2, 4)), rtol=1e-6)
    with pytest.raises(ValueError, match="channels must match"):
        auxiliary_skip(jnp.asarray(x), (2, 4, 4, 6))


def test_darts_minus_supernet_ends_as_the_plain_one(digit_batches):
    """At the end of the search (β = 0) the NB201 supernet with DARTS- equals the plain one; before, it differs."""
    opts = dict(channels=4, cells_per_stage=1, in_channels=1, num_classes=10)
    plain = make_searcher("nb201", "darts", space_options=opts)
    minus = make_searcher("nb201", "darts", space_options=opts, remedies={"darts_minus": {}})
    state = plain.init(jax.random.PRNGKey(0))
    (_, (x, _)), = digit_batches(1, batch=8)
    out = {}
    for name, s in (("plain", plain), ("minus", minus)):
        for p in (0.5, 1.0):
            out[name, p] = np.asarray(s._forward(state.params, state.batch_stats, state.arch, x, state.key,
                                                 jnp.float32(p), train=False)[0])
    np.testing.assert_allclose(out["minus", 1.0], out["plain", 1.0], rtol=1e-5, atol=1e-6)
    assert np.abs(out["minus", 0.5] - out["plain", 0.5]).max() > 1e-3


def test_beta_decay_loss_gradient_is_the_softmax_over_the_number_of_choice_points():
    """∂/∂α mean_k logsumexp(α_k) = softmax(α_k)/N, and the architecture objective gains λ(t)·L_β
    with λ rising linearly to the weight."""
    rng = np.random.RandomState(2)
    arch = {"a": jnp.asarray(rng.randn(3, 5), jnp.float32), "b": jnp.asarray(rng.randn(2, 5), jnp.float32)}
    g = jax.grad(beta_decay_loss)(arch)
    for k, a in arch.items():
        np.testing.assert_allclose(np.asarray(g[k]), np.asarray(jax.nn.softmax(a, -1)) / 5, rtol=1e-5)
    relax = get_remedies({"beta_decay": {"weight": 20}})[0].relaxation(get_relaxation("darts"))
    want = 20 * 0.3 * np.mean([np.log(np.exp(r).sum()) for a in arch.values() for r in np.asarray(a)])
    assert float(relax.arch_penalty(arch, 0.3)) == pytest.approx(want, rel=1e-5)


def test_sdarts_adv_finds_the_worst_corner_of_its_ball_and_raises_the_loss():
    """On a linear loss Σ c·(w + δ) the L∞-ball maximum is the corner δ = ε·sign(c), cut by the
    [0, 1] range of the weights: PGD reaches it exactly, stays in the ball, and raises the loss
    above both the unperturbed and randomly perturbed weights. Integer leaves are left alone."""
    rng = np.random.RandomState(3)
    w = jax.nn.softmax(jnp.asarray(rng.randn(4, 5), jnp.float32), -1)
    samples = {"g": {"weights": w, "index": jnp.arange(4, dtype=jnp.int32)}}
    c = jnp.asarray(rng.randn(4, 5), jnp.float32)

    def loss(delta):
        return jnp.sum(c * perturb_samples(samples, delta)["g"]["weights"])
    eps = 0.3
    delta = pgd_linf(loss, samples, jax.random.PRNGKey(0), eps, steps=7)
    d = np.asarray(delta["g"]["weights"])
    assert np.abs(d).max() <= eps + 1e-6
    corner = np.clip(np.asarray(w) + eps * np.sign(np.asarray(c)), 0, 1) - np.asarray(w)
    np.testing.assert_allclose(d, corner, atol=1e-6)
    assert np.all(np.asarray(delta["g"]["index"]) == 0)
    zero = jax.tree_util.tree_map(jnp.zeros_like, delta)
    rs = sdarts("rs", epsilon=eps, epsilon_min=eps).perturbation(loss, samples, jax.random.PRNGKey(1), 0.0)
    assert float(loss(delta)) > float(loss(rs)) and float(loss(delta)) > float(loss(zero)) + 0.5


def test_sdarts_rs_is_uniform_in_its_ball_with_a_rising_radius():
    samples = {"g": jnp.full((200, 50), 0.5)}
    remedy = sdarts("rs", epsilon=0.3, epsilon_min=0.03)
    for progress, eps in ((0.0, 0.03), (0.5, 0.165), (1.0, 0.3)):
        d = np.asarray(remedy.perturbation(None, samples, jax.random.PRNGKey(4), progress)["g"])
        assert np.abs(d).max() <= eps + 1e-7 and np.abs(d).max() > 0.99 * eps
        assert abs(d.mean()) < 0.01 * eps and d.var() == pytest.approx(eps ** 2 / 3, rel=0.03)
        assert float(remedy.metrics(progress)["sdarts_epsilon"]) == pytest.approx(eps)


@pytest.mark.slow  # ~40 s on 2 cores; the worst corner itself: test_sdarts_adv_finds_the_worst_corner_...
def test_sdarts_adv_weight_step_trains_on_a_worse_supernet(digit_batches):
    """In the searcher, the adversarial perturbation of the mixing weights raises the training
    loss the weight step differentiates."""
    s = make_searcher("nb201", "darts", remedies={"sdarts": {"mode": "adv", "epsilon": 0.3, "epsilon_min": 0.3}},
                      space_options=dict(channels=4, cells_per_stage=1, in_channels=1, num_classes=10))
    state = s.init(jax.random.PRNGKey(0))
    ((x, y), _), = digit_batches(1, batch=16)
    args = (state.params, state.arch, state.batch_stats, (x, y), state.key, jnp.float32(0.5))
    delta = jax.jit(s.weight_step_delta)(*args)
    base = float(s.train_loss(*args)[0])
    attacked = float(s.train_loss(*args, delta)[0])
    assert max(np.abs(np.asarray(a)).max() for a in jax.tree_util.tree_leaves(delta)) <= 0.3 + 1e-6
    assert attacked > base + 1e-3


def test_fair_darts_mixes_by_independent_sigmoids_with_the_zero_one_loss():
    relax = get_relaxation("fair_darts", w01=10.0)
    alpha = {"g": jnp.asarray([[2.0, -1.0, 0.1]], jnp.float32)}
    sig = 1 / (1 + np.exp(-np.asarray([2.0, -1.0, 0.1])))
    w = relax.sample(alpha, jax.random.PRNGKey(0), 0.0)["g"][0]
    np.testing.assert_allclose(np.asarray(w), sig, rtol=1e-6)     # not normalised: the ops cooperate
    assert float(relax.arch_penalty(alpha, 0.0)) == pytest.approx(-10 * np.mean((sig - 0.5) ** 2), rel=1e-5)
    g = np.asarray(jax.grad(zero_one_loss)(alpha)["g"][0])
    np.testing.assert_allclose(g, -2 * (sig - 0.5) * sig * (1 - sig) / 3, rtol=1e-5)  # pushes σ away from ½
    np.testing.assert_allclose(np.asarray(relax.derive_scores(alpha)["g"][0]), sig, rtol=1e-6)
    x = jnp.ones((1, 2, 2, 1))
    y, _ = dense_mix(w, type("C", (), {"all": lambda self, x: ([x, 2 * x, 3 * x], None)})(), x)
    assert float(y[0, 0, 0, 0]) == pytest.approx(sig @ [1, 2, 3], rel=1e-6)


def test_bad_remedies_are_refused_by_name(tmp_path, capsys):
    for spec, match in (({"nope": {}}, "unknown remedy 'nope'"), ({"sdarts": {"mode": "pgd"}}, "mode must be"),
                        ({"darts_minus": {"beta": 1}}, "no option"), ({"sdarts": {"epsilon": "big"}}, "epsilon")):
        with pytest.raises(ValueError, match=match):
            get_remedies(spec)
    out = tmp_path / "run"
    assert main(["search", "--remedy", "nope", "--out", str(out), "--no-progress"]) == 2
    assert "unknown remedy 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--remedy sdarts expects KEY=VALUE"):
        main(["search", "--remedy", "sdarts:adv", "--out", str(out), "--no-progress"])
    assert not out.exists()


REMEDY_CASES = [
    pytest.param("darts", {"darts_minus": {}, "beta_decay": {}, "sdarts": {"mode": "adv"}}, id="minus+beta+adv"),
    pytest.param("gdas", {"sdarts": {"mode": "rs"}}, id="gdas+rs"),
    pytest.param("fair_darts", {}, id="fair_darts"),
]


@pytest.mark.skipif(jax.local_device_count() < 8, reason="needs 8 (simulated) devices; see tests/conftest.py")
@pytest.mark.parametrize("relaxation,remedies", REMEDY_CASES)
def test_remedies_on_a_user_model_eight_devices_equal_one(relaxation, remedies):
    """Every remedy data parallel on a user's NNX model: the perturbation is drawn from the
    replicated key and the attack ascends the global batch's loss, so 8 devices equal 1."""
    x, y = _x(16, seed=4), jnp.arange(16) % 10
    (s1, m1), (s8, m8) = [_step_twice(make_searcher(Net(nnx.Rngs(0)), relaxation, num_devices=n, total_steps=4,
                                                   remedies=remedies), x, y) for n in (1, 8)]
    assert abs(float(m1["train_loss"]) - float(m8["train_loss"])) < 1e-5
    for a, b in zip(jax.tree_util.tree_leaves((s1.arch, s1.params, s1.batch_stats)),
                    jax.tree_util.tree_leaves((s8.arch, s8.params, s8.batch_stats))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_remedies_through_the_cli(tmp_path):
    out = tmp_path / "run"
    rc = main(["search", "--relaxation", "fair_darts", "--remedy", "darts_minus:beta0=0.5", "--remedy",
               "sdarts:mode=rs,epsilon=0.1", "--remedy", "beta_decay", "--epochs", "1", "--limit-examples", "128",
               "--log-every", "1", "--channels", "4", "--cells", "1", "--batch-size", "32", "--no-progress",
               "--out", str(out)])
    assert rc == 0
    steps = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "step"]
    assert steps[0]["aux_skip_beta"] == pytest.approx(0.5) and steps[-1]["aux_skip_beta"] < 0.5
    assert steps[0]["sdarts_epsilon"] == pytest.approx(0.03) and "beta_decay_weight" in steps[0]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["remedies"] == {"beta_decay": {}, "darts_minus": {"beta0": 0.5}, "sdarts": {"mode": "rs", "epsilon": 0.1}}
    assert json.loads((out / "genotype.json").read_text())["arch"].count("~") == 6


@pytest.mark.slow  # ~35 s on 2 cores; the selection itself: test_planted (DARTS-PT recovers the plant)
def test_darts_pt_through_the_cli_on_a_search_run(tmp_path, capsys):
    """`dnas select --method pt RUN` on a finished search: one decision per NB201 edge, each the op
    whose removal cost the most accuracy, written as a genotype; a sampled relaxation is refused."""
    from test_nb201_table import synthetic_accuracy, write_synthetic_table
    table = write_synthetic_table(tmp_path / "table.csv")
    out = tmp_path / "run"
    tiny = ["--epochs", "1", "--limit-examples", "192", "--channels", "4", "--cells", "1", "--batch-size", "32",
            "--no-progress"]
    assert main(["search", "--out", str(out), "--nb201-table", str(table)] + tiny) == 0
    assert main(["select", "--method", "pt", str(out), "--eval-examples", "64", "--tune-steps", "2"]) == 0
    sel = json.loads((out / "select-pt" / "selection.json").read_text())
    assert len(sel["decisions"]) == 6 and sorted(i for _, i in sel["order"]) == list(range(6))
    for d in sel["decisions"]:
        assert "none" not in d["accuracy_without"]
        assert d["chosen"] == min(d["accuracy_without"], key=lambda op: d["accuracy_without"][op])
    arch = json.loads((out / "select-pt" / "genotype.json").read_text())["arch"]
    assert [op for op in sel["chosen"]["cell"]] == [p.split("~")[0] for p in arch.replace("+", "").split("|") if p]
    assert sel["nb201"] == pytest.approx(synthetic_accuracy(arch))
    assert main(["select", str(out)]) == 2 and "already holds a selection" in capsys.readouterr().err
    gdas = tmp_path / "gdas"
    assert main(["search", "--relaxation", "gdas", "--out", str(gdas)] + tiny) == 0
    assert main(["select", str(gdas)]) == 2 and "one weight per op" in capsys.readouterr().err


@pytest.mark.parametrize("hypergrad", ["unrolled", pytest.param("implicit-cg", marks=pytest.mark.slow)])
def test_remedies_with_second_order_estimators(hypergrad):
    """The remedies wrap the relaxation and the weight step, so the estimators that differentiate
    through a weight step (and twice) take them as they are; the step stays finite and moves α."""
    x, y = _x(8, seed=4), jnp.arange(8) % 10
    s = make_searcher(Net(nnx.Rngs(0)), "darts", hypergrad=hypergrad, total_steps=4,
                      remedies={"darts_minus": {}, "beta_decay": {}, "sdarts": {"mode": "adv", "steps": 2}})
    state, m = _step_twice(s, x, y)
    assert all(np.isfinite(float(v)) for v in m.values())
    start = s.init(jax.random.PRNGKey(0)).arch
    assert np.abs(np.asarray(state.arch["op"]) - np.asarray(start["op"])).max() > 1e-4
