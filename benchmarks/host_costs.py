"""What a search space costs outside the compiled step: building it, initialising its weights,
turning a state back into the model, and the weight shapes the latency validation fills.

These run eagerly, op by op, in a fresh process: every small JAX operation on a new shape is a
program compiled of its own, so a layout change that splits a state into a thousand leaves can
cost more here than the step it feeds. Times, in one process and in this order:

* ``build_s``: ``build_space(SPACE, **options)`` (constructs the NNX model once);
* ``init_s``: ``space.init(key)``, the weights in the search's stacked layout;
* ``unstacked_s`` / ``unstacked_again_s``: ``space.unstacked(params, stats)``, the model's own
  leaves (what ``space.module``, ``dnas.fix`` of a search result and the exports start from),
  the first call and a second one;
* ``shapes_s``: the unstacked weights' shapes as ``dnas latency validate`` reads them
  (``space.weight_shapes()`` where the tree has it, else ``jax.eval_shape`` of ``init``);
  with ``--eval-shape`` also ``eval_shape_s``, ``jax.eval_shape`` of building the model again
  (the older way; minutes for the 8-cell DARTS space);
* with ``--relaxation R``, first, in the same fresh process: ``searcher_s``,
  ``make_searcher(SPACE, R, space_options=options)`` (builds the space the relaxation searches,
  e.g. PC-DARTS's narrow candidates, and the relaxation).

    python benchmarks/host_costs.py darts --option channels=4 --option layers=3
    python benchmarks/host_costs.py darts --relaxation pc_darts
    PYTHONPATH=/path/to/other/tree python benchmarks/host_costs.py ...   # the same arguments

Uses only ``build_space``, ``make_searcher``, ``init`` and ``unstacked`` beyond what it checks for, so it runs
against older trees. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import time

import jax

from dnas.options import key_values
from dnas.supernet.spaces import build_space


def costs(space_name: str, options: dict, eval_shape: bool = False, relaxation: str | None = None) -> dict:
    out: dict = {"space": space_name, "options": options, "relaxation": relaxation, "jax_version": jax.__version__}

    def timed(name, fn):
        t0 = time.perf_counter()
        value = fn()
        jax.block_until_ready(value)
        out[name] = round(time.perf_counter() - t0, 3)
        return value

    if relaxation is not None:
        from dnas.searcher import make_searcher
        timed("searcher_s", lambda: make_searcher(space_name, relaxation, space_options=options).relax.name)
    space = timed("build_s", lambda: build_space(space_name, **options))
    params, stats = timed("init_s", lambda: space.init(jax.random.PRNGKey(0)))
    timed("unstacked_s", lambda: space.unstacked(params, stats))
    timed("unstacked_again_s", lambda: space.unstacked(params, stats))
    if hasattr(space, "weight_shapes"):
        timed("shapes_s", space.weight_shapes)
    if eval_shape or not hasattr(space, "weight_shapes"):
        timed("eval_shape_s", lambda: jax.eval_shape(lambda k: space.unstacked(*space.init(k)), jax.random.PRNGKey(0)))
    out["leaves"] = len(jax.tree_util.tree_leaves(space.unstacked(params, stats)))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("space")
    p.add_argument("--option", action="append", default=[], metavar="K=V", help="a build_space option")
    p.add_argument("--eval-shape", action="store_true", help="also time jax.eval_shape of building the model")
    p.add_argument("--relaxation", default=None, help="first time make_searcher with this relaxation")
    a = p.parse_args(argv)
    print(json.dumps(costs(a.space, key_values(a.option, "--option"), a.eval_shape, a.relaxation)))


if __name__ == "__main__":
    main()
