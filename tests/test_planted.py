"""A planted architecture is recovered (dnas/planted.py): labels from the supernet with a known
op on every edge; the search must find those ops.

Default run: DARTS (120 steps, α lr 0.03: 6/6 on this plant, 5/6 on the other, measured). ``pytest -m slow`` runs every relaxation on two
plants; measured recovery and budgets are in docs/reproduce.md.

Each search runs in a fresh process compiled at XLA's default optimisation level. The session
compiles at LLVM's level 0 (``conftest.py``), which suits the suite's compile-bound tests, but
a search of hundreds of steps is bound by the step's run time: the default test took 160 s on
one core at level 0 and 47 s in a fresh process at the default level.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from dnas.planted import DEFAULT_PLANT

_SEARCH = r"""
import json, sys
from dnas.planted import PlantedTask, planted_search
from dnas.select import PTOptions, perturbation_select
a = json.loads(sys.argv[1])
task = PlantedTask(plant=tuple(a["plant"]))
r = planted_search(a["relaxation"], a["steps"], a_lr=a["a_lr"], task=task, relaxation_options=a["options"])
out = {k: r[k] for k in ("chosen", "planted", "recovered", "recovered_at_start", "probs", "val_acc")}
if a["select"]:
    p, n = r["problem"], a["steps"] * task.batch_size
    sel = perturbation_select(p["searcher"], p["state"], (p["x"][n:], p["y"][n:]), (p["x"][:n], p["y"][:n]),
                              PTOptions(tune_steps=0, eval_examples=512))
    out["selected"], out["decisions"] = sel["chosen"]["cell"], sel["decisions"]
print(json.dumps(out, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
"""


def planted_search(relaxation: str, steps: int, *, a_lr: float, plant=DEFAULT_PLANT, options=None,
                   select: bool = False) -> dict:
    """:func:`dnas.planted.planted_search` in a fresh process at XLA's default optimisation
    level; with ``select``, DARTS-PT's choice on the searched supernet too (``selected``)."""
    flags = re.sub(r"--xla_backend_optimization_level=0\b", "", os.environ.get("XLA_FLAGS", "")).strip()
    args = dict(relaxation=relaxation, steps=steps, a_lr=a_lr, plant=list(plant), options=options or {},
                select=select)
    done = subprocess.run([sys.executable, "-c", _SEARCH, json.dumps(args)], env=dict(os.environ, XLA_FLAGS=flags),
                          capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


OTHER_PLANT = ("nor_conv_1x1", "avg_pool_3x3", "skip_connect", "nor_conv_3x3", "nor_conv_3x3", "nor_conv_1x1")


def test_darts_recovers_the_planted_cell():
    r = planted_search("darts", 120, a_lr=0.03, select=True)
    assert r["recovered"] >= 5, r
    # the control: the α the search started from picks ops at random (chance: 1.2 of 6), so the
    # recovery is the search's doing, not the task's
    assert r["recovered_at_start"] <= 3, r
    # DARTS-PT on the searched supernet (dnas.select): removing the planted op costs the most
    # accuracy on every edge (measured: 6/6 with and without fine-tuning, the accuracy lost by the
    # removal 0.03-0.23)
    assert r["selected"] == list(DEFAULT_PLANT), r["decisions"]


# (relaxation, steps, α learning rate, options): the budgets at which recovery was measured
RECOVERING = [("darts", 120, 0.03, {}), ("pc_darts", 600, 0.003, {}), ("drnas", 600, 0.02, {})]


@pytest.mark.slow
@pytest.mark.parametrize("plant", [DEFAULT_PLANT, OTHER_PLANT], ids=["plant-a", "plant-b"])
@pytest.mark.parametrize("relaxation, steps, a_lr, options", RECOVERING, ids=[r[0] for r in RECOVERING])
def test_relaxation_recovers_the_planted_cell(relaxation, steps, a_lr, options, plant):
    """Most edges (4 of 6; chance is about 1.2): measured 5-6 of 6, DrNAS 4 on plant b."""
    r = planted_search(relaxation, steps, a_lr=a_lr, plant=plant, options=options)
    assert r["recovered"] >= 4, r


@pytest.mark.slow
@pytest.mark.xfail(strict=False, reason="measured: GDAS and SNAS recover 1-4 of 6 edges at 600-2000 steps "
                                       "(docs/reproduce.md, 'Planted architecture')")
@pytest.mark.parametrize("relaxation", ["gdas", "snas"])
def test_sampling_relaxations_recover_the_planted_cell(relaxation):
    r = planted_search(relaxation, 2000, a_lr=0.01)
    assert r["recovered"] >= 4, r
