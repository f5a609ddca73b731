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
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dnas.data import Dataset, augment_batch, darts_split, epoch_batches, load_dataset, num_batches
from dnas.distributed import is_primary, to_host
from dnas.hugepages import trim_heap
from dnas.device_loop import ARCH_STREAM_OFFSET, AUG_SALT
from dnas.loop_plan import plan_cpu_loops, resolve_loop
from dnas.searcher import Hyper, NonFiniteLossError, SearchState, Searcher, check_finite, make_searcher
from dnas.relaxations import entropy
from dnas.rundir import (RunDirError, atomic_path, check_state_finite, claim_out, count_lines, discard_after,
                         refuse_changes, restore_checkpoint, restore_latest, save_checkpoint, truncate_lines, write_json_atomic)
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
    checkpoint_steps: int | None = None   # also checkpoint every N steps (within epochs)
    tensorboard: bool = False             # OUT/tensorboard/: scalars per logged step, α images per epoch
    hessian_eigenvalue: bool = False      # log λ_max/λ_min of ∇²_α L_val every epoch (RobustDARTS; dnas.hessian)
    hessian_iters: int = 10               # Lanczos steps (Hessian-vector products) per estimate
    stop: tuple = ()                      # early-stopping rules: "skips:2", "stable:10", "eigen:5" (dnas.stopping)
    remedies: dict = dataclasses.field(default_factory=dict)  # {name: {option: value}} (dnas.remedies)
    data_dir: str | None = None           # tfds data dir
    progress: bool = True
    nb201_table: str | None = None        # NAS-Bench-201 accuracy CSV: look the derived cell up every epoch
    precision: str = "float32"            # "bfloat16": convolutions in bfloat16 (dnas.searcher.PRECISIONS)
    loop: str = "auto"                    # "host", "device" (dnas.device_loop) or "auto": device on GPU/TPU
    chunk_steps: int = 50                 # device loop: search steps per compiled call
    kernels: str = "auto"                 # dnas.backend kernel policy: auto, xla_cpu or native


def default_out_dir() -> Path:
    return Path("runs") / _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


#: SearchConfig fields a resumed run may change: the run's length, and what only shows progress
#: or where checkpoints go (``--resume`` refuses any other difference, naming it).
RESUMABLE_CHANGES = ("epochs", "max_steps", "progress", "checkpoint_every", "checkpoint_steps", "tensorboard",
                     "data_dir", "out")   # (the stop rules are not: they decide where the run ends)


def config_from_dict(data: dict) -> "SearchConfig":
    """A :class:`SearchConfig` from a mapping (a YAML/JSON config file, or a run's own
    ``config.json``, whose ``"resolved"`` facts are skipped); values are type-checked and an
    unknown key is an error (:mod:`dnas.options`)."""
    from dnas.options import dataclass_from_dict
    return dataclass_from_dict(SearchConfig, data, ignore=("resolved",))


class _MetricsLog:
    """Appends JSON lines to ``path`` (``None``: a process that writes nothing)."""

    def __init__(self, path: Path | None):
        self.path = path
        self.f = open(path, "a", encoding="utf-8") if path is not None else None
        self.n = count_lines(path) if path is not None else 0   # lines in the file (what a checkpoint keeps)

    def write(self, record: dict) -> None:
        if self.f is not None:
            self.f.write(json.dumps(record, allow_nan=True) + "\n")
            self.f.flush()
            self.n += 1

    def lines(self) -> int:
        return self.n

    def close(self) -> None:
        if self.f is not None:
            self.f.close()


