"""The command line end to end: `dnas search` outputs, `dnas bench` JSON, clear errors."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from PIL import Image

from dnas.cli import build_parser, main
from dnas.run import restore_checkpoint
from dnas.searcher import make_searcher
from dnas.supernet.genotype import load_genotype, nb201_string_to_ops
from test_nb201_table import synthetic_accuracy, write_synthetic_table

TINY = ["--channels", "4", "--cells", "1", "--batch-size", "32", "--no-progress", "--seed", "3"]


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("xla-cache")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, compile_cache):
    out = tmp_path_factory.mktemp("run")
    table = write_synthetic_table(tmp_path_factory.mktemp("nb201") / "table.csv")
    rc = main(["search", "--epochs", "2", "--limit-examples", "256", "--log-every", "2", "--out", str(out),
               "--compile-cache", str(compile_cache), "--nb201-table", str(table)] + TINY)
    assert rc == 0
    return out


def test_search_looks_the_derived_cell_up_in_the_nb201_table(tiny_run):
    epochs = [r for r in map(json.loads, (tiny_run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "epoch"]
    assert len(epochs) == 2
    for r in epochs:   # the cell derived at the end of each epoch, and its table row
        assert {k: r[f"nb201_{k}"] for k in ("index", "cifar10", "cifar100", "imagenet16_120")} == \
            pytest.approx(synthetic_accuracy(r["arch"]))
    g = json.loads((tiny_run / "genotype.json").read_text())
    assert g["arch"] == epochs[-1]["arch"] and g["nb201"] == pytest.approx(synthetic_accuracy(g["arch"]))
    assert json.loads((tiny_run / "summary.json").read_text())["nb201"] == g["nb201"]


def test_search_writes_every_output(tiny_run):
    out = tiny_run
    for name in ("genotype.json", "alphas.json", "metrics.jsonl", "genotype.png", "alphas.png", "config.json",
                 "summary.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    g = json.loads((out / "genotype.json").read_text())
    assert g["space"] == "nb201"
    assert len(nb201_string_to_ops(g["arch"])) == 6
    assert load_genotype(out / "genotype.json").arch == g["arch"]
    with Image.open(out / "genotype.png") as im:
        assert im.size[0] > 100 and im.size[1] > 100


def test_metrics_records(tiny_run):
    records = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [0, 1]
    # 256 examples -> 128/128 halves -> 4 steps of 32 per epoch, a step record every 2 steps
    assert [r["step"] for r in steps] == [2, 4, 6, 8]
    for r in steps + epochs:
        for key in ("step", "epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "entropy"):
            assert key in r and np.isfinite(r[key]), key
        assert 0.0 <= r["train_acc"] <= 1.0 and 0.0 < r["entropy"] <= np.log(5) + 1e-6
    assert steps[0]["lr"] > steps[-1]["lr"]  # cosine decay


def test_alphas_json_matches_checkpoint_and_genotype(tiny_run):
    alphas = json.loads((tiny_run / "alphas.json").read_text())
    assert alphas["op_names"] == ["none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3"]
    cell = alphas["groups"]["cell"]
    assert cell["choice_points"][0] == "0->1" and np.asarray(cell["alpha"]).shape == (6, 5)
    np.testing.assert_allclose(np.asarray(cell["probs"]).sum(-1), 1.0, rtol=1e-5)
    # the checkpoint holds the same α as alphas.json, and deriving from it gives genotype.json
    s = make_searcher("nb201", space_options=dict(channels=4, cells_per_stage=1, in_channels=1, num_classes=10))
    state = restore_checkpoint(tiny_run / "checkpoints", s.init(jax.random.PRNGKey(0)))
    assert int(state.step) == 8
    np.testing.assert_allclose(np.asarray(state.arch["cell"]), np.asarray(cell["alpha"]), rtol=1e-6)
    g = json.loads((tiny_run / "genotype.json").read_text())
    assert s.derive(state).arch == g["arch"]



def test_search_says_when_alpha_has_not_decided(tiny_run, capsys):
    """The summary records α's final mean entropy against the uniform one's, and the printout
    warns when the derived cell is the argmax of a near-uniform α (2 epochs on 256 digits: α
    barely moves), and not when α has decided."""
    from dnas.cli import _print_search
    summary = json.loads((tiny_run / "summary.json").read_text())
    p = np.asarray(json.loads((tiny_run / "alphas.json").read_text())["groups"]["cell"]["probs"])
    assert summary["alpha_entropy"] == pytest.approx({"final": float(-(p * np.log(p)).sum(-1).mean()),
                                                      "uniform": float(np.log(5))}, rel=1e-5)
    _print_search(summary, 3)
    assert "alpha is still close to uniform" in capsys.readouterr().out
    _print_search(dict(summary, alpha_entropy={"final": 0.8, "uniform": float(np.log(5))}), 3)
    out = capsys.readouterr().out
    assert "derived architecture" in out and "close to uniform" not in out

def test_same_seed_same_architecture(tiny_run, tmp_path, compile_cache):
    """A rerun, its step now read from the persistent compilation cache, gives the same α."""
    assert any(compile_cache.iterdir()), "the first run stored no compiled program"
    rc = main(["search", "--epochs", "2", "--limit-examples", "256", "--log-every", "2", "--out", str(tmp_path),
               "--compile-cache", str(compile_cache)] + TINY)
    assert rc == 0
    first = json.loads((tiny_run / "summary.json").read_text())["compile_s"]
    again = json.loads((tmp_path / "summary.json").read_text())["compile_s"]
    assert again < first
    a = json.loads((tiny_run / "alphas.json").read_text())["groups"]["cell"]["alpha"]
    b = json.loads((tmp_path / "alphas.json").read_text())["groups"]["cell"]["alpha"]
    assert a == b
    assert (json.loads((tiny_run / "genotype.json").read_text())["arch"]
            == json.loads((tmp_path / "genotype.json").read_text())["arch"])


def test_search_on_image_folder_darts_space(tmp_path):
    """The DARTS space end to end on an image folder (PNG files, 3 classes); one cell keeps
    the compile short (the 3-cell supernet with reduction cells is covered in test_spaces), and
    so does ``--conv-impl dense`` (the CPU default's shifted-view depthwise convolutions, tested
    in test_ops, compile for 30 s here instead of 18 s)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 24), ("test", 4)):
        for c in ("a", "b", "c"):
            d = tmp_path / "data" / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(d / f"{i}.png")
    out = tmp_path / "out"
    rc = main(["search", "--space", "darts", "--dataset", str(tmp_path / "data"), "--channels", "2", "--cells", "1",
               "--batch-size", "12", "--epochs", "1", "--max-steps", "2", "--no-progress", "--out", str(out),
               "--conv-impl", "dense"])
    assert rc == 0
    g = json.loads((out / "genotype.json").read_text())
    assert g["space"] == "darts" and len(g["normal"]) == 8 and len(g["reduce"]) == 8
    assert g["normal_concat"] == [2, 3, 4, 5]
    assert all(op != "none" for op, _ in g["normal"] + g["reduce"])
    alphas = json.loads((out / "alphas.json").read_text())
    # one cell: no reduction cell, so no reduce α (the genotype's reduction cell is never run)
    assert sorted(alphas["groups"]) == ["normal"]
    assert alphas["groups"]["normal"]["choice_points"][:3] == ["0->2", "1->2", "0->3"]


