"""Runs that survive: exact resume after SIGKILL/SIGTERM, nothing diverged or mixed saved,
corrupt checkpoints named and skipped, strict options, config files, derive, TensorBoard.

The interrupted runs are real subprocesses of ``python -m dnas.cli`` killed with real signals
once their first checkpoint is on disk; every comparison is against an uninterrupted run of
the same command, bit for bit (α, weights, every logged metric but wall times).
"""
from __future__ import annotations

import json
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

TINY = ["--channels", "4", "--cells", "1", "--limit-examples", "200", "--batch-size", "16", "--no-progress",
        "--log-every", "2"]
#: 100 weight examples / 16 = 6 steps per epoch; 3 epochs = 18 steps; checkpoints every 4 steps
SEARCH = ["search", *TINY, "--epochs", "3", "--checkpoint-steps", "4"]


#: The subprocesses inherit the test session's compilation cache (``DNAS_COMPILE_CACHE``, set by
#: tests/conftest.py): the programs of a killed run, its resume and the uninterrupted run are the
#: same, so only the first of them compiles. (Resuming from a cached executable is part of what
#: is tested: it must change nothing.)


def _cli(args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dnas.cli", *args], capture_output=True, text=True, timeout=600)


def _interrupt(args, out: Path, sig) -> subprocess.CompletedProcess:
    """Start ``dnas ARGS --out OUT`` and send ``sig`` as soon as its first checkpoint exists."""
    p = subprocess.Popen([sys.executable, "-m", "dnas.cli", *args, "--out", str(out)], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while p.poll() is None and time.time() < deadline:
        ck = out / "checkpoints"
        if ck.is_dir() and any(c.name.isdigit() for c in ck.iterdir()):
            p.send_signal(sig)
            break
        time.sleep(0.01)
    text, _ = p.communicate(timeout=600)
    return subprocess.CompletedProcess(p.args, p.returncode, text, "")


def _records(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if not k.endswith("time_s")}
            for line in path.read_text().splitlines()]


def _final_state(out: Path):
    """The arrays of the run's latest checkpoint, flattened to {path: array}."""
    import orbax.checkpoint as ocp
    from dnas.rundir import checkpoint_steps
    step = checkpoint_steps(out / "checkpoints")[-1]
    with ocp.CheckpointManager((out / "checkpoints").resolve()) as mgr:
        tree = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    import jax
    return step, {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def assert_same_run(a: Path, b: Path, dirs=("",)) -> None:
    for d in dirs:
        assert json.loads((a / d / "alphas.json").read_text()) == json.loads((b / d / "alphas.json").read_text())
        assert _records(a / d / "metrics.jsonl") == _records(b / d / "metrics.jsonl")
        assert (a / d / "genotype.json").read_text() == (b / d / "genotype.json").read_text()
    sa, ta = _final_state(a)
    sb, tb = _final_state(b)
    assert sa == sb and ta.keys() == tb.keys()
    for k in ta:
        np.testing.assert_array_equal(ta[k], tb[k], err_msg=k)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "whole"
    r = _cli([*SEARCH, "--out", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.mark.xdist_group("uninterrupted")   # with --dist loadgroup, one worker computes the baseline run once
def test_search_killed_by_sigkill_resumes_bit_for_bit(uninterrupted, tmp_path):
    out = tmp_path / "killed"
    r = _interrupt(SEARCH, out, signal.SIGKILL)
    assert r.returncode == -signal.SIGKILL, r.stdout[-2000:]
    assert not (out / "genotype.json").exists()
    # the killed run's α is not lost: dnas derive writes it from the checkpoint
    assert _main(["derive", str(out)]) == 0
    assert json.loads((out / "genotype.json").read_text())["space"] == "nb201"
    r = _cli(["search", "--resume", str(out), "--no-progress"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_run(uninterrupted, out)


@pytest.mark.xdist_group("uninterrupted")   # with --dist loadgroup, one worker computes the baseline run once
def test_corrupt_latest_checkpoint_is_named_and_resume_falls_back(uninterrupted, tmp_path):
    out = tmp_path / "corrupt"
    shutil.copytree(uninterrupted, out)
    from dnas.rundir import CheckpointError, checkpoint_steps
    steps = checkpoint_steps(out / "checkpoints")
    assert len(steps) == 2
    for f in (out / "checkpoints" / str(steps[-1]) / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 64 and "d" in f.parent.name:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    import jax
    from dnas.rundir import restore_checkpoint, restore_latest
    from dnas.searcher import make_searcher
    s = make_searcher("nb201", "darts", space_options=dict(channels=4, cells_per_stage=1, in_channels=1,
                                                              num_classes=10))
    template = s.init(jax.random.PRNGKey(0))
    with pytest.raises(CheckpointError, match=rf"corrupt/checkpoints/{steps[-1]} cannot be restored"):
        restore_checkpoint(out / "checkpoints", template, step=steps[-1])
    with pytest.warns(UserWarning, match=rf"checkpoints/{steps[-1]} cannot be restored.*trying the previous"):
        _, progress, step = restore_latest(out / "checkpoints", template)
    assert step == steps[-2] and progress["step"] == steps[-2]
    (out / "genotype.json").unlink()
    r = _cli(["search", "--resume", str(out), "--no-progress"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"checkpoints/{steps[-1]} cannot be restored" in r.stderr
    assert_same_run(uninterrupted, out)   # the steps after the good checkpoint were run again


@pytest.mark.xdist_group("uninterrupted")   # with --dist loadgroup, one worker computes the baseline run once
def test_a_run_whose_checkpoints_stack_the_weights_in_another_order_is_not_resumed(uninterrupted, tmp_path, capsys):
    """The search's checkpoints record the order of its stacked weights; a run whose checkpoints
    record another (another dnas's layout of the model) is refused by resume and derive, naming
    the checkpoint, and is left as it was."""
    from dnas.rundir import checkpoint_steps
    from dnas.searcher import make_searcher
    out = tmp_path / "reordered"
    shutil.copytree(uninterrupted, out)
    space = make_searcher("nb201", "darts", space_options=dict(channels=4, cells_per_stage=1, in_channels=1,
                                                                  num_classes=10)).space
    steps = checkpoint_steps(out / "checkpoints")
    for s in steps:
        meta = out / "checkpoints" / str(s) / "progress" / "metadata"
        progress = json.loads(meta.read_text())
        assert progress["layout"] == space.layout_fingerprint()
        meta.write_text(json.dumps({**progress, "layout": "0123456789abcdef"}))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "config.json"}
    for args in (["search", "--resume", str(out), "--no-progress"], ["derive", str(out)]):
        assert _main(args) == 2
        err = capsys.readouterr().err
        assert f"reordered/checkpoints/{steps[-1]} stacks its weights in another order" in err, err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "config.json"} == before


@pytest.mark.xdist_group("uninterrupted")   # with --dist loadgroup, one worker computes the baseline run once
def test_sigterm_checkpoints_and_resumes_exactly(uninterrupted, tmp_path):
    out = tmp_path / "term"
    r = _interrupt(SEARCH, out, signal.SIGTERM)
    assert r.returncode == 128 + signal.SIGTERM, r.stdout[-2000:]
    assert f"--resume {out}" in r.stdout
    r = _cli(["search", "--resume", str(out), "--no-progress"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_run(uninterrupted, out)


@pytest.mark.slow
def test_sigterm_with_8_devices_and_seeds_checkpoints_and_resumes_exactly(tmp_path):
    args = ["search", *TINY, "--epochs", "2", "--checkpoint-steps", "3", "--devices", "8", "--seeds", "0,3"]
    whole = tmp_path / "whole"
    r = _cli([*args, "--out", str(whole)])
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "term"
    r = _interrupt(args, out, signal.SIGTERM)
    assert r.returncode == 128 + signal.SIGTERM, r.stdout[-2000:]
    assert f"--resume {out}" in r.stdout
    from dnas.rundir import checkpoint_steps
    assert checkpoint_steps(out / "checkpoints")[-1] > 3   # the signal's own checkpoint, after the first
    r = _cli(["search", "--resume", str(out), "--no-progress"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_run(whole, out, dirs=("seed-0", "seed-3"))


def test_train_killed_resumes_bit_for_bit_and_exports(tmp_path):
    arch = "|nor_conv_3x3~0|+|skip_connect~0|nor_conv_1x1~1|+|skip_connect~0|none~1|avg_pool_3x3~2|"
    args = ["train", arch, "--channels", "4", "--cells", "1", "--limit-examples", "300", "--batch-size", "32",
            "--epochs", "3", "--checkpoint-steps", "3", "--no-progress", "--log-every", "2"]
    whole = tmp_path / "whole"
    r = _cli([*args, "--out", str(whole), "--export"])
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "killed"
    r = _interrupt(args, out, signal.SIGKILL)
    assert r.returncode == -signal.SIGKILL
    r = _cli(["train", "--resume", str(out), "--no-progress", "--export"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert _records(whole / "metrics.jsonl") == _records(out / "metrics.jsonl")
    sa, ta = _final_state(whole)
    sb, tb = _final_state(out)
    assert sa == sb
    for k in ta:
        np.testing.assert_array_equal(ta[k], tb[k], err_msg=k)
    # the exported network reloads without dnas's model code and gives the trained net's logits
    import jax
    from dnas.data import load_dataset
    from dnas.export import inference_fn, load_exported
    from dnas.rundir import restore_checkpoint
    from dnas.supernet.genotype import parse_nb201
    from dnas.train import TrainConfig, Trainer, resolve_protocol
    from dnas.supernet.derived import build_network
    exported = load_exported(whole)
    sig = json.loads((whole / "model.json").read_text())
    assert sig["input"]["shape"] == ["batch", 8, 8, 1] and sig["output"]["shape"] == ["batch", 10]
    x = load_dataset("digits").test_x[:7]
    net = build_network(parse_nb201(arch), num_classes=10, in_channels=1, channels=4, cells_per_stage=1)
    trainer = Trainer(net, resolve_protocol(TrainConfig(genotype=arch, batch_size=32), "nb201", 8), 30)
    # the training checkpoints record the order of the network's stacked weights (else refused)
    assert net.layout is not None
    state = restore_checkpoint(whole / "checkpoints", trainer.init(jax.random.PRNGKey(0)), layout=net.layout)
    np.testing.assert_allclose(np.asarray(exported.call(x)), np.asarray(inference_fn(trainer, state)(x)),
                               rtol=1e-5, atol=1e-5)
    assert np.asarray(exported.call(x[:3])).shape == (3, 10)   # any batch size


# ------------------------------------------------------------------------------ in-process


def _main(args):
    from dnas.cli import main
    return main(args)


def test_divergence_stops_with_the_step_and_saves_nothing_non_finite(tmp_path, capsys):
    for lr in ("1e30", "1e6"):
        out = tmp_path / lr
        rc = _main(["search", *TINY, "--epochs", "1", "--max-steps", "4", "--w-lr", lr, "--checkpoint-steps", "1",
                    "--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 2 and re.search(r"diverged|is (nan|inf)", err) and re.search(r"step \d+", err), err
        assert not (out / "genotype.json").exists()
        from dnas.rundir import checkpoint_steps, first_nonfinite
        for s in checkpoint_steps(out / "checkpoints"):
            import orbax.checkpoint as ocp
            with ocp.CheckpointManager((out / "checkpoints").resolve()) as mgr:
                tree = mgr.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
            assert first_nonfinite(tree) is None, s


def test_a_non_finite_state_is_never_checkpointed(tmp_path):
    import jax
    import jax.numpy as jnp
    from dnas.rundir import DivergedError, save_checkpoint
    from dnas.searcher import make_searcher
    s = make_searcher("nb201", "darts", space_options=dict(channels=4, cells_per_stage=1, in_channels=1,
                                                              num_classes=10))
    state = s.init(jax.random.PRNGKey(0))
    save_checkpoint(tmp_path / "ck", state, 1)
    stats = jax.tree_util.tree_map(lambda a: a, state.batch_stats)
    leaves, tree = jax.tree_util.tree_flatten(stats)
    leaves[-1] = jnp.full_like(leaves[-1], jnp.inf)
    bad = state._replace(batch_stats=jax.tree_util.tree_unflatten(tree, leaves))
    with pytest.raises(DivergedError, match=r"step 2: batch_stats/.* holds NaN or inf"):
        save_checkpoint(tmp_path / "ck", bad, 2)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["1"]


def test_used_out_is_refused_overwritten_only_when_asked_and_bad_input_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["search", *TINY, "--epochs", "1", "--max-steps", "2", "--out", str(out)]
    assert _main(base) == 0
    first = (out / "metrics.jsonl").read_text()
    assert _main(base + ["--seed", "1"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == first            # untouched
    assert _main(base + ["--seed", "1", "--overwrite"]) == 0
    assert (out / "metrics.jsonl").read_text() != first
    assert json.loads((out / "config.json").read_text())["seed"] == 1
    # a directory that holds something else is never deleted
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert _main(["search", *TINY, "--epochs", "1", "--out", str(other), "--overwrite"]) == 2
    assert "holds no dnas run" in capsys.readouterr().err and (other / "notes.txt").exists()
    # input errors are found before anything is created
    for bad in (["--dataset", str(tmp_path / "nope")], ["--relaxation", "pc_darts", "--relaxation-option", "k=abc"],
                ["--relaxation", "pc_darts", "--relaxation-option", "edge_norm=maybe"], ["--batch-size", "4096"]):
        fresh = tmp_path / "fresh"
        assert _main(["search", *TINY, "--epochs", "1", "--out", str(fresh)] + bad) == 2
        assert not fresh.exists(), bad
    capsys.readouterr()
    # a resume that changes more than the run's length is refused, naming the difference
    assert _main(["search", "--resume", str(out), "--w-lr", "0.1"]) == 2
    assert "hyper.w_lr: run 0.025, now 0.1" in capsys.readouterr().err


def test_option_values_are_parsed_strictly():
    from dnas.options import OptionError, coerce_options, key_values
    from dnas.relaxations import get_relaxation
    from dnas.relaxations.pc_darts import pc_darts
    from dnas.supernet.spaces import build_space
    assert key_values(["edge_norm=False", "k=2", "tau=1e-3", "name=x"], "--opt") == \
        {"edge_norm": False, "k": 2, "tau": 1e-3, "name": "x"}
    assert coerce_options(pc_darts, {"edge_norm": "FALSE", "k": "2"}, "pc_darts") == {"edge_norm": False, "k": 2}
    for bad, msg in (({"edge_norm": "maybe"}, "edge_norm: expected true or false"),
                     ({"k": "abc"}, "k: expected an integer"), ({"k": 2.5}, "k: expected an integer")):
        with pytest.raises(OptionError, match=msg):
            coerce_options(pc_darts, bad, "pc_darts")
    space = build_space("nb201", channels=4, cells_per_stage=1, in_channels=1, num_classes=10)
    # edge_norm=False (capitalised, as a user types it) really turns edge normalisation off
    import jax
    off = get_relaxation("pc_darts", space, **key_values(["edge_norm=False"], "x"))
    on = get_relaxation("pc_darts", space)
    arch = jax.tree_util.tree_map(lambda a: a + 0.3 * jax.random.normal(jax.random.PRNGKey(1), a.shape),
                                  on.init(jax.random.PRNGKey(0), space.groups))
    assert not np.allclose(np.asarray(on.derive_scores(arch)["cell"]), np.asarray(off.derive_scores(arch)["cell"]))


def test_one_class_data_is_refused(tmp_path):
    from PIL import Image
    from dnas.data import DatasetError, load_dataset
    for i in range(4):
        (tmp_path / "train" / "cat").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / "train" / "cat" / f"{i}.png")
    with pytest.raises(DatasetError, match="1 class.*at least two"):
        load_dataset(str(tmp_path))


def test_config_round_trip_set_and_tensorboard(tmp_path, capsys):
    first = tmp_path / "first"
    assert _main(["search", *TINY, "--epochs", "1", "--max-steps", "4", "--relaxation", "gdas", "--seed", "5",
                  "--tensorboard", "--out", str(first)]) == 0
    _check_tensorboard(first, epochs=1)
    again = tmp_path / "again"
    assert _main(["search", "--config", str(first / "config.json"), "--out", str(again)]) == 0
    assert json.loads((first / "alphas.json").read_text()) == json.loads((again / "alphas.json").read_text())
    assert _records(first / "metrics.jsonl") == _records(again / "metrics.jsonl")
    # YAML, then the flags given, then --set (dotted keys reach nested options)
    from dnas.cli import _merge_config, _search_cfg, build_parser
    from dnas.run import config_from_dict, saved_config
    (tmp_path / "c.yaml").write_text("relaxation: gdas\nseed: 5\nepochs: 7\nhyper: {w_lr: 0.05}\n"
                                     "space_options: {channels: 4, cells_per_stage: 1}\n")
    args = build_parser().parse_args(["search", "--config", str(tmp_path / "c.yaml"), "--epochs", "9",
                                      "--set", "hyper.a_lr=0.01", "--set", "augment=False"])
    cfg = _merge_config(args, _search_cfg, build_parser().parse_args(["search"]), "search", config_from_dict,
                        saved_config)
    assert (cfg.relaxation, cfg.seed, cfg.epochs, cfg.augment) == ("gdas", 5, 9, False)
    assert (cfg.hyper.w_lr, cfg.hyper.a_lr) == (0.05, 0.01) and cfg.space_options["channels"] == 4
    (tmp_path / "bad.yaml").write_text("epochz: 3\n")
    assert _main(["search", "--config", str(tmp_path / "bad.yaml")]) == 2
    assert "unknown key(s) ['epochz']" in capsys.readouterr().err
    assert _main(["search", "--config", str(tmp_path / "c.yaml"), "--set", "epochs=many"]) == 2
    assert "epochs: expected an integer, got 'many'" in capsys.readouterr().err


def _events(logdir: Path) -> list:
    """Every Event of the TensorBoard files under ``logdir`` (TFRecord framing read directly)."""
    from tensorboardX.proto import event_pb2
    events = []
    for f in sorted(logdir.rglob("events.out.tfevents.*")):
        data = f.read_bytes()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            events.append(event_pb2.Event.FromString(data[i + 12:i + 12 + n]))
            i += 12 + n + 4
    return events


def _check_tensorboard(out: Path, epochs: int) -> None:
    """The run's TensorBoard scalars are its logged metrics; one α image per epoch; the α log
    starts (near) uniform and ends at alphas.json's probabilities."""
    values = [(e.step, v) for e in _events(out / "tensorboard") for v in e.summary.value]
    losses = {s: v.simple_value for s, v in values if v.tag == "search/train_loss"}
    logged = {r["step"]: r["train_loss"] for r in _records(out / "metrics.jsonl") if r["kind"] == "step"}
    assert losses.keys() == logged.keys()
    np.testing.assert_allclose([losses[s] for s in logged], list(logged.values()), rtol=1e-6)
    images = [(s, v.image) for s, v in values if v.tag == "alphas/probabilities"]
    assert len(images) == epochs and all(img.height > 50 and img.width > 50 for _, img in images)
    alphas = [json.loads(line) for line in (out / "alphas.jsonl").read_text().splitlines()]
    assert alphas[0]["step"] == 0 and np.allclose(alphas[0]["cell"], 0.2, atol=1e-3)
    final = json.loads((out / "alphas.json").read_text())["groups"]["cell"]["probs"]
    np.testing.assert_allclose(alphas[-1]["cell"], final, rtol=1e-6)
    assert (out / "alpha_evolution.png").stat().st_size > 0


def test_train_config_round_trip(tmp_path):
    arch = "|nor_conv_3x3~0|+|skip_connect~0|nor_conv_1x1~1|+|skip_connect~0|none~1|avg_pool_3x3~2|"
    first = tmp_path / "first"
    assert _main(["train", arch, "--channels", "4", "--cells", "1", "--limit-examples", "200", "--batch-size", "32",
                  "--epochs", "1", "--no-progress", "--lr", "0.05", "--out", str(first)]) == 0
    again = tmp_path / "again"
    assert _main(["train", "--config", str(first / "config.json"), "--out", str(again)]) == 0
    assert _records(first / "metrics.jsonl") == _records(again / "metrics.jsonl")
    assert json.loads((again / "config.json").read_text())["lr"] == 0.05