def _augment_settings(data: Dataset) -> tuple[int, bool]:
    """DARTS's CIFAR augmentation (pad 4 and crop, flip) scaled to the image size; digits
    are not mirror-symmetric, so no flip for them."""
    h = data.image_shape[0]
    return max(1, h // 8), data.name != "digits"


def write_alphas(path: Path, searcher: Searcher, state: SearchState) -> dict:
    """The final architecture parameters and probabilities, per group and choice point."""
    arch = to_host(state.arch)
    probs = searcher.probs(state)
    scores = to_host(searcher.relax.derive_scores(arch))
    alphas = searcher.relax.alphas(arch)
    space = searcher.space
    out: dict[str, Any] = {"space": space.name, "relaxation": searcher.relax.name,
                           "op_names": list(space.op_names), "groups": {}}
    for g in sorted(space.groups):
        alpha = alphas.get(g)
        out["groups"][g] = {
            "op_names": list(space.group_op_names(g)),
            "choice_points": space.choice_point_names(g),
            "alpha": None if alpha is None else np.asarray(alpha).tolist(),
            "probs": np.asarray(probs[g]).tolist(),
            "scores": np.asarray(scores[g]).tolist(),
        }
    if set(arch) != set(space.groups):  # relaxations with more parameters (PC-DARTS's β, ...)
        out["parameters"] = jax.tree_util.tree_map(lambda a: np.asarray(a).tolist(), arch)
    write_json_atomic(path, out)
    return out


def _point_names(space, groups) -> dict[str, list[str]]:
    """Every group's choice-point names, as the pictures label their rows."""
    return {g: [str(c) for c in space.choice_point_names(g)] for g in groups}


def alpha_entropy(probs: Mapping[str, Any]) -> dict:
    """How far α has decided: the final architecture distribution's mean entropy over the
    choice points (nats) and that of the uniform distribution, the mean of ``ln n`` over
    choice points of ``n`` options, where every search starts. A ratio near 1 means the
    derived architecture is the argmax of a near-uniform α, close to a random pick."""
    uniform = [math.log(np.shape(p)[-1]) for p in probs.values() for _ in range(int(np.prod(np.shape(p)[:-1])))]
    return {"final": float(entropy(dict(probs))), "uniform": float(np.mean(uniform))}


def _member_data(cfg: SearchConfig, seed: int, cache: dict):
    """The weight half and architecture half of the training split for one seed (the data
    subset depends on the seed only through ``limit_examples``)."""
    key = seed if cfg.limit_examples is not None else None
    if key not in cache:
        cache[key] = load_dataset(cfg.dataset, limit_examples=cfg.limit_examples, seed=seed, data_dir=cfg.data_dir)
    data = cache[key]
    (wx, wy), (ax, ay) = darts_split(data.train_x, data.train_y, seed=seed)
    return data, (wx, wy.astype(np.int32)), (ax, ay.astype(np.int32))


def run_search(cfg: SearchConfig, *, resume: bool = False, overwrite: bool = False) -> dict:
    """Run a search (or one per seed of ``cfg.seeds``, vmapped) and write its outputs; returns
    a summary dict (also ``summary.json``). ``resume``: continue the run in ``cfg.out`` from
    its latest good checkpoint; ``overwrite``: replace the run in ``cfg.out``."""
    return search_run(cfg, resume=resume, overwrite=overwrite).summary


class SearchRun(NamedTuple):
    """A finished search: its summary (``summary.json``), the searcher, the final state (stacked
    over members with several seeds) and the derived genotype of every seed."""

    summary: dict
    searcher: Searcher
    state: SearchState
    genotypes: list


class Preempted(Exception):
    """SIGTERM/SIGINT arrived: the run checkpointed at ``step`` and stopped (resume it with
    ``dnas search --resume OUT``)."""

    def __init__(self, step: int, out: Path, signum: int, command: str = "search"):
        super().__init__(f"stopped by signal {signum} after step {step}; checkpointed in {out}/checkpoints — "
                         f"continue with: dnas {command} --resume {out}")
        self.step, self.out, self.signum = step, out, signum


class _Prepared(NamedTuple):
    """What a search run is made of, built and validated before anything is written."""

    cfg: SearchConfig
    out: Path
    primary: bool
    loop_kind: str
    seeds: tuple
    table: Any
    members: list
    data: Dataset
    steps_per_epoch: int
    total: int
    epochs: int
    searcher: Searcher
    label: str
    num_devices: int
    resolved: dict


def prepare_search(cfg: SearchConfig) -> _Prepared:
    """Validate ``cfg``, load the data and build the searcher; touches no file."""
    loop_kind = resolve_loop(cfg.loop)
    if cfg.chunk_steps < 1:
        raise ValueError(f"chunk_steps must be positive, got {cfg.chunk_steps}")
    if cfg.checkpoint_every < 1 or (cfg.checkpoint_steps is not None and cfg.checkpoint_steps < 1):
        raise ValueError("checkpoint_every and checkpoint_steps must be positive")
    out = Path(cfg.out) if cfg.out else default_out_dir()
    if cfg.devices < 1 or cfg.devices > jax.local_device_count():
        raise ValueError(f"--devices {cfg.devices}: this process sees {jax.local_device_count()} "
                         f"{jax.default_backend()} device(s)")
    num_devices = cfg.devices * jax.process_count()  # --devices is per process
    if cfg.batch_size % num_devices:
        raise ValueError(f"batch size {cfg.batch_size} is not divisible by {num_devices} devices")
    seeds = tuple(int(s) for s in cfg.seeds) if cfg.seeds else (int(cfg.seed),)
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {','.join(map(str, seeds))}: every seed must be distinct")
    from dnas.stopping import check_rules
    check_rules(cfg.stop, cfg.hessian_eigenvalue)
    if cfg.stop and len(seeds) > 1:
        raise ValueError("--stop applies to one search; the vmapped --seeds runs share one program and stop together")
    if cfg.hessian_iters < 1:
        raise ValueError(f"hessian_iters must be positive, got {cfg.hessian_iters}")

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
                             num_seeds=len(seeds), precision=cfg.precision, kernels=cfg.kernels,
                             remedies=cfg.remedies)
    label = cfg.space if isinstance(cfg.space, str) else searcher.space.name
    resolved = dict(out=str(out), space_options=searcher.space.describe(), total_steps=total,
                    steps_per_epoch=steps_per_epoch, dataset_name=data.name,
                    num_weight_examples=int(len(wy)), num_arch_examples=int(len(ay)),
                    backend=jax.default_backend(), jax_version=jax.__version__,
                    processes=jax.process_count(), global_devices=num_devices, loop_resolved=loop_kind,
                    cpu_loop_plan=loop_plan)
    return _Prepared(cfg, out, is_primary(), loop_kind, seeds, table, members, data, steps_per_epoch, total,
                     epochs, searcher, label, num_devices, resolved)


