"""The search run: data → bilevel search → derived architecture, pictures, metrics, checkpoints.

:func:`run_search` is what ``dnas search`` calls. The output directory receives

* ``genotype.json`` — the derived architecture (with ``"space"``), plus run facts;
* ``alphas.json`` — the final architecture parameters and probabilities per choice point;
* ``metrics.jsonl`` — one JSON object per logged step (``"kind": "step"``) and per epoch
  (``"kind": "epoch"``, means over the epoch);
* ``genotype.png`` and ``alphas.png`` — the derived cell(s) and the α heatmaps;
* ``hyperparams.png`` — the weight optimizer's learning rate and weight decay per logged step
  (learnt ones marked "tuned");
* ``checkpoints/<step>/`` — the full :class:`~dnas.searcher.SearchState` (orbax), written only
  after every loss of the epoch was checked finite, so a diverged run never overwrites a
  good checkpoint;
* ``config.json`` — the resolved configuration of the run.

With ``seeds`` (``dnas search --seeds 0,1,2,3``) the searches of every seed run as one vmapped
program (:class:`~dnas.searcher.Searcher` with ``num_seeds``); each seed gets its own data split,
data order, augmentation, initialisation and α exactly as ``--seed s`` alone would, and its
own ``seed-<s>/`` directory with the files above (genotype, alphas, pictures, metrics). The
top level holds ``config.json``, the stacked checkpoints, ``summary.json`` and
``op_frequency.json`` / ``op_frequency.png``: per choice point, how many seeds chose each op.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dnas.data import Dataset, augment_batch, darts_split, epoch_batches, load_dataset, num_batches
from dnas.distributed import is_primary, to_host
from dnas.hugepages import trim_heap
from dnas.device_loop import ARCH_STREAM_OFFSET, AUG_SALT
from dnas.loop_plan import plan_cpu_loops, resolve_loop
from dnas.searcher import Hyper, NonFiniteLossError, SearchState, Searcher, check_finite, make_searcher
from dnas.supernet.genotype import genotype_to_json, save_genotype


@dataclasses.dataclass
class SearchConfig:
    """Everything that defines a search run (the CLI flags map one to one)."""

    space: Any = "nb201"                  # a name or spec, or a space object / Flax NNX model (build_space)
    relaxation: str = "darts"
    dataset: str | None = None            # None: the embedded digits
    epochs: int = 30
    batch_size: int = 64
    seed: int = 0
    seeds: tuple | None = None            # several independent searches in one program (vmapped)
    out: str | None = None                # None: runs/<timestamp>
    devices: int = 1
    limit_examples: int | None = None
    max_steps: int | None = None          # cap on the total number of search steps
    space_options: dict = dataclasses.field(default_factory=dict)
    relaxation_options: dict = dataclasses.field(default_factory=dict)
    hyper: Hyper = dataclasses.field(default_factory=Hyper)
    hypergrad: str = "first"              # dnas.hypergrad estimator
    hypergrad_options: dict = dataclasses.field(default_factory=dict)
    tune: tuple = ()                      # hyperparameters learnt as outer variables: "lr", "wd"
    latency: dict | None = None           # make_latency_objective kwargs: table_path, loss, target, weight
    augment: bool = True
    log_every: int = 10
    checkpoint_every: int = 1             # epochs
    data_dir: str | None = None           # tfds data dir
    progress: bool = True
    nb201_table: str | None = None        # NAS-Bench-201 accuracy CSV: look the derived cell up every epoch
    precision: str = "float32"            # "bfloat16": convolutions in bfloat16 (dnas.searcher.PRECISIONS)
    loop: str = "auto"                    # "host", "device" (dnas.device_loop) or "auto": device on GPU/TPU
    chunk_steps: int = 50                 # device loop: search steps per compiled call
    kernels: str = "auto"                 # dnas.backend kernel policy: auto, xla_cpu or native


def default_out_dir() -> Path:
    return Path("runs") / _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def _to_host(tree):
    return to_host(tree)


class _MetricsLog:
    """Appends JSON lines to ``path`` (``None``: a process that writes nothing)."""

    def __init__(self, path: Path | None):
        self.path = path
        self.f = open(path, "a", encoding="utf-8") if path is not None else None

    def write(self, record: dict) -> None:
        if self.f is not None:
            self.f.write(json.dumps(record, allow_nan=True) + "\n")
            self.f.flush()

    def close(self) -> None:
        if self.f is not None:
            self.f.close()


def _augment_settings(data: Dataset) -> tuple[int, bool]:
    """DARTS's CIFAR augmentation (pad 4 and crop, flip) scaled to the image size; digits
    are not mirror-symmetric, so no flip for them."""
    h = data.image_shape[0]
    return max(1, h // 8), data.name != "digits"


def save_checkpoint(ckpt_dir: Path, state: SearchState, step: int, max_to_keep: int = 2) -> Path:
    """Save a state (the search's, or any NamedTuple such as ``dnas train``'s), copied to the
    host, with orbax under ``ckpt_dir/<step>``.

    Under ``jax.distributed`` only process 0 calls this (the state is replicated); orbax is
    told so, so it waits for no other process."""
    import orbax.checkpoint as ocp

    ckpt_dir.mkdir(parents=True, exist_ok=True)
    solo = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(), active_processes={jax.process_index()})
    mgr = ocp.CheckpointManager(ckpt_dir.resolve(), options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=False, multiprocessing_options=solo))
    mgr.save(int(step), args=ocp.args.StandardSave(_to_host(state._asdict())), force=True)
    mgr.wait_until_finished()
    mgr.close()
    return ckpt_dir / str(int(step))


def restore_checkpoint(ckpt_dir: str | os.PathLike, template: SearchState, step: int | None = None) -> SearchState:
    """Restore a state saved by :func:`save_checkpoint` (latest step by default) into the type of
    ``template`` (a :class:`SearchState`, or ``dnas train``'s :class:`~dnas.train.TrainState`)."""
    import orbax.checkpoint as ocp

    mgr = ocp.CheckpointManager(Path(ckpt_dir).resolve())
    step = mgr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint found in {ckpt_dir}")
    restored = mgr.restore(step, args=ocp.args.StandardRestore(_to_host(template._asdict())))
    mgr.close()
    return type(template)(**restored)


def write_alphas(path: Path, searcher: Searcher, state: SearchState) -> dict:
    """The final architecture parameters and probabilities, per group and choice point."""
    arch = _to_host(state.arch)
    probs = searcher.probs(state)
    scores = to_host(searcher.relax.derive_scores(arch))
    space = searcher.space
    out: dict[str, Any] = {"space": space.name, "relaxation": searcher.relax.name,
                           "op_names": list(space.op_names), "groups": {}}
    for g in sorted(space.groups):
        alpha = arch.get(g) if isinstance(arch.get(g), np.ndarray) else arch.get("alpha", {}).get(g)
        out["groups"][g] = {
            "op_names": list(space.group_op_names(g)),
            "choice_points": space.choice_point_names(g),
            "alpha": None if alpha is None else np.asarray(alpha).tolist(),
            "probs": np.asarray(probs[g]).tolist(),
            "scores": np.asarray(scores[g]).tolist(),
        }
    if set(arch) != set(space.groups):  # relaxations with more parameters (PC-DARTS's β, ...)
        out["parameters"] = jax.tree_util.tree_map(lambda a: np.asarray(a).tolist(), arch)
    path.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    return out


def _member_data(cfg: SearchConfig, seed: int, cache: dict):
    """The weight half and architecture half of the training split for one seed (the data
    subset depends on the seed only through ``limit_examples``)."""
    key = seed if cfg.limit_examples is not None else None
    if key not in cache:
        cache[key] = load_dataset(cfg.dataset, limit_examples=cfg.limit_examples, seed=seed, data_dir=cfg.data_dir)
    data = cache[key]
    (wx, wy), (ax, ay) = darts_split(data.train_x, data.train_y, seed=seed)
    return data, (wx, wy.astype(np.int32)), (ax, ay.astype(np.int32))


def run_search(cfg: SearchConfig) -> dict:
    """Run a search (or one per seed of ``cfg.seeds``, vmapped) and write its outputs; returns
    a summary dict (also ``summary.json``)."""
    return search_run(cfg).summary


class SearchRun(NamedTuple):
    """A finished search: its summary (``summary.json``), the searcher, the final state (stacked
    over members with several seeds) and the derived genotype of every seed."""

    summary: dict
    searcher: Searcher
    state: SearchState
    genotypes: list


def search_run(cfg: SearchConfig) -> SearchRun:
    """:func:`run_search` that also returns what the Python API (:func:`dnas.search`) hands back."""
    t_start = time.perf_counter()
    loop_kind = resolve_loop(cfg.loop)
    if cfg.chunk_steps < 1:
        raise ValueError(f"chunk_steps must be positive, got {cfg.chunk_steps}")
    out = Path(cfg.out) if cfg.out else default_out_dir()
    primary = is_primary()  # under jax.distributed only process 0 writes
    if primary:
        out.mkdir(parents=True, exist_ok=True)
    if cfg.devices < 1 or cfg.devices > jax.local_device_count():
        raise ValueError(f"--devices {cfg.devices}: this process sees {jax.local_device_count()} "
                         f"{jax.default_backend()} device(s)")
    num_devices = cfg.devices * jax.process_count()  # --devices is per process
    if cfg.batch_size % num_devices:
        raise ValueError(f"batch size {cfg.batch_size} is not divisible by {num_devices} devices")
    seeds = tuple(int(s) for s in cfg.seeds) if cfg.seeds else (int(cfg.seed),)
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {','.join(map(str, seeds))}: every seed must be distinct")
    multi = len(seeds) > 1

    table = None
    if cfg.nb201_table is not None:
        if cfg.space != "nb201":
            raise ValueError(f"--nb201-table looks up NAS-Bench-201 cells; the search space is {cfg.space!r}")
        from dnas.nb201_table import NB201Table
        table = NB201Table.load(cfg.nb201_table)

    cache: dict = {}
    members = [_member_data(cfg, s, cache) for s in seeds]
    data, (wx, wy), (ax, ay) = members[0]
    steps_per_epoch = min(num_batches(len(wy), cfg.batch_size), num_batches(len(ay), cfg.batch_size))
    if steps_per_epoch < 1:
        raise ValueError(f"batch size {cfg.batch_size} is larger than each half of the training split "
                         f"({len(wy)} / {len(ay)} examples): lower --batch-size or raise --limit-examples")
    total = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total = min(total, int(cfg.max_steps))
    epochs = math.ceil(total / steps_per_epoch)

    opts = {"in_channels": data.image_shape[-1], "num_classes": data.num_classes, **cfg.space_options}
    # on XLA:CPU, loop modes the user left open are chosen from the run's length (dnas.loop_plan)
    opts, hypergrad_options, loop_plan = plan_cpu_loops(cfg.space, opts, cfg.hypergrad, cfg.hypergrad_options,
                                                        total * len(seeds), cfg.batch_size, data.image_shape,
                                                        kernels=cfg.kernels)
    searcher = make_searcher(cfg.space, cfg.relaxation, space_options=opts,
                             relaxation_options=cfg.relaxation_options, hyper=cfg.hyper,
                             total_steps=total, num_devices=num_devices, hypergrad=cfg.hypergrad,
                             hypergrad_options=hypergrad_options, tune=cfg.tune, latency=cfg.latency,
                             num_seeds=len(seeds), precision=cfg.precision, kernels=cfg.kernels)
    label = cfg.space if isinstance(cfg.space, str) else searcher.space.name
    resolved = dataclasses.asdict(dataclasses.replace(cfg, space=label))
    resolved.update(out=str(out), space_options=searcher.space.describe(), total_steps=total,
                    steps_per_epoch=steps_per_epoch, dataset_name=data.name,
                    num_weight_examples=int(len(wy)), num_arch_examples=int(len(ay)),
                    backend=jax.default_backend(), jax_version=jax.__version__,
                    processes=jax.process_count(), global_devices=num_devices, loop_resolved=loop_kind,
                    cpu_loop_plan=loop_plan)
    if primary:
        (out / "config.json").write_text(json.dumps(resolved, indent=2, default=str) + "\n", encoding="utf-8")

    state = searcher.init_members(seeds) if multi else searcher.init(jax.random.PRNGKey(seeds[0]))
    state = searcher.replicate(state)
    pad, flip = _augment_settings(data)
    if loop_kind == "device":
        from dnas.device_loop import DeviceLoop
        device_loop = DeviceLoop(searcher, [(m[1], m[2]) for m in members], seeds, cfg.batch_size,
                                 cfg.augment, pad, flip)
    else:
        step_fn = searcher.compiled_step(donate=True)
    aug = jax.jit(augment_batch, static_argnames=("pad", "flip"))
    aug_keys = [jax.random.fold_in(jax.random.PRNGKey(s), AUG_SALT) for s in seeds]
    dirs = [out / f"seed-{s}" for s in seeds] if multi else [out]
    if primary:
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)

    logs = [_MetricsLog(d / "metrics.jsonl" if primary else None) for d in dirs]
    bar = None
    if cfg.progress and primary:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, desc=f"search {label}/{cfg.relaxation}" + (f" x{len(seeds)} seeds" if multi else ""),
                   unit="step", dynamic_ncols=True)
    step = 0
    compile_s = None
    epoch_records: list = [{} for _ in seeds]
    try:
        for epoch in range(epochs):
            t_epoch = time.perf_counter()
            meter = _EpochMeter(logs, epoch, seeds if multi else None, bar)
            if loop_kind == "device":
                state, step, compile_s = _device_epoch(device_loop, state, epoch, step, total, cfg, meter,
                                                       bar, compile_s)
            iters = [] if loop_kind == "device" else [zip(epoch_batches(wx_, wy_, cfg.batch_size, seed=s, epoch=epoch),
                         epoch_batches(ax_, ay_, cfg.batch_size, seed=s + ARCH_STREAM_OFFSET, epoch=epoch))
                     for s, (_, (wx_, wy_), (ax_, ay_)) in zip(seeds, members)]
            for batches in zip(*iters):
                if step >= total:
                    break
                per_member = []
                for k_aug, ((xt, yt), (xv, yv)) in zip(aug_keys, batches):
                    if cfg.augment:  # on the device; the step consumes the arrays where they are
                        kt, kv = jax.random.split(jax.random.fold_in(k_aug, step))
                        xt, xv = aug(kt, xt, pad=pad, flip=flip), aug(kv, xv, pad=pad, flip=flip)
                    per_member.append(((xt, yt), (xv, yv)))
                train_b, val_b = per_member[0] if not multi else jax.tree_util.tree_map(
                    lambda *a: jnp.stack(a), *per_member)
                t0 = time.perf_counter()
                state, metrics = step_fn(state, searcher.shard(train_b), searcher.shard(val_b))
                if compile_s is None:
                    jax.block_until_ready(metrics)
                    compile_s = time.perf_counter() - t0
                    trim_heap()  # the compiler's freed memory back to the kernel
                step += 1
                meter.add(step, metrics)
                if step % cfg.log_every == 0 or step == total:
                    meter.flush()
                if bar is not None:
                    bar.update(1)
            epoch_time = time.perf_counter() - t_epoch
            for i, (log, means) in enumerate(zip(logs, meter.means())):
                epoch_records[i] = {"kind": "epoch", "step": step, "epoch": epoch, **means, "epoch_time_s": epoch_time}
                if table is not None:   # the benchmark's accuracies of the cell derived now
                    g = searcher.derive(searcher.member(state, i) if multi else state)
                    epoch_records[i].update(arch=g.arch, **{f"nb201_{k}": v for k, v in table.lookup(g).items()})
                log.write(epoch_records[i])
            if primary and ((epoch + 1) % cfg.checkpoint_every == 0 or step >= total):
                save_checkpoint(out / "checkpoints", state, step)
    finally:
        if bar is not None:
            bar.close()
        for log in logs:
            log.close()

    states = [searcher.member(state, i) for i in range(len(seeds))] if multi else [state]
    genotypes = [searcher.derive(st) for st in states]
    wall = time.perf_counter() - t_start
    summary = {"out": str(out), "genotype": genotype_to_json(genotypes[0]), "steps": step, "epochs": epochs,
               "wall_time_s": wall, "compile_s": compile_s, "devices": num_devices,
               "processes": jax.process_count(), "final": epoch_records[0]}
    if multi:
        summary.update(seeds=list(seeds), genotypes=[genotype_to_json(g) for g in genotypes],
                       finals=epoch_records)
    if not primary:
        return SearchRun(summary, searcher, state, genotypes)
    for s, d, st, genotype in zip(seeds, dirs, states, genotypes):
        extra = {"relaxation": cfg.relaxation, "dataset": data.name, "seed": s,
                 "epochs": epochs, "steps": step, "devices": num_devices}
        if searcher.latency is not None:  # the derived architecture's latency under the table
            from dnas.latency.objective import genotype_indices
            extra["table_latency_ms"] = searcher.latency.of_indices(genotype_indices(searcher.space, genotype))
            extra["latency"] = searcher.latency.describe()
            if s == seeds[0]:
                summary["table_latency_ms"] = extra["table_latency_ms"]
        if table is not None:
            extra["nb201"] = table.lookup(genotype)
            if s == seeds[0]:
                summary["nb201"] = extra["nb201"]
        save_genotype(genotype, d / "genotype.json", extra=extra)
        alphas = write_alphas(d / "alphas.json", searcher, st)
        _plots(d, genotype, alphas, searcher)
    if multi:
        summary["op_frequency"] = write_op_frequency(out, searcher, seeds, genotypes)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return SearchRun(summary, searcher, state, genotypes)


