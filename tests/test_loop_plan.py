"""XLA:CPU loop modes chosen from the run's length (dnas/loop_plan.py)."""
from __future__ import annotations

import jax
import pytest

from dnas.loop_plan import plan_cpu_loops
from dnas.supernet.darts import DartsSpace

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the plan applies to XLA:CPU only")

DARTS_DEFAULT = {"channels": 8, "layers": 5}   # `dnas search --space darts` on the 8x8 digits
NB201_DEFAULT = {"channels": 16, "cells_per_stage": 2}


def test_short_darts_search_scans_long_one_unrolls():
    short, _, plan = plan_cpu_loops("darts", DARTS_DEFAULT, "first", {}, 330, 64, (8, 8, 1))
    assert short["unroll"] is False and plan["space_loops"] == "scan"
    # the DARTS CIFAR-10 search: 50 epochs x 390 steps, C=16, 8 cells, 32x32
    long, _, plan = plan_cpu_loops("darts", {"channels": 16, "layers": 8}, "first", {}, 50 * 390, 64, (32, 32, 3))
    assert long["unroll"] is True and plan["space_loops"] == "unroll"


def test_the_choice_flips_where_the_measured_times_cross():
    """At the reference size the unrolled step is chosen once it saves twice its extra compile:
    after 2·Δcompile / Δstep steps (about 120 for the DARTS space)."""
    c = DartsSpace.cpu_loop_cost
    cross = 2 * (c.fast[0] - c.short[0]) / (c.short[1] - c.fast[1])
    opts = {"channels": 16, "layers": 8}
    below = plan_cpu_loops("darts", opts, "first", {}, int(cross) - 1, 64, (32, 32, 3))[0]
    above = plan_cpu_loops("darts", opts, "first", {}, int(cross) + 1, 64, (32, 32, 3))[0]
    assert (below["unroll"], above["unroll"]) == (False, True)


def test_implicit_solver_loop_follows_the_run_length():
    _, short, plan = plan_cpu_loops("nb201", NB201_DEFAULT, "implicit-cg", {}, 4, 32, (8, 8, 1))
    assert short == {"unroll": False} and plan["solver_loop"] == "fori_loop"
    _, long, _ = plan_cpu_loops("nb201", NB201_DEFAULT, "implicit-cg", {}, 10 ** 6, 32, (8, 8, 1))
    assert long == {"unroll": True}


def test_the_users_choice_is_kept():
    opts, hg, plan = plan_cpu_loops("darts", {**DARTS_DEFAULT, "unroll": True}, "implicit-neumann",
                                    {"unroll": False}, 3, 64, (8, 8, 1))
    assert opts["unroll"] is True and hg == {"unroll": False} and plan == {}
    opts, hg, plan = plan_cpu_loops("nb201", NB201_DEFAULT, "first", {}, 3, 64, (8, 8, 1))
    assert "unroll" not in opts and hg == {} and plan == {}