def _config_record(prep: _Prepared) -> dict:
    """``config.json``: the run's :class:`SearchConfig` (readable back by :func:`config_from_dict`,
    so ``--config RUN/config.json`` reruns it) and, under ``"resolved"``, what it resolved to."""
    from dnas.options import config_to_dict
    record = config_to_dict(dataclasses.replace(prep.cfg, space=prep.label, out=str(prep.out)))
    record["resolved"] = prep.resolved
    return record


def saved_config(out: Path) -> SearchConfig:
    """The :class:`SearchConfig` of the run in ``out`` (its ``config.json``)."""
    path = Path(out) / "config.json"
    if not path.is_file():
        raise RunDirError(f"{out}: no config.json, so no dnas search run to resume or derive")
    from dnas.options import load_config_file
    return config_from_dict(load_config_file(path))


def check_resumable(saved: SearchConfig, cfg: SearchConfig) -> None:
    """Refuse to resume a run under a configuration that differs in more than its length."""
    if not isinstance(cfg.space, str):   # a model object: compared by its label
        cfg = dataclasses.replace(cfg, space=saved.space)
    refuse_changes(saved, cfg, RESUMABLE_CHANGES, cfg.out)


def _init_state(prep: _Prepared) -> SearchState:
    s = prep.searcher
    return s.init_members(prep.seeds) if len(prep.seeds) > 1 else s.init(jax.random.PRNGKey(prep.seeds[0]))


def _dirs(prep: _Prepared) -> list[Path]:
    return [prep.out / f"seed-{s}" for s in prep.seeds] if len(prep.seeds) > 1 else [prep.out]