@pytest.mark.parametrize("args,message", [
    (["--dataset", "{tmp}/nowhere"], "nowhere"),
    (["--relaxation", "magic"], "unknown relaxation 'magic'"),
    (["--batch-size", "5000"], "batch size 5000"),
])
def test_search_bad_input_is_a_clear_error(tmp_path, capsys, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    rc = main(["search", "--epochs", "1", "--no-progress", "--out", str(tmp_path / "o")] + args)
    assert rc == 2
    assert message in capsys.readouterr().err


def test_unknown_space_is_refused_with_the_known_ones(capsys, tmp_path):
    """--space also takes registered names and import specs, so an unknown one is refused when
    it is looked up, with the list of what exists."""
    assert main(["search", "--space", "resnet", "--no-progress", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "unknown search space 'resnet'; available: chain, darts, nb201" in err


def test_help_lists_the_options():
    text = build_parser()._subparsers._group_actions[0].choices["search"].format_help()
    for flag in ("--space", "--relaxation", "--dataset", "--epochs", "--batch-size", "--seed", "--out",
                 "--devices", "--limit-examples", "--max-steps"):
        assert flag in text


def test_bench_prints_one_json_object(capsys):
    rc = main(["bench", "--space", "nb201", "--channels", "4", "--cells", "1", "--batch-size", "8",
               "--image-size", "8", "--steps", "2"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("median_step_ms", "compile_s", "flops", "temp_bytes", "device_kind", "jax_version"):
        assert key in result
    assert result["median_step_ms"] > 0 and result["compile_s"] > 0
    assert result["flops"] > 1e6 and result["temp_bytes"] > 0
    split = result["compile_split_s"]
    assert set(split) == {"trace", "lower", "xla"} and min(split.values()) > 0
    assert sum(split.values()) == pytest.approx(result["compile_s"], rel=1e-9)


@pytest.mark.slow  # ~1 min: compiles a second-order step of the unrolled CPU supernet
def test_search_tunes_learning_rate_with_unrolled_hypergradient(tmp_path):
    """`--hypergrad unrolled --tune lr,wd`: the logged lr/wd move away from their initial values,
    the hypergradients are logged, and hyperparams.png is written."""
    rc = main(["search", "--epochs", "1", "--limit-examples", "256", "--max-steps", "4", "--log-every", "1",
               "--hypergrad", "unrolled", "--tune", "lr,wd", "--hyper-lr", "0.1", "--w-lr-min", "0.025",
               "--out", str(tmp_path)] + TINY)
    assert rc == 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["kind"] == "step"]
    assert len(steps) == 4
    assert {"lr", "weight_decay", "hypergrad_lr", "hypergrad_wd"} <= set(steps[0])
    # Adam moves each log-hyperparameter by ~hyper_lr per step: 0.1 → about 10 % per step
    assert abs(np.log(steps[-1]["lr"] / 0.025)) > 0.15
    assert abs(np.log(steps[-1]["weight_decay"] / 3e-4)) > 0.15
    assert (tmp_path / "hyperparams.png").stat().st_size > 0
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["hypergrad"] == "unrolled" and list(cfg["tune"]) == ["lr", "wd"]


def test_search_rejects_zero_hypergradient_combination(tmp_path, capsys):
    rc = main(["search", "--epochs", "1", "--hypergrad", "implicit-cg", "--tune", "lr", "--out", str(tmp_path)] + TINY)
    assert rc == 2
    assert "does not change the inner optimum" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--cg-iters applies to --hypergrad implicit-cg"):
        main(["search", "--hypergrad", "unrolled", "--cg-iters", "3", "--out", str(tmp_path)] + TINY)


@pytest.mark.parametrize("loops, unroll", [("unroll", True), ("scan-cells", "scan_cells"), ("scan", False)])
def test_loops_flag_sets_the_space_loop_mode(loops, unroll):
    from dnas.cli import _space_options
    args = build_parser().parse_args(["search", "--space", "nb201", "--loops", loops])
    assert _space_options(args) == {"channels": 16, "cells_per_stage": 2, "unroll": unroll}
    default = build_parser().parse_args(["search", "--space", "darts"])
    assert _space_options(default) == {"channels": 8, "layers": 5}
    chain = build_parser().parse_args(["search", "--space", "chain", "--loops", loops])
    with pytest.raises(SystemExit, match="--loops does not apply to the chain space"):
        _space_options(chain)


def test_each_space_reads_the_shared_flags_and_refuses_the_ones_it_has_no_use_for():
    """The flags map onto each built-in space's own options (``Space.options_from_flags``),
    unset ones from the space's defaults for the command; a flag a space has no use for is
    refused by name, before anything runs."""
    from dnas.cli import _space_options
    from dnas.supernet.chain import ChainConfig
    parse = build_parser().parse_args
    chain = _space_options(parse(["search", "--space", "chain", "--cells", "3", "--width-mult", "0.5"]))
    assert chain == {"width_mult": 0.5, "stem_stride": 1,
                     "stage_depths": tuple(min(d, 3) for d in ChainConfig.stage_depths)}
    assert _space_options(parse(["bench", "--space", "darts", "--cells", "8"]), "bench_defaults") == \
        {"channels": 16, "layers": 8}
    assert _space_options(parse(["bench", "--space", "nb201"]), None) == {}
    for argv, flag in ((["search", "--space", "chain", "--channels", "8"], "--channels"),
                       (["search", "--space", "nb201", "--width-mult", "0.5"], "--width-mult"),
                       (["search", "--space", "darts", "--width-mult", "2"], "--width-mult")):
        with pytest.raises(SystemExit, match=flag):
            _space_options(parse(argv))