def _device_epoch(loop, state, epoch: int, step: int, total: int, cfg: SearchConfig, meter, bar, compile_s):
    """One epoch of the device-resident loop (:mod:`dnas.device_loop`): chunks of
    ``cfg.chunk_steps`` steps per call, each chunk's metrics fetched once and logged exactly as
    the host loop logs them."""
    idx_w, idx_a = loop.epoch_indices(epoch)
    n = min(len(idx_w), total - step)
    for i in range(0, n, cfg.chunk_steps):
        j = min(n, i + cfg.chunk_steps)
        t0 = time.perf_counter()
        state, metrics = loop.run(state, idx_w[i:j], idx_a[i:j], step)
        host = to_host(metrics)
        if compile_s is None:   # the first chunk: compile plus the chunk's own steps
            compile_s = time.perf_counter() - t0
            trim_heap()
        for k in range(j - i):
            step += 1
            meter.add(step, {name: v[k] for name, v in host.items()})
            if step % cfg.log_every == 0 or step == total:
                meter.flush()
        if bar is not None:
            bar.update(j - i)
    return state, step, compile_s


def op_frequency(space, genotypes) -> dict:
    """How many of ``genotypes`` chose each op at each choice point, per group:
    ``{group: {choice_point: {op: count}}}`` (DARTS cells: edges not kept count as ``none``)."""
    from dnas.latency.objective import genotype_indices

    chosen = [genotype_indices(space, g) for g in genotypes]
    out: dict = {}
    for g in sorted(space.groups):
        names = list(space.group_op_names(g))
        out[g] = {}
        for r, point in enumerate(space.choice_point_names(g)):
            counts = {op: 0 for op in names}
            for c in chosen:
                counts[names[int(c[g][r])]] += 1
            out[g][str(point)] = counts
    return out