class _StopSignals:
    """While active, SIGTERM and SIGINT only set :attr:`signum`; the loop checkpoints at the
    next step and stops (:class:`Preempted`). Installed only in the main thread."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def __enter__(self):
        import signal
        import threading
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:   # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        import signal
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def search_run(cfg: SearchConfig, *, resume: bool = False, overwrite: bool = False) -> SearchRun:
    """:func:`run_search` that also returns what the Python API (:func:`dnas.search`) hands back."""
    t_start = time.perf_counter()
    if resume:
        if not cfg.out:
            raise RunDirError("resume needs the run's directory (out)")
        check_resumable(saved_config(Path(cfg.out)), cfg)
    prep = prepare_search(cfg)
    searcher, seeds, out, primary = prep.searcher, prep.seeds, prep.out, prep.primary
    multi = len(seeds) > 1
    if primary:   # every input is valid: now the directory is claimed
        claim_out(out, resume=resume, overwrite=overwrite, command="search")
        write_json_atomic(out / "config.json", _config_record(prep))

    state = _init_state(prep)
    progress: dict = {}
    dirs = _dirs(prep)
    if resume:
        state, progress, ckpt_step = restore_latest(out / "checkpoints", to_host(state),
                                                    layout=searcher.space.layout_fingerprint())
        if primary:
            discard_after(out / "checkpoints", ckpt_step)
            for rel, n in progress.get("lines", {}).items():
                truncate_lines(out / rel, int(n))
    state = searcher.replicate(state)
    if primary:
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)
    logs = [_MetricsLog(d / "metrics.jsonl" if primary else None) for d in dirs]
    alpha_logs = [_MetricsLog(d / "alphas.jsonl" if primary else None) for d in dirs]
    board = _Board(out / "tensorboard", seeds if multi else None, progress.get("step", 0)) \
        if cfg.tensorboard and primary else None
    bar = None
    if cfg.progress and primary:
        from tqdm.auto import tqdm
        bar = tqdm(total=prep.total, initial=progress.get("step", 0), unit="step", dynamic_ncols=True,
                   desc=f"search {prep.label}/{cfg.relaxation}" + (f" x{len(seeds)} seeds" if multi else ""))
    try:
        with _StopSignals() as stop:
            state, step, compile_s, epoch_records, halt, history = _search_loop(prep, state, progress, logs,
                                                                                alpha_logs, board, bar, stop)
    finally:
        if bar is not None:
            bar.close()
        for log in logs + alpha_logs:
            log.close()
        if board is not None:
            board.close()
    return _finish(prep, state, step, compile_s, epoch_records, time.perf_counter() - t_start, halt, history)


def _search_loop(prep: _Prepared, state, progress: dict, logs, alpha_logs, board, bar, stop):
    """The epochs of the search from ``progress`` (a checkpoint's, or ``{}`` for a new run).
    Data order is a function of (seed, epoch) and augmentation of (seed, step), so skipping
    the steps an interrupted epoch already ran continues exactly."""
    cfg, searcher, seeds, out, total = prep.cfg, prep.searcher, prep.seeds, prep.out, prep.total
    multi = len(seeds) > 1
    pad, flip = _augment_settings(prep.data)
    if prep.loop_kind == "device":
        from dnas.device_loop import DeviceLoop
        device_loop = DeviceLoop(searcher, [(m[1], m[2]) for m in prep.members], seeds, cfg.batch_size,
                                 cfg.augment, pad, flip)
    else:
        step_fn = searcher.compiled_step(donate=True)
    aug = jax.jit(augment_batch, static_argnames=("pad", "flip"))
    aug_keys = [jax.random.fold_in(jax.random.PRNGKey(s), AUG_SALT) for s in seeds]

    step = int(progress.get("step", 0))
    epoch_records: list = progress.get("epoch_records") or [{} for _ in seeds]
    start_epoch, skip, sums = 0, 0, None
    if progress:
        start_epoch = int(progress["epoch"]) + (1 if progress["epoch_done"] else 0)
        if not progress["epoch_done"]:
            skip, sums = step - start_epoch * prep.steps_per_epoch, progress["meter"]
    compile_s = None
    history: list = list(progress.get("history", []))   # the epoch records the stop rules read (member 0)
    halt = progress.get("halted")                         # a stop rule fired (dnas.stopping)
    hess_fn = searcher.hessian_function(cfg.hessian_iters) if cfg.hessian_eigenvalue else None
    # the curvature is measured on a fixed batch: the first examples of each member's α half
    hess_batch = [(ax_[:cfg.batch_size], ay_[:cfg.batch_size]) for _, _, (ax_, ay_) in prep.members]
    hess_batch = hess_batch[0] if not multi else jax.tree_util.tree_map(lambda *a: np.stack(a), *hess_batch)

    def checkpoint(epoch: int, epoch_done: bool, meter: "_EpochMeter") -> None:
        meter.drain()   # every metric up to this step checked finite and summed
        if not prep.primary:
            return
        lines = {str(log.path.relative_to(out)): log.lines() for log in logs + alpha_logs}
        save_checkpoint(out / "checkpoints", state, step, layout=searcher.space.layout_fingerprint(), progress={
            "epoch": epoch, "epoch_done": epoch_done, "meter": meter.state(), "epoch_records": epoch_records,
            "lines": lines, "history": history, "halted": halt})

    def epoch_facts(i: int, eigs) -> dict:
        """What every epoch record says about the architecture (dnas.stopping reads it)."""
        from dnas.stopping import cell_summary
        st = searcher.member(state, i) if multi else state
        g = searcher.derive(st)
        facts = cell_summary(searcher.space, g, searcher.probs(st))
        if not any(str(r).startswith("stable") for r in cfg.stop):
            facts.pop("op_ranking")
        if cfg.stop:
            facts["genotype"] = genotype_to_json(g)
        if eigs is not None:
            facts.update(hessian_eig_max=float(np.asarray(eigs[0]).reshape(-1)[i]),
                         hessian_eig_min=float(np.asarray(eigs[1]).reshape(-1)[i]))
        if prep.table is not None:   # the benchmark's accuracies of the cell derived now
            facts.update(arch=g.arch, **{f"nb201_{k}": v for k, v in prep.table.lookup(g).items()})
        return facts

    if halt:   # a resumed run that a stop rule had ended: nothing more to search
        return state, step, compile_s, epoch_records, halt, history

    def log_alphas() -> None:
        if not prep.primary:
            return
        for i, log in enumerate(alpha_logs):
            probs = searcher.probs(searcher.member(state, i) if multi else state)
            log.write({"step": step, **{g: np.asarray(p).tolist() for g, p in probs.items()}})

    if not progress:
        log_alphas()   # the initial α: where the evolution starts
    for epoch in range(start_epoch, prep.epochs):
        t_epoch = time.perf_counter()
        meter = _EpochMeter(logs, epoch, seeds if multi else None, bar, board, sums)
        sums = None
        if prep.loop_kind == "device":
            before = step
            for state, step, compile_s, last_of_epoch in _device_chunks(device_loop, state, epoch, step, total, cfg,
                                                                        meter, bar, compile_s, skip):
                log_alphas()
                crossed = cfg.checkpoint_steps and step // cfg.checkpoint_steps > before // cfg.checkpoint_steps
                before = step
                if last_of_epoch:
                    continue
                if stop.signum is not None:
                    checkpoint(epoch, False, meter)
                    raise Preempted(step, out, stop.signum)
                if crossed:   # chunks end where they end: the checkpoint falls on the chunk boundary
                    checkpoint(epoch, False, meter)
        iters = [] if prep.loop_kind == "device" else [
            zip(epoch_batches(wx_, wy_, cfg.batch_size, seed=s, epoch=epoch),
                epoch_batches(ax_, ay_, cfg.batch_size, seed=s + ARCH_STREAM_OFFSET, epoch=epoch))
            for s, (_, (wx_, wy_), (ax_, ay_)) in zip(seeds, prep.members)]
        for i, batches in enumerate(zip(*iters)):
            if i < skip:
                continue
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
                log_alphas()
            if bar is not None:
                bar.update(1)
            last_of_epoch = i + 1 == prep.steps_per_epoch or step >= total
            if stop.signum is not None and not last_of_epoch:
                checkpoint(epoch, False, meter)
                raise Preempted(step, out, stop.signum)
            if cfg.checkpoint_steps and step % cfg.checkpoint_steps == 0 and not last_of_epoch:
                checkpoint(epoch, False, meter)
        skip = 0
        epoch_time = time.perf_counter() - t_epoch
        means = meter.means()
        eigs = to_host(hess_fn(state, searcher.shard(hess_batch))) if hess_fn is not None else None
        for i, log in enumerate(logs):
            epoch_records[i] = {"kind": "epoch", "step": step, "epoch": epoch, **means[i], "epoch_time_s": epoch_time,
                                **epoch_facts(i, eigs)}
            log.write(epoch_records[i])
        if eigs is not None:
            check_finite(epoch_records[0], step, keys=("hessian_eig_max", "hessian_eig_min"))
        if board is not None:
            board.epoch(epoch, step, searcher, state)
        if cfg.stop:
            from dnas.stopping import decide
            history.append(epoch_records[0])
            fired = decide(cfg.stop, history)
            if fired is not None:
                halt = dataclasses.asdict(fired)
                logs[0].write({"kind": "stop", "step": step, "epoch": epoch, **halt})
                if bar is not None:
                    bar.write(f"stopped early ({fired.rule}): {fired.reason}")
        if ((epoch + 1) % cfg.checkpoint_every == 0 or step >= total or stop.signum is not None or halt
                or (cfg.checkpoint_steps and step % cfg.checkpoint_steps == 0)):
            checkpoint(epoch, True, meter)
        if halt:
            break
        if stop.signum is not None and step < total:
            raise Preempted(step, out, stop.signum)
    return state, step, compile_s, epoch_records, halt, history


def _finish(prep: _Prepared, state, step: int, compile_s, epoch_records: list, wall: float, halt: dict | None = None,
            history: list = ()) -> SearchRun:
    """Derive every member's architecture and write the run's final files (all atomically).
    After an early stop (``halt``) the architecture is the one derived at the epoch the rule
    keeps (DARTS-ES: ``K`` epochs before it fired)."""
    cfg, searcher, seeds, out, data = prep.cfg, prep.searcher, prep.seeds, prep.out, prep.data
    multi = len(seeds) > 1
    check_state_finite(state, step)
    states = [searcher.member(state, i) for i in range(len(seeds))] if multi else [state]
    genotypes = [searcher.derive(st) for st in states]
    if halt and halt["keep_epoch"] != halt["epoch"]:
        from dnas.supernet.genotype import genotype_from_json
        kept = next(r for r in history if r["epoch"] == halt["keep_epoch"])
        genotypes[0] = genotype_from_json(kept["genotype"])
    decided = [alpha_entropy(searcher.probs(st)) for st in states]
    summary = {"out": str(out), "genotype": genotype_to_json(genotypes[0]), "steps": step, "epochs": prep.epochs,
               "wall_time_s": wall, "compile_s": compile_s, "devices": prep.num_devices,
               "processes": jax.process_count(), "final": epoch_records[0], "alpha_entropy": decided[0]}
    if multi:
        summary.update(seeds=list(seeds), genotypes=[genotype_to_json(g) for g in genotypes],
                       finals=epoch_records, alpha_entropies=decided)
    if halt:
        summary["stopped"] = halt
    if not prep.primary:
        return SearchRun(summary, searcher, state, genotypes)
    for s, d, st, genotype in zip(seeds, _dirs(prep), states, genotypes):
        extra = {"relaxation": cfg.relaxation, "dataset": data.name, "seed": s,
                 "epochs": prep.epochs, "steps": step, "devices": prep.num_devices}
        if halt:
            extra["stopped"] = halt
        if searcher.latency is not None:  # the derived architecture's latency under the table
            extra["table_latency_ms"] = searcher.latency.of_indices(searcher.space.genotype_indices(genotype))
            extra["latency"] = searcher.latency.describe()
            if s == seeds[0]:
                summary["table_latency_ms"] = extra["table_latency_ms"]
        if prep.table is not None:
            extra["nb201"] = prep.table.lookup(genotype)
            if s == seeds[0]:
                summary["nb201"] = extra["nb201"]
        save_genotype(genotype, d / "genotype.json", extra=extra)
        alphas = write_alphas(d / "alphas.json", searcher, st)
        _plots(d, genotype, alphas, searcher)
    if multi:
        summary["op_frequency"] = write_op_frequency(out, searcher, seeds, genotypes)
    write_json_atomic(out / "summary.json", summary)
    return SearchRun(summary, searcher, state, genotypes)


def derive_run(out: str | os.PathLike, step: int | None = None) -> SearchRun:
    """Write a search run's derived architecture, ``alphas.json`` and pictures from its latest
    readable checkpoint (or that of ``step``): for a run that died or was stopped before it
    wrote them (``dnas derive RUN_DIR``). The run itself is left as it is."""
    out = Path(out)
    cfg = saved_config(out)
    # one device is enough to read the state back (it is replicated); nothing is stepped
    prep = prepare_search(dataclasses.replace(cfg, out=str(out), devices=1, progress=False))
    state, progress, ckpt_step = restore_latest(out / "checkpoints", to_host(_init_state(prep)), step=step,
                                                layout=prep.searcher.space.layout_fingerprint())
    records = progress.get("epoch_records") or [{} for _ in prep.seeds]
    return _finish(prep, state, ckpt_step, None, records, 0.0, progress.get("halted"), progress.get("history", []))


def _device_chunks(loop, state, epoch: int, step: int, total: int, cfg: SearchConfig, meter, bar, compile_s,
                   skip: int = 0):
    """One epoch of the device-resident loop (:mod:`dnas.device_loop`) from its step ``skip``:
    chunks of ``cfg.chunk_steps`` steps per call, each chunk's metrics fetched once and logged
    exactly as the host loop logs them. Yields ``(state, step, compile_s, last_of_epoch)``
    after each chunk (where the run may checkpoint or stop)."""
    idx_w, idx_a = loop.epoch_indices(epoch)
    n = min(len(idx_w), skip + total - step)
    for i in range(skip, n, cfg.chunk_steps):
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
        yield state, step, compile_s, j == len(idx_w) or step >= total


def op_frequency(space, genotypes) -> dict:
    """How many of ``genotypes`` chose each op at each choice point, per group:
    ``{group: {choice_point: {op: count}}}`` (DARTS cells: edges not kept count as ``none``)."""
    chosen = [space.genotype_indices(g) for g in genotypes]
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
                title=f"op chosen, fraction of {len(seeds)} seeds",
                row_labels_by_key={g: [str(k) for k in rows] for g, rows in freq.items()})
    return freq


class _EpochMeter:
    """Collects the step metrics (device arrays) of one epoch and fetches them in batches.

    Fetching only every ``log_every`` steps keeps the host from blocking the device each
    step; every fetched metric is checked finite before anything is logged or checkpointed.
    With ``seeds`` the metrics carry a leading member axis and member ``i`` is logged to
    ``logs[i]``; otherwise there is one log. ``restored`` continues an interrupted epoch's
    sums (:meth:`state`, kept in the checkpoint).
    """

    def __init__(self, logs: list, epoch: int, seeds=None, bar=None, board=None, restored: dict | None = None):
        self.logs, self.epoch, self.seeds, self.bar, self.board = logs, epoch, seeds, bar, board
        self.pending: list[tuple[int, dict]] = []
        self.sums: list[dict[str, float]] = [dict(s) for s in restored["sums"]] if restored else [{} for _ in logs]
        self.n = int(restored["n"]) if restored else 0
        self.last: tuple[int, list] | None = None

    def add(self, step: int, metrics: dict) -> None:
        self.pending.append((step, metrics))

    def _rows(self, m: dict) -> list[dict]:
        if self.seeds is None:
            return [{k: float(v) for k, v in m.items()}]
        return [{k: float(v[i]) for k, v in m.items()} for i in range(len(self.seeds))]

    def drain(self) -> None:
        """Fetch the pending steps' metrics, check every one finite and add them to the sums."""
        if not self.pending:
            return
        host = to_host([m for _, m in self.pending])
        for (s, _), m in zip(self.pending, host):
            for i, row in enumerate(self._rows(m)):
                try:
                    check_finite(row, s, keys=tuple(row))
                except NonFiniteLossError as e:
                    if self.seeds is None:
                        raise
                    raise NonFiniteLossError(f"seed {self.seeds[i]}: {e}") from None
                for k, v in row.items():
                    self.sums[i][k] = self.sums[i].get(k, 0.0) + v
            self.n += 1
        self.last = (self.pending[-1][0], self._rows(host[-1]))
        self.pending.clear()

    def flush(self) -> None:
        """:meth:`drain`, then write the last step's record (and show it)."""
        self.drain()
        if self.last is None:
            return
        last_step, last = self.last
        self.last = None
        for log, row in zip(self.logs, last):
            log.write({"kind": "step", "step": last_step, "epoch": self.epoch, **row})
        if self.board is not None:
            self.board.scalars(last_step, last)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{np.mean([r['train_loss'] for r in last]):.3f}",
                                 val_acc=f"{np.mean([r['val_acc'] for r in last]):.3f}",
                                 H=f"{np.mean([r['entropy'] for r in last]):.3f}")

    def state(self) -> dict:
        return {"sums": self.sums, "n": self.n}

    def means(self) -> list[dict]:
        """The epoch's mean of every metric, one dict per log."""
        self.flush()
        return [{k: v / max(self.n, 1) for k, v in sums.items()} for sums in self.sums]


