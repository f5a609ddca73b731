"""A planted-architecture task: does a search find the architecture that made the labels?

A NAS benchmark table says how good a derived cell is, but not whether the search could have
found the right one. Here the right one is known. A *teacher* is the supernet itself with a
planted op on every choice point (a one-hot mixing weight per edge) and its weights at their
initialisation ``w₀``; labels are the teacher's class decisions on a stream of fresh Gaussian
inputs (each class's logit standardised over the stream first, so the classes are balanced).
The search then starts from the same weights ``w₀`` with uniform α and runs the ordinary
bilevel step (α on the architecture stream, weights on the weight stream, both trained).

The planted architecture with ``w₀`` fits the labels exactly, so it is a global optimum of
both levels; the task asks whether the relaxation's α gradient leads there while the weights
move. Starting the student from other weights makes the problem unidentifiable (a 3×3
convolution can emulate a 1×1 convolution, a skip or a pooling), and no relaxation recovered
the teacher that way; with shared ``w₀`` the answer is a property of the relaxation and the
search loop, which is what this task tests. Every batch is new data, so nothing overfits.

:func:`planted_search` runs one search and returns the recovered choice points; the test
suite (``tests/test_planted.py``) and ``benchmarks/bench_planted.py`` (recovery per
relaxation) use it.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dnas.supernet.genotype import NB201_OPS

#: conv 3x3, skip, conv 3x3, avg pool, conv 1x1, conv 3x3 on the six NB201 edges: every op but
#: ``none``, parameter-free and parametric ops mixed.
DEFAULT_PLANT = ("nor_conv_3x3", "skip_connect", "nor_conv_3x3", "avg_pool_3x3", "nor_conv_1x1", "nor_conv_3x3")


@dataclasses.dataclass(frozen=True)
class PlantedTask:
    """A small NB201 supernet (C=8, N=1) on 8×8×3 Gaussian inputs with 8 classes."""

    plant: tuple = DEFAULT_PLANT
    channels: int = 8
    cells_per_stage: int = 1
    image_size: int = 8
    num_classes: int = 8
    batch_size: int = 64
    teacher_seed: int = 100
    data_seed: int = 0


def _teacher_labels(searcher, params, stats, plant_idx, x: np.ndarray, chunk: int = 512) -> np.ndarray:
    """The teacher's class per input: the supernet with one-hot mixing weights, BatchNorm on
    batch statistics (as in the search), logits standardised per class over ``x``."""
    from dnas.relaxations.pc_darts import partial_mix
    from dnas.supernet.context import Ctx

    onehot = jax.nn.one_hot(jnp.asarray(plant_idx), len(NB201_OPS))
    # partial_mix(k) is the dense mix for k = 1 and PC-DARTS's channel split otherwise, so the
    # teacher runs the student's own candidate ops
    mix = partial_mix(searcher.relax.partial_channels)
    fwd = jax.jit(lambda xb: searcher.space.apply(params, stats, xb, {"cell": onehot}, mix, Ctx(train=True))[0])
    logits = np.concatenate([np.asarray(fwd(x[i:i + chunk])) for i in range(0, len(x), chunk)])
    z = (logits - logits.mean(0)) / (logits.std(0) + 1e-6)
    return z.argmax(-1).astype(np.int32)


def planted_search(relaxation: str, steps: int, *, a_lr: float = 3e-3, task: PlantedTask = PlantedTask(),
                   seed: int = 1, relaxation_options: dict | None = None, hypergrad: str = "first",
                   num_devices: int = 1) -> dict:
    """Search ``task`` with ``relaxation`` for ``steps`` steps; returns ``{"chosen", "planted",
    "recovered" (count), "recovered_at_start" (the count of the initial α's derivation),
    "probs", "val_acc", "arch", "problem"}``."""
    from dnas.searcher import Hyper, make_searcher

    plant_idx = [NB201_OPS.index(op) for op in task.plant]
    opts = dict(channels=task.channels, cells_per_stage=task.cells_per_stage, num_classes=task.num_classes,
                in_channels=3, affine=False)
    s = make_searcher("nb201", relaxation, space_options=opts, relaxation_options=relaxation_options or {},
                      hyper=Hyper(a_lr=a_lr), total_steps=steps, hypergrad=hypergrad, num_devices=num_devices)
    teacher = s.init(jax.random.PRNGKey(task.teacher_seed))
    rng = np.random.default_rng(task.data_seed)
    n = 2 * steps * task.batch_size
    x = rng.normal(size=(n, task.image_size, task.image_size, 3)).astype(np.float32)
    y = _teacher_labels(s, teacher.params, teacher.batch_stats, plant_idx, x)
    state = s.init(jax.random.PRNGKey(seed))._replace(params=teacher.params, batch_stats=teacher.batch_stats)
    start = np.asarray(jax.device_get(s.relax.derive_scores(state.arch))["cell"]).argmax(-1)
    state = s.replicate(state)
    step = s.compiled_step(donate=False)
    b = task.batch_size
    metrics = None
    for i in range(steps):   # weight stream: first half of x; architecture stream: second half
        t, v = slice(i * b, (i + 1) * b), slice((steps + i) * b, (steps + i + 1) * b)
        state, metrics = step(state, s.shard((x[t], y[t])), s.shard((x[v], y[v])))
    scores = np.asarray(jax.device_get(s.relax.derive_scores(jax.device_get(state.arch)))["cell"])
    chosen = scores.argmax(-1)
    return {"relaxation": relaxation, "steps": steps, "a_lr": a_lr,
            "planted": list(task.plant), "chosen": [NB201_OPS[c] for c in chosen],
            "recovered": int((chosen == np.asarray(plant_idx)).sum()), "of": len(plant_idx),
            # the control: what the architecture the search starts from already gets right
            "recovered_at_start": int((start == np.asarray(plant_idx)).sum()),
            "probs": np.asarray(s.probs(state)["cell"]).round(3).tolist(),
            "val_acc": float(metrics["val_acc"]), "arch": jax.device_get(state.arch),
            # what a selection after the search needs (dnas.select): the searcher, the final state,
            # and the two streams (weights: first half of x, architecture: second half)
            "problem": {"searcher": s, "state": jax.device_get(state), "x": x, "y": y}}


__all__ = ["PlantedTask", "planted_search", "DEFAULT_PLANT"]