def write_op_frequency(out: Path, searcher: Searcher, seeds, genotypes) -> dict:
    """``op_frequency.json`` (counts per choice point and op, the seeds and their genotypes)
    and ``op_frequency.png`` (the fractions as heatmaps)."""
    from dnas.supernet.plot import plot_alphas

    freq = op_frequency(searcher.space, genotypes)
    record = {"space": searcher.space.name, "relaxation": searcher.relax.name, "seeds": list(seeds),
              "genotypes": [genotype_to_json(g) for g in genotypes], "counts": freq}
    (out / "op_frequency.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    mats = {g: np.array([[c / len(seeds) for c in row.values()] for row in rows.values()])
            for g, rows in freq.items()}
    plot_alphas(mats, {g: list(searcher.space.group_op_names(g)) for g in mats}, out / "op_frequency.png",
                title=f"op chosen, fraction of {len(seeds)} seeds")
    return freq


class _EpochMeter:
    """Collects the step metrics (device arrays) of one epoch and fetches them in batches.

    Fetching only every ``log_every`` steps keeps the host from blocking the device each
    step; every fetched loss is checked finite before anything is logged or checkpointed.
    With ``seeds`` the metrics carry a leading member axis and member ``i`` is logged to
    ``logs[i]``; otherwise there is one log.
    """

    def __init__(self, logs: list, epoch: int, seeds=None, bar=None):
        self.logs, self.epoch, self.seeds, self.bar = logs, epoch, seeds, bar
        self.pending: list[tuple[int, dict]] = []
        self.sums: list[dict[str, float]] = [{} for _ in logs]
        self.n = 0

    def add(self, step: int, metrics: dict) -> None:
        self.pending.append((step, metrics))

    def _rows(self, m: dict) -> list[dict]:
        if self.seeds is None:
            return [{k: float(v) for k, v in m.items()}]
        return [{k: float(v[i]) for k, v in m.items()} for i in range(len(self.seeds))]

    def flush(self) -> None:
        if not self.pending:
            return
        host = to_host([m for _, m in self.pending])
        for (s, _), m in zip(self.pending, host):
            for i, row in enumerate(self._rows(m)):
                try:
                    check_finite(row, s)
                except NonFiniteLossError as e:
                    if self.seeds is None:
                        raise
                    raise NonFiniteLossError(f"seed {self.seeds[i]}: {e}") from None
                for k, v in row.items():
                    self.sums[i][k] = self.sums[i].get(k, 0.0) + v
            self.n += 1
        last_step, last = self.pending[-1][0], self._rows(host[-1])
        for log, row in zip(self.logs, last):
            log.write({"kind": "step", "step": last_step, "epoch": self.epoch, **row})
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{np.mean([r['train_loss'] for r in last]):.3f}",
                                 val_acc=f"{np.mean([r['val_acc'] for r in last]):.3f}",
                                 H=f"{np.mean([r['entropy'] for r in last]):.3f}")
        self.pending.clear()

    def means(self) -> list[dict]:
        """The epoch's mean of every metric, one dict per log."""
        self.flush()
        return [{k: v / max(self.n, 1) for k, v in sums.items()} for sums in self.sums]


def _plots(out: Path, genotype, alphas: dict, searcher: Searcher) -> None:
    from dnas.supernet.plot import plot_alphas, plot_genotype, plot_hyperparams

    plot_genotype(genotype, out / "genotype.png")
    probs = {g: np.asarray(v["probs"]) for g, v in alphas["groups"].items()}
    plot_alphas(probs, {g: list(searcher.space.group_op_names(g)) for g in probs}, out / "alphas.png")
    plot_hyperparams(out / "metrics.jsonl", out / "hyperparams.png", tuned=searcher.tune)


__all__ = ["SearchConfig", "run_search", "save_checkpoint", "restore_checkpoint", "NonFiniteLossError"]
