"""Early stopping (DARTS+, DARTS-ES) on scripted trajectories, and in a real run."""
import json

import numpy as np
import pytest

from dnas.stopping import cell_summary, decide, parse_rule


def _rec(epoch, skips=0, ranking=None, eig=None):
    r = {"epoch": epoch, "skip_ops": skips, "op_ranking": ranking if ranking is not None else {"cell": [[0, 1]]}}
    if eig is not None:
        r["hessian_eig_max"] = eig
    return r


def test_darts_plus_skip_rule_fires_at_the_first_epoch_with_enough_skips():
    skips = [0, 1, 1, 2, 3]
    fired = [decide(["skips:2"], [_rec(e, s) for e, s in enumerate(skips[:n + 1])]) for n in range(len(skips))]
    assert [f is not None for f in fired] == [False, False, False, True, True]
    assert fired[3].epoch == fired[3].keep_epoch == 3 and "2 skip connections" in fired[3].reason


def test_darts_plus_stable_ranking_needs_k_unchanged_epochs():
    a, b = {"cell": [[0, 1], [1, 0]]}, {"cell": [[1, 0], [1, 0]]}
    traj = [a, b, b, a, a, a, a]   # the ranking last changed at epoch 3
    first = next(n for n in range(len(traj)) if decide(["stable:3"], [_rec(e, ranking=r) for e, r in
                                                                   enumerate(traj[:n + 1])]))
    assert first == 6


def test_darts_es_fires_when_the_windowed_eigenvalue_rises_by_a_third_and_keeps_k_epochs_back():
    k = 2
    eig = [1.0, 1.0, 1.0, 1.1, 1.2, 1.5, 2.0]   # window means: 1, 1, 1.05, 1.15, 1.35, 1.75
    out = [decide([("eigen", k)], [_rec(e, eig=v) for e, v in enumerate(eig[:n + 1])]) for n in range(len(eig))]
    # epoch 5: λ̄(3)/λ̄(5) = 1.05/1.35 = 0.78 holds; epoch 6: 1.15/1.75 = 0.66 < 0.75 fires
    assert [o is not None for o in out] == [False] * 6 + [True]
    assert out[6].epoch == 6 and out[6].keep_epoch == 4
    flat = [1.0] * 12
    assert all(decide(["eigen:5"], [_rec(e, eig=v) for e, v in enumerate(flat[:n + 1])]) is None
               for n in range(12))


def test_rule_syntax_is_checked():
    assert parse_rule("skips:2") == ("skips", 2)
    for bad in ("skips", "skip:2", "eigen:0", "stable:x"):
        with pytest.raises(ValueError, match="expected skips:N"):
            parse_rule(bad)


def test_cell_summary_counts_the_normal_cell_of_darts():
    from dnas.supernet.genotype import DARTS_V2, parse_nb201
    from dnas.supernet.spaces import build_space
    darts = build_space("darts", channels=4, layers=3, in_channels=3, num_classes=10)
    probs = {g: np.full((14, 8), 1 / 8) for g in ("normal", "reduce")}
    s = cell_summary(darts, DARTS_V2, probs)
    # DARTS-V2's normal cell has two skip connections (exactly DARTS+'s threshold); the reduction
    # cell's are not counted as skips
    assert s["skip_ops"] == sum(op == "skip_connect" for op, _ in DARTS_V2.normal) == 2
    assert s["param_free"] == sum(op in ("skip_connect", "max_pool_3x3", "avg_pool_3x3")
                                  for op, _ in DARTS_V2.normal + DARTS_V2.reduce)
    nb = build_space("nb201", channels=4, cells_per_stage=1, in_channels=1, num_classes=10)
    g = parse_nb201("|skip_connect~0|+|none~0|skip_connect~1|+|nor_conv_3x3~0|avg_pool_3x3~1|skip_connect~2|")
    s = cell_summary(nb, g, {"cell": np.eye(6, 5)})
    assert (s["skip_ops"], s["param_free"]) == (3, 5)


def test_a_run_stops_on_a_rule_logs_why_and_a_resume_does_not_continue_it(tmp_path, capsys):
    from dnas.cli import main
    out = tmp_path / "run"
    args = ["search", "--channels", "4", "--cells", "1", "--limit-examples", "200", "--batch-size", "32",
            "--epochs", "4", "--no-progress", "--a-lr", "0", "--stop", "stable:1", "--out", str(out)]
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    stops = [r for r in rows if r["kind"] == "stop"]
    assert len(epochs) == 2 and len(stops) == 1 and stops[0]["rule"] == "stable:1"   # α frozen: stable at once
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped"]["epoch"] == 1 and summary["steps"] == 2 * 3
    assert json.loads((out / "genotype.json").read_text())["stopped"]["rule"] == "stable:1"
    assert (out / "collapse.png").stat().st_size > 0
    assert main(["search", "--resume", str(out), "--no-progress"]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 6
    capsys.readouterr()
    assert main(args[:-2] + ["--seeds", "0,1", "--out", str(tmp_path / "s")]) == 2
    assert "--stop applies to one search" in capsys.readouterr().err
