"""DARTS-PT: perturbation-based architecture selection after the search (Wang et al., ICLR 2021).

DARTS derives its architecture from the magnitude of α. Wang et al. (Sec. 3) show that α's
magnitude need not say how much an op contributes to the supernet: a skip connection gains large α
while it is not what the supernet's accuracy depends on. DARTS-PT (Sec. 4, Alg. 1) asks the
supernet instead. One choice point after another (in random order):

1. for every candidate op ``o`` of the choice point, measure the supernet's validation accuracy
   with ``o`` removed (its mixing weight set to 0, the others kept);
2. keep the op whose removal lowers the accuracy most, i.e. the op the supernet needs most, and
   discretise the choice point to it (one-hot mixing weight 1);
3. fine-tune the supernet's weights for a few steps, so the next decision is taken on a
   supernet that has adapted to the discretised choice points.

``none`` is never a candidate (removing it changes nothing). On the DARTS cell space the paper
also selects each node's two inputs by removing edges; here the cell's edges are ranked by the
accuracy lost when their selected op is removed and the space's own derivation keeps the top two
per node.

:func:`perturbation_select` runs on a searcher and a state (any space, a user's model
included); :func:`select_run` (``dnas select --method pt RUN_DIR``) on a finished or interrupted
search run, writing ``RUN_DIR/select-pt/``. The supernet is evaluated with the relaxation's
deterministic weights (``eval_sample``: softmax(α) for DARTS), so relaxations whose evaluation
weights are one mixing weight per op qualify (DARTS, SNAS, PC-DARTS, DrNAS, FairDARTS); the
sampled ones (GDAS, ProxylessNAS) have no weight per op to remove and are refused. Remedies
that change the search step are not applied (DARTS-'s skip has weight 0 at the end anyway).

Differences from the paper: the fine-tuning trains the weights only (α is frozen, the paper keeps
the search's α step running), with SGD at the search's base learning rate, on the weight half of
the training split without augmentation.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class PTOptions:
    """``eval_examples``: validation examples per accuracy measurement (the same ones every
    time); ``tune_steps``: weight steps between two decisions; ``order``: ``random`` (the
    paper's, seeded) or ``fixed`` (group by group, choice point by choice point)."""

    eval_examples: int = 1024
    batch_size: int = 256
    tune_steps: int = 20
    tune_batch_size: int = 64
    order: str = "random"
    seed: int = 0

    def check(self) -> None:
        if self.order not in ("random", "fixed"):
            raise ValueError(f"DARTS-PT order must be 'random' or 'fixed', got {self.order!r}")
        for name in ("eval_examples", "batch_size", "tune_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"DARTS-PT {name} must be positive, got {getattr(self, name)}")
        if self.tune_steps < 0:
            raise ValueError(f"DARTS-PT tune_steps must be non-negative, got {self.tune_steps}")


def evaluation_weights(searcher, arch) -> dict:
    """``{group: (choice points, ops)}`` mixing weights of the supernet's evaluation; a
    relaxation whose evaluation is not one weight per op is refused by name."""
    relax = searcher.base_relax
    weights = relax.eval_sample(arch)
    for g, (n, k) in searcher.space.groups.items():
        w = weights.get(g)
        if not isinstance(w, jax.Array) or tuple(w.shape) != (n, k):
            raise ValueError(f"DARTS-PT removes ops from a supernet mixed with one weight per op; relaxation "
                             f"{relax.name!r} evaluates with {jax.tree_util.tree_map(jnp.shape, w)} for group {g!r}. "
                             "Search with darts, snas, pc_darts, drnas or fair_darts")
    return {g: jnp.asarray(w, jnp.float32) for g, w in weights.items()}


def perturbation_select(searcher, state, val: tuple, train: tuple | None = None,
                        options: PTOptions = PTOptions()) -> dict:
    """DARTS-PT on ``state`` (one member, host arrays): ``val = (x, y)`` measures accuracy,
    ``train = (x, y)`` fine-tunes between decisions. Returns ``{"genotype", "decisions",
    "order", "chosen"}``; every decision records the accuracy with each op removed."""
    from dnas.searcher import accuracy, cross_entropy
    from dnas.supernet.context import Ctx

    options.check()
    space, relax = searcher.space, searcher.base_relax
    ctx = Ctx(train=True, compute_dtype=searcher.compute_dtype, kernels=searcher.kernels)
    weights = evaluation_weights(searcher, state.arch)
    n_eval = min(options.eval_examples, len(val[1]))
    vx, vy = np.asarray(val[0][:n_eval]), np.asarray(val[1][:n_eval]).astype(np.int32)
    bs = min(options.batch_size, n_eval)

    @jax.jit
    def batch_correct(params, stats, w, x, y):
        logits, _ = space.apply(params, stats, x, w, relax.mix, ctx)
        return accuracy(logits, y) * y.shape[0]

    def acc(params, stats, w) -> float:
        total = sum(float(batch_correct(params, stats, w, vx[i:i + bs], vy[i:i + bs]))
                    for i in range(0, n_eval - bs + 1, bs))
        return total / (bs * (n_eval // bs))

    def tune_loss(params, stats, w, x, y):
        logits, new_stats = space.apply(params, stats, x, w, relax.mix, ctx)
        return cross_entropy(logits, y), new_stats

    @jax.jit
    def tune_step(params, opt_state, stats, w, x, y):
        (_, new_stats), g = jax.value_and_grad(tune_loss, has_aux=True)(params, stats, w, x, y)
        upd, opt_state = searcher.w_tx.update(g, opt_state, params)   # the search's base lr and decay
        return jax.tree_util.tree_map(jnp.add, params, upd), opt_state, new_stats

    points = [(g, i) for g in sorted(space.groups) for i in range(space.groups[g][0])]
    if options.order == "random":
        points = [points[j] for j in np.random.default_rng(options.seed).permutation(len(points))]
    params, stats = state.params, state.batch_stats
    opt_state = searcher.w_tx.init(params)
    rng = np.random.default_rng(options.seed + 1)
    decided = {g: np.full(space.groups[g][0], -1) for g in space.groups}
    strength = {g: np.zeros(space.groups[g], np.float32) for g in space.groups}
    decisions = []
    for g, i in points:
        names = list(space.group_op_names(g))
        base = acc(params, stats, weights)
        removed = {}
        for o, name in enumerate(names):
            if name == "none":
                continue
            removed[name] = acc(params, stats, {**weights, g: weights[g].at[i, o].set(0.0)})
        chosen = min(removed, key=lambda name: (removed[name], names.index(name)))
        o = names.index(chosen)
        decided[g][i] = o
        strength[g][i, o] = max(base - removed[chosen], 0.0) + 1e-6
        weights = {**weights, g: weights[g].at[i].set(jax.nn.one_hot(o, len(names)))}
        decisions.append({"group": g, "choice_point": str(space.choice_point_names(g)[i]), "index": i,
                          "accuracy": base, "accuracy_without": removed, "chosen": chosen})
        if train is not None and options.tune_steps:
            tx, ty = train
            for _ in range(options.tune_steps):
                j = rng.choice(len(ty), options.tune_batch_size, replace=False)
                params, opt_state, stats = tune_step(params, opt_state, stats, weights,
                                                     np.asarray(tx[j]), np.asarray(ty[j]).astype(np.int32))
    genotype = space.derive({g: jnp.asarray(s) for g, s in strength.items()})
    return {"genotype": genotype, "decisions": decisions, "order": [[g, i] for g, i in points],
            "chosen": {g: [list(space.group_op_names(g))[o] for o in decided[g]] for g in sorted(decided)},
            "final_accuracy": acc(params, stats, weights)}


def select_run(run_dir: str | os.PathLike, method: str = "pt", options: PTOptions = PTOptions(),
               out: str | os.PathLike | None = None, overwrite: bool = False, seed: int | None = None) -> dict:
    """``dnas select --method pt RUN_DIR``: DARTS-PT on the latest checkpoint of a search run
    (``seed``: which member of a ``--seeds`` run). Writes ``genotype.json`` and
    ``selection.json`` to ``out`` (default ``RUN_DIR/select-pt``); returns the selection."""
    from dnas.distributed import to_host
    from dnas.run import _init_state, prepare_search, saved_config
    from dnas.rundir import RunDirError, restore_latest, write_json_atomic
    from dnas.searcher import Searcher
    from dnas.supernet.genotype import genotype_to_json, save_genotype

    if method != "pt":
        raise ValueError(f"unknown selection method {method!r}; available: pt (DARTS-PT)")
    options.check()
    run_dir = Path(run_dir)
    cfg = saved_config(run_dir)
    out = Path(out) if out is not None else run_dir / "select-pt"
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise RunDirError(f"{out} already holds a selection; choose another --out or pass --overwrite")
    prep = prepare_search(dataclasses.replace(cfg, out=str(run_dir), devices=1, progress=False, remedies={}))
    seeds = prep.seeds
    if seed is None and len(seeds) > 1:
        raise ValueError(f"{run_dir} holds {len(seeds)} vmapped searches (seeds {list(seeds)}); choose one with --seed")
    member = 0 if seed is None else seeds.index(seed) if seed in seeds else None
    if member is None:
        raise ValueError(f"--seed {seed}: the run searched seeds {list(seeds)}")
    state, _, step = restore_latest(run_dir / "checkpoints", to_host(_init_state(prep)),
                                     layout=prep.searcher.space.layout_fingerprint())
    if len(seeds) > 1:
        state = Searcher.member(state, member)
    _, (wx, wy), (ax, ay) = prep.members[member]
    opts = dataclasses.replace(options, seed=seeds[member] if options.seed == 0 else options.seed)
    result = perturbation_select(prep.searcher, state, (ax, ay), (wx, wy), opts)
    record: dict[str, Any] = {"method": "darts-pt", "run": str(run_dir), "checkpoint_step": step,
                              "seed": seeds[member], "options": dataclasses.asdict(opts),
                              "genotype": genotype_to_json(result["genotype"]), "chosen": result["chosen"],
                              "order": result["order"], "decisions": result["decisions"],
                              "final_accuracy": result["final_accuracy"]}
    derived = json.loads((run_dir / "genotype.json").read_text()) if (run_dir / "genotype.json").is_file() else None
    if derived is not None:
        record["search_genotype"] = derived
    if prep.table is not None:
        record["nb201"] = prep.table.lookup(result["genotype"])
    out.mkdir(parents=True, exist_ok=True)
    save_genotype(result["genotype"], out / "genotype.json",
                  extra={"method": "darts-pt", **({"nb201": record["nb201"]} if "nb201" in record else {})})
    write_json_atomic(out / "selection.json", record)
    return {**record, "genotype_object": result["genotype"]}


__all__ = ["PTOptions", "perturbation_select", "select_run", "evaluation_weights"]
