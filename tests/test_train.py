"""Retraining a derived architecture (``dnas train``): it learns, is deterministic, checkpoints
restore, data parallel equals one device, cutout's statistics, and errors that name the problem."""
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dnas.cli import main
from dnas.searcher import NonFiniteLossError
from dnas.supernet.derived import build_network
from dnas.supernet.genotype import DARTS_V2, parse_nb201, save_genotype
from dnas.train import Trainer, TrainConfig, cutout_batch, resolve_protocol, run_train

ARCH = "|nor_conv_3x3~0|+|nor_conv_1x1~0|skip_connect~1|+|skip_connect~0|nor_conv_3x3~1|avg_pool_3x3~2|"
SMALL = {"channels": 8, "cells_per_stage": 1}


@pytest.fixture(scope="module")
def genotype_file(tmp_path_factory):
    return str(save_genotype(parse_nb201(ARCH), tmp_path_factory.mktemp("g") / "genotype.json"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, genotype_file):
    out = tmp_path_factory.mktemp("train")
    cfg = TrainConfig(genotype=genotype_file, epochs=4, batch_size=128, network_options=SMALL,
                      out=str(out / "a"), progress=False)
    return cfg, run_train(cfg)


def _losses(out):
    rows = [json.loads(line) for line in open(f"{out}/metrics.jsonl")]
    return [r["train_loss"] for r in rows if r["kind"] == "step"], [r for r in rows if r["kind"] == "epoch"]


def test_retraining_learns_and_writes_its_outputs(trained):
    cfg, summary = trained
    out = summary["out"]
    steps, epochs = _losses(out)
    assert len(epochs) == 4 and summary["steps"] == 4 * (1497 // 128)
    assert summary["final_test_acc"] > 0.6            # 10 classes: chance is 0.1
    assert epochs[-1]["train_loss"] < 0.7 * epochs[0]["train_loss"]
    assert summary["params"] == sum(a.size for a in jax.tree_util.tree_leaves(
        jax.eval_shape(build_network(parse_nb201(ARCH), num_classes=10, in_channels=1, **SMALL).init,
                       jax.random.PRNGKey(0))[0]))
    for f in ("config.json", "genotype.json", "genotype.png", "training.png", "summary.json"):
        assert (Path(out) / f).is_file(), f
    conf = json.loads(open(f"{out}/config.json").read())
    proto = conf["resolved"]["protocol"]
    assert proto["lr"] == 0.1 and proto["nesterov"] is True   # NAS-Bench-201's protocol (Sec. 2.3)
    assert epochs[0]["lr"] < 0.1 and epochs[-1]["lr"] < epochs[0]["lr"]  # cosine


def test_same_seed_same_training_and_the_checkpoint_restores(trained, tmp_path):
    cfg, summary = trained
    again = run_train(TrainConfig(**{**cfg.__dict__, "out": str(tmp_path / "b")}))
    assert _losses(summary["out"])[0] == _losses(again["out"])[0]
    assert again["final_test_acc"] == summary["final_test_acc"]

    from dnas.train import restore_train_state
    net = build_network(parse_nb201(ARCH), num_classes=10, in_channels=1, **SMALL)
    trainer = Trainer(net, resolve_protocol(cfg, "nb201", 8), 10)
    template = trainer.init(jax.random.PRNGKey(123))
    restored = restore_train_state(f"{summary['out']}/checkpoints", template)
    assert int(restored.step) == summary["steps"]
    result = trainer.evaluate(restored, *_digits_test())
    assert result["test_acc"] == pytest.approx(summary["final_test_acc"], abs=1e-6)


def _digits_test():
    from dnas.data import load_dataset
    d = load_dataset("digits")
    return d.test_x, d.test_y.astype(np.int32)


def test_data_parallel_step_equals_one_device():
    net = build_network(parse_nb201(ARCH), num_classes=10, in_channels=1, channels=4, cells_per_stage=1)
    proto = resolve_protocol(TrainConfig(genotype=""), "nb201", 8)
    x = jax.random.normal(jax.random.PRNGKey(1), (16, 8, 8, 1))
    y = jnp.arange(16, dtype=jnp.int32) % 10
    results = []
    for n in (1, 4):
        tr = Trainer(net, proto, 10, num_devices=n)
        state, step = tr.replicate(tr.init(jax.random.PRNGKey(0))), tr.compiled_step(donate=False)
        for _ in range(2):
            state, m = step(state, tr.shard(x), tr.shard(y), jnp.float32(0))
        results.append((jax.device_get(state.params), float(m["train_loss"])))
    (p1, l1), (p4, l4) = results
    assert l1 == pytest.approx(l4, rel=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p4)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_cutout_zeroes_one_clipped_square_per_image():
    x = jnp.ones((2000, 12, 12, 2))
    y = np.asarray(cutout_batch(jax.random.PRNGKey(0), x, 6))
    zero = y[..., 0] == 0
    assert np.array_equal(zero, y[..., 1] == 0) and set(np.unique(y)) <= {0.0, 1.0}
    rows, cols = zero.any(2), zero.any(1)
    for z, r, c in zip(zero, rows, cols):   # the zeros form one axis-aligned rectangle
        assert z.sum() == r.sum() * c.sum() and 3 <= r.sum() <= 6 and 3 <= c.sum() <= 6
    # centres uniform over the image: a full 6x6 square unless the centre is within 3 px of an edge
    full = (rows.sum(1) == 6) & (cols.sum(1) == 6)
    p = (7 / 12) ** 2    # rows cy-3 .. cy+2 all inside [0, 12) <=> 3 <= cy <= 9: 7 of 12 per axis
    assert abs(full.mean() - p) < 4 * np.sqrt(p * (1 - p) / 2000)


def test_darts_protocol_on_small_images(tmp_path):
    g = save_genotype(DARTS_V2, tmp_path / "g.json")
    proto = resolve_protocol(TrainConfig(genotype=str(g)), "darts", 8)
    assert proto["auxiliary_weight"] == 0.0 and proto["cutout"] == 4 and proto["drop_path"] == 0.2
    assert resolve_protocol(TrainConfig(genotype=str(g)), "darts", 32)["auxiliary_weight"] == 0.4
    # the NB201 and chain networks have neither regulariser: asking for one is an error, not ignored
    for space in ("nb201", "chain"):
        with pytest.raises(ValueError, match="no drop path"):
            resolve_protocol(TrainConfig(genotype="", drop_path=0.2), space, 32)
        with pytest.raises(ValueError, match="no auxiliary head"):
            resolve_protocol(TrainConfig(genotype="", auxiliary_weight=0.4), space, 32)
    summary = run_train(TrainConfig(genotype=str(g), epochs=2, max_steps=3, batch_size=32,
                                    network_options={"channels": 4, "layers": 3}, out=str(tmp_path / "o"),
                                    progress=False))
    assert summary["steps"] == 3 and np.isfinite(summary["final"]["train_loss"])
    assert summary["final"]["drop_path"] == 0.0   # raised linearly from 0 over the epochs


def test_a_diverging_training_stops_before_any_checkpoint(tmp_path, genotype_file):
    with pytest.raises(NonFiniteLossError, match=r"(train_loss|grad_norm) is (nan|inf) at step"):
        run_train(TrainConfig(genotype=genotype_file, epochs=1, batch_size=64, lr=1e38, weight_decay=0.0,
                              network_options=SMALL, out=str(tmp_path / "o"), progress=False))
    assert not list((tmp_path / "o").glob("checkpoints/*"))


def test_cli_errors_name_the_problem(tmp_path, capsys):
    assert main(["train", str(tmp_path / "missing.json"), "--no-progress"]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["train", str(tmp_path), "--no-progress"]) == 2
    assert "holds no genotype.json" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text('{"space": "nb201", "arch": "|conv~0|"}')
    assert main(["train", str(tmp_path / "bad.json"), "--no-progress"]) == 2
    assert "bad.json" in capsys.readouterr().err
    save_genotype(DARTS_V2, tmp_path / "g.json")
    assert main(["train", str(tmp_path / "g.json"), "--network-option", "depth=3", "--no-progress"]) == 2
    assert "no option" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "g.json"), "--auxiliary-weight", "0.4", "--channels", "4", "--cells", "3",
                 "--max-steps", "1", "--no-progress", "--out", str(tmp_path / "o")]) == 2
    assert "auxiliary head needs feature maps" in capsys.readouterr().err