class _Board:
    """TensorBoard event files (tensorboardX, no TensorFlow): every logged step's metrics as
    scalars, and per epoch the op probabilities of every choice point as a heatmap image.
    On resume, events after the checkpoint's step are purged (``purge_step``)."""

    def __init__(self, logdir: Path, seeds, resume_step: int = 0):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:  # pragma: no cover - a dependency of dnas
            raise RunDirError("tensorboard output needs tensorboardX (pip install tensorboardX)") from None
        self.seeds = seeds
        names = [f"seed-{s}" for s in seeds] if seeds else [""]
        self.writers = [SummaryWriter(str(logdir / n) if n else str(logdir),
                                      purge_step=resume_step + 1 if resume_step else None) for n in names]

    def scalars(self, step: int, rows: list[dict]) -> None:
        for w, row in zip(self.writers, rows):
            for k, v in row.items():
                w.add_scalar(f"search/{k}", v, step)

    def epoch(self, epoch: int, step: int, searcher: Searcher, state) -> None:
        from dnas.supernet.plot import alphas_image
        for i, w in enumerate(self.writers):
            st = searcher.member(state, i) if self.seeds else state
            probs = searcher.probs(st)
            img = alphas_image({g: np.asarray(p) for g, p in probs.items()},
                               {g: list(searcher.space.group_op_names(g)) for g in probs},
                               title=f"op probabilities, epoch {epoch + 1}",
                               row_labels_by_key=_point_names(searcher.space, probs))
            w.add_image("alphas/probabilities", img, step, dataformats="HWC")
            w.flush()

    def close(self) -> None:
        for w in self.writers:
            w.close()


class _NoPicture(Exception):
    pass


def save_picture(path: Path, draw) -> bool:
    """``draw(tmp_path)`` written atomically to ``path``; a ``draw`` that returns None (nothing
    to show) leaves no file. Returns whether a picture was written."""
    try:
        with atomic_path(path) as p:
            if draw(p) is None:
                raise _NoPicture
    except _NoPicture:
        return False
    return True


def _plots(out: Path, genotype, alphas: dict, searcher: Searcher) -> None:
    from dnas.supernet.plot import (plot_alpha_evolution, plot_alphas, plot_epoch_curves, plot_genotype,
                                    plot_hyperparams)

    probs = {g: np.asarray(v["probs"]) for g, v in alphas["groups"].items()}
    ops = {g: list(searcher.space.group_op_names(g)) for g in probs}
    save_picture(out / "genotype.png", lambda p: plot_genotype(genotype, p))
    points = _point_names(searcher.space, probs)
    save_picture(out / "alphas.png", lambda p: plot_alphas(probs, ops, p, row_labels_by_key=points))
    save_picture(out / "hyperparams.png", lambda p: plot_hyperparams(out / "metrics.jsonl", p, tuned=searcher.tune))
    save_picture(out / "alpha_evolution.png", lambda p: plot_alpha_evolution(out / "alphas.jsonl", ops, points, p))
    save_picture(out / "collapse.png", lambda p: plot_epoch_curves(out / "metrics.jsonl", p))


__all__ = ["SearchConfig", "run_search", "search_run", "derive_run", "config_from_dict", "save_checkpoint",
           "restore_checkpoint", "NonFiniteLossError", "Preempted"]
