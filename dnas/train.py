"""Retraining a derived architecture from scratch: what ``dnas train`` runs.

A search's ``genotype.json`` (or the search run's directory) becomes a stand-alone network
(:func:`dnas.supernet.derived.build_network`) trained on the whole training split and
evaluated on the test split after every epoch. The defaults follow the space's evaluation
protocol (``Space.train_protocol``: NAS-Bench-201's, DARTS's, a ProxylessNAS-like recipe for the
chain, :data:`~dnas.supernet.space_base.GENERIC_TRAIN_PROTOCOL` for a space that states none),
except the number of epochs (short by default; the papers' ``--epochs`` are in the spaces'
docstrings).

Every batch is augmented like the search's (random crop from a zero-padded image, horizontal
flip except on digits). The output directory receives ``config.json``, ``metrics.jsonl`` (one
record per logged step and per epoch: train loss/accuracy, test loss/accuracy, learning rate,
drop-path probability), ``checkpoints/<step>/`` (orbax; written only after the epoch's losses
were checked finite), ``genotype.json`` and ``genotype.png`` (the architecture trained),
``training.png`` (the curves) and ``summary.json`` (final and best test accuracy, parameters,
wall and compile time).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh

from dnas.data import DatasetError, augment_batch, epoch_batches, load_dataset, num_batches
from dnas.hugepages import trim_heap
from dnas.run import _augment_settings, _MetricsLog, restore_checkpoint, save_checkpoint
from dnas.backend import resolve as resolve_kernels
from dnas.parallel import DataParallel
from dnas.searcher import accuracy, check_finite, compute_dtype
from dnas.supernet.derived import DropPath, Network, count_params
from dnas.supernet.genotype import DARTS_V2, Genotype, genotype_to_json, load_genotype, parse_nb201, save_genotype
from dnas.supernet.context import Ctx
from dnas.supernet.space_base import refuse_precision

_PROTOCOL_KEYS = ("batch_size", "lr", "nesterov", "weight_decay", "grad_clip", "drop_path", "cutout",
                  "auxiliary_weight", "label_smoothing")


@dataclasses.dataclass
class TrainConfig:
    """A retraining run (the ``dnas train`` flags map one to one). ``None`` means: the space's
    protocol default (``Space.train_protocol``) or, for the dataset, the search run's dataset."""

    genotype: str | None                   # genotype.json, or a search run's directory holding one
    dataset: str | None = None
    data_dir: str | None = None
    limit_examples: int | None = None
    epochs: int = 20
    max_steps: int | None = None
    seed: int = 0
    devices: int = 1
    out: str | None = None
    network_options: dict = dataclasses.field(default_factory=dict)
    cells: int | None = None               # the network's Space.cells_option (nb201: cells per stage; darts: layers)
    batch_size: int | None = None
    lr: float | None = None
    lr_min: float = 0.0
    momentum: float = 0.9
    nesterov: bool | None = None
    weight_decay: float | None = None
    grad_clip: float | None = None         # 0 disables clipping
    drop_path: float | None = None
    cutout: int | None = None              # side in pixels at 32x32 images (scaled); 0 disables
    auxiliary_weight: float | None = None  # weight of the auxiliary head's loss (darts); 0 removes the head
    label_smoothing: float | None = None
    augment: bool = True
    eval_batch_size: int = 500
    log_every: int = 10
    checkpoint_every: int = 1
    checkpoint_steps: int | None = None    # also checkpoint every N steps (within epochs)
    export: bool = False                   # write the trained network for serving (dnas.export, jax.export)
    progress: bool = True
    precision: str = "float32"             # "bfloat16": convolutions in bfloat16 (as dnas search --precision)
    kernels: str = "auto"                  # dnas.backend kernel policy (as dnas search --kernels)
    nb201_table: str | None = None         # NAS-Bench-201 accuracy CSV: the benchmark's figures for comparison


class TrainState(NamedTuple):
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    key: jax.Array


# ------------------------------------------------------------------------------ inputs

#: Published architectures ``dnas train`` knows by name.
PUBLISHED: dict[str, Genotype] = {"darts-v2": DARTS_V2}


def resolve_genotype(path: str | Path) -> tuple[Genotype, dict]:
    """The genotype at ``path`` (a genotype JSON file, or a search run directory holding
    ``genotype.json``) and that search's ``config.json`` (``{}`` when there is none). A name of
    :data:`PUBLISHED` (``darts-v2``) or a NAS-Bench-201 arch string (``|nor_conv_3x3~0|+...``)
    stands for itself."""
    if not Path(path).exists():
        named = PUBLISHED.get(str(path).lower().replace("_", "-"))
        if named is not None:
            return named, {}
        if str(path).startswith("|"):
            return parse_nb201(str(path)), {}
    path = Path(path)
    search_cfg: dict = {}
    if path.is_dir():
        if not (path / "genotype.json").is_file():
            hint = " (a --seeds run: pick one of its seed-<s>/ directories)" if any(path.glob("seed-*")) else ""
            if (path / "checkpoints").is_dir():
                hint += f" (the search stopped before deriving: `dnas derive {path}` writes it from its checkpoint)"
            raise DatasetError(f"{path} holds no genotype.json{hint}; pass a search run directory or a "
                               "genotype JSON file")
        cfg_path = next((p for p in (path / "config.json", path.parent / "config.json") if p.is_file()), None)
        if cfg_path is not None:
            search_cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        path = path / "genotype.json"
    return load_genotype(path), search_cfg


def space_class(space):
    """The :class:`~dnas.supernet.space_base.SearchSpace` that states a genotype's evaluation
    protocol and builds its network: a built-in space's class by name, or a space object as is."""
    from dnas.supernet.spaces import SPACES
    if not isinstance(space, str):
        return space
    if space not in SPACES:
        raise ValueError(f"{space!r} is not a built-in space ({', '.join(SPACES)}); a user's space is retrained "
                         "from its search run's directory")
    return SPACES[space][0]


def train_space(genotype: Genotype, search_cfg: dict, data):
    """The space ``genotype`` is retrained in: a built-in space's class, or the user's space the
    search ran on, rebuilt from the search run's ``config.json`` (its name or import spec and
    ``space_options``; ``docs/own_model.md``). Its ``network`` builds the stand-alone network:
    a user's :class:`~dnas.supernet.space_base.SearchSpace` its own, an NNX model
    :func:`dnas.fix`'s (:meth:`~dnas.supernet.nnx_space.NNXSpace.network`)."""
    from dnas.supernet.spaces import SPACES, UnknownSpaceError, build_space
    if genotype.space in SPACES:
        return SPACES[genotype.space][0]
    name = search_cfg.get("space")
    if not isinstance(name, str):
        raise ValueError("this genotype's space is the user's model it was searched on: pass the search run's "
                         "directory (its config.json names the space), not a bare genotype file")
    options = {"in_channels": data.image_shape[-1], "num_classes": data.num_classes,
               **(search_cfg.get("space_options") or {})}
    try:
        space = build_space(name, **options)
    except UnknownSpaceError as e:
        raise ValueError(f"the search ran on {name!r}, which cannot be rebuilt by name ({e}). A model passed to "
                         "dnas.search as an object is retrained from Python (dnas.fix(model, genotype)), or "
                         "searched and retrained by import spec ('my_pkg.module:Model')") from None
    if not callable(getattr(space, "network", None)):
        raise ValueError(f"the space {name!r} builds no stand-alone network: give it a network(genotype, **options) "
                         "method (docs/spaces.md)")
    return space


def resolve_protocol(cfg: TrainConfig, space, image_side: int) -> dict:
    """The protocol values of this run: the space's (a built-in name, or a space object)
    defaults for this image size (``Space.train_protocol_for``) overridden by ``cfg``'s set
    fields; a regulariser the space's network does not have is refused."""
    cls = space_class(space)
    space = getattr(cls, "name", space)
    defaults = cls.train_protocol_for(image_side)
    proto = {k: defaults[k] for k in _PROTOCOL_KEYS}
    for k in _PROTOCOL_KEYS:
        v = getattr(cfg, k)
        if v is not None:
            proto[k] = v
    if cfg.cutout is None and proto["cutout"]:
        proto["cutout"] = max(1, round(proto["cutout"] * image_side / 32))
    for k in ("lr", "batch_size"):
        if not proto[k] or proto[k] <= 0:
            raise ValueError(f"{k} must be positive, got {proto[k]}")
    for k in ("weight_decay", "cutout", "auxiliary_weight", "label_smoothing"):
        if proto[k] < 0:
            raise ValueError(f"{k} must be non-negative, got {proto[k]}")
    if not 0.0 <= proto["drop_path"] < 1.0:
        raise ValueError(f"drop path probability must be in [0, 1), got {proto['drop_path']}")
    if proto["auxiliary_weight"] and not cls.has_auxiliary_head:
        raise ValueError(f"the {space} network has no auxiliary head (auxiliary_weight must be 0)")
    if proto["drop_path"] and not cls.has_drop_path:
        raise ValueError(f"the {space} network has no drop path (drop_path must be 0)")
    return proto


# ------------------------------------------------------------------------------ augmentation

def cutout_batch(key: jax.Array, x: jax.Array, size: int) -> jax.Array:
    """Cutout (DeVries & Taylor 2017, as in DARTS's CIFAR pipeline): per image, a ``size`` x
    ``size`` square centred at a uniformly random pixel is set to zero (the channel mean of
    standardised data); the square is clipped at the image border."""
    b, h, w, _ = x.shape
    ky, kx = jax.random.split(key)
    cy = jax.random.randint(ky, (b, 1, 1), 0, h)
    cx = jax.random.randint(kx, (b, 1, 1), 0, w)
    rows, cols = jnp.arange(h)[None, :, None], jnp.arange(w)[None, None, :]
    lo = size // 2
    inside = (rows >= cy - lo) & (rows < cy - lo + size) & (cols >= cx - lo) & (cols < cx - lo + size)
    return jnp.where(inside[..., None], jnp.zeros((), x.dtype), x)


# ------------------------------------------------------------------------------ the trainer

def _cross_entropy(logits, labels, smoothing: float):
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32), smoothing)
    return jnp.mean(optax.softmax_cross_entropy(logits.astype(jnp.float32), targets))


class Trainer:
    """Pure init/step/evaluate functions of one network under one protocol.

    ``step(state, x, y, drop_prob) -> (state, metrics)``: the loss (plus ``auxiliary_weight`` x
    the auxiliary head's loss) on the batch, SGD with the cosine schedule; over
    ``num_devices > 1`` data parallel (``jit`` of ``shard_map``: replicated state, the batch
    split over devices, losses, gradients and BatchNorm moments averaged, as in the search).
    """

    def __init__(self, network: Network, proto: dict, total_steps: int, *, momentum: float = 0.9,
                 lr_min: float = 0.0, num_devices: int = 1, precision: str = "float32", kernels: str = "auto"):
        self.network, self.proto, self.num_devices = network, proto, num_devices
        self.precision, self.compute_dtype = precision, compute_dtype(precision)
        self.kernels = resolve_kernels(kernels)
        self.schedule = optax.cosine_decay_schedule(proto["lr"], max(int(total_steps), 1),
                                                    alpha=lr_min / proto["lr"])
        parts = [optax.clip_by_global_norm(proto["grad_clip"])] if proto["grad_clip"] else []
        # PyTorch's SGD(weight_decay=...): decay added to the (clipped) gradient, then momentum
        self.tx = optax.chain(*parts, optax.add_decayed_weights(proto["weight_decay"]),
                              optax.sgd(self.schedule, momentum=momentum, nesterov=proto["nesterov"]))
        self.parallel = DataParallel(num_devices)
        self.axis_name = self.parallel.axis_name

        def eval_sums(params, stats, x, y):
            logits = network.apply(params, stats, x, Ctx(train=False, compute_dtype=self.compute_dtype,
                                                            kernels=self.kernels)).logits
            ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)
            return jnp.sum(ce), jnp.sum(jnp.argmax(logits, -1) == y)
        self._eval_sums = jax.jit(eval_sums)

    def init(self, key: jax.Array) -> TrainState:
        k_init, k_run = jax.random.split(key)
        params, stats = self.network.init(k_init)
        # the optimizer's state as one program, not a small program per weight group's shape
        return TrainState(jnp.zeros((), jnp.int32), params, stats, jax.jit(self.tx.init)(params), k_run)

    def _mean(self, tree):
        return tree if self.axis_name is None else lax.pmean(tree, self.axis_name)

    def step(self, state: TrainState, x, y, drop_prob):
        ctx = Ctx(train=True, axis_name=self.axis_name, compute_dtype=self.compute_dtype, kernels=self.kernels)
        key = jax.random.fold_in(state.key, state.step)
        drop = DropPath(key, drop_prob) if self.proto["drop_path"] or self.network.stochastic else None
        aux_w, smoothing = self.proto["auxiliary_weight"], self.proto["label_smoothing"]

        def loss_fn(params):
            out = self.network.apply(params, state.batch_stats, x, ctx, drop)
            loss = self._mean(_cross_entropy(out.logits, y, smoothing))
            total = loss
            if aux_w and out.aux_logits is not None:
                total = total + aux_w * self._mean(_cross_entropy(out.aux_logits, y, smoothing))
            return total, (loss, out.logits, out.state)

        (_, (loss, logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        acc = self._mean(accuracy(logits, y))
        metrics = {"train_loss": loss, "train_acc": acc, "lr": self.schedule(state.step),
                   "grad_norm": optax.tree.norm(grads)}
        return TrainState(state.step + 1, params, stats, opt_state, state.key), metrics

    @property
    def mesh(self) -> Mesh:
        return self.parallel.mesh

    def compiled_step(self, donate: bool = True):
        step = self.parallel.map(self.step, ("state", "batch", "batch", "state"), ("state", "state"))
        return jax.jit(step, donate_argnums=(0,) if donate else ())

    def replicate(self, state: TrainState) -> TrainState:
        return self.parallel.replicate(state)

    def shard(self, a):
        return self.parallel.shard(a)

    def evaluate(self, state: TrainState, x: np.ndarray, y: np.ndarray, batch_size: int = 500) -> dict:
        """Loss and accuracy over ``(x, y)`` with BatchNorm's running statistics (one device)."""
        params, stats = jax.device_get((state.params, state.batch_stats))
        loss_sum, correct = 0.0, 0
        for i in range(0, len(y), batch_size):
            l, c = self._eval_sums(params, stats, jnp.asarray(x[i:i + batch_size]), jnp.asarray(y[i:i + batch_size]))
            loss_sum, correct = loss_sum + float(l), correct + int(c)
        return {"test_loss": loss_sum / len(y), "test_acc": correct / len(y)}


# ------------------------------------------------------------------------------ the run

def default_out_dir() -> Path:
    return Path("runs") / ("train-" + _dt.datetime.now().strftime("%Y%m%d-%H%M%S"))


def _network_options(cfg: TrainConfig, space, search_cfg: dict, data, proto: dict) -> dict:
    """The derived network's options: the protocol's size, what the search run fixed
    (``Space.network_options_from_search``), ``--network-option``/``--channels``, ``--cells``,
    the data's classes and channels, and the auxiliary head when the protocol weighs it."""
    cls = space_class(space)
    space = getattr(cls, "name", space)
    opts = dict(cls.train_protocol_for(data.image_shape[0])["network"])
    searched = (search_cfg.get("resolved") or {}).get("space_options") or search_cfg.get("space_options") or {}
    opts.update(cls.network_options_from_search(dict(searched)))
    opts.update(cfg.network_options)
    if cfg.cells is not None:
        if cls.cells_option is None:
            raise ValueError(f"--cells does not apply to retraining a {space} genotype (its network's layout is the "
                             "searched one); use --network-option")
        opts[cls.cells_option] = cfg.cells
    opts.update(num_classes=data.num_classes, in_channels=data.image_shape[-1])
    if cls.has_auxiliary_head:
        opts["auxiliary"] = proto["auxiliary_weight"] > 0
    return opts


#: TrainConfig fields a resumed training may change (its length, and what only shows progress).
RESUMABLE_CHANGES = ("epochs", "max_steps", "progress", "checkpoint_every", "checkpoint_steps", "data_dir", "out",
                     "export")


def config_from_dict(data: dict) -> TrainConfig:
    """A :class:`TrainConfig` from a mapping (a config file, or a training run's own
    ``config.json``, whose ``"resolved"`` facts are skipped), values type-checked."""
    from dnas.options import dataclass_from_dict
    return dataclass_from_dict(TrainConfig, data, ignore=("resolved",))


def saved_config(out) -> TrainConfig:
    """The :class:`TrainConfig` of the training run in ``out``."""
    from dnas.options import load_config_file
    from dnas.rundir import RunDirError
    path = Path(out) / "config.json"
    if not path.is_file():
        raise RunDirError(f"{out}: no config.json, so no dnas train run to resume")
    data = load_config_file(path)
    if "genotype" not in data or "resolved" not in data or "protocol" not in data["resolved"]:
        raise RunDirError(f"{out} is not a dnas train run (its config.json has no protocol)")
    return config_from_dict(data)


class _TrainPrepared(NamedTuple):
    """Everything a training run needs, resolved and checked before anything is written."""

    cfg: TrainConfig
    out: Path
    genotype: Genotype
    data: Any
    proto: dict
    trainer: Trainer
    total: int
    steps_per_epoch: int
    epochs: int
    benchmark: dict | None
    resolved: dict


def prepare_train(cfg: TrainConfig, *, resume: bool = False) -> _TrainPrepared:
    """Stage 1 of :func:`run_train`: check the config, resolve the genotype, the data, the
    protocol and the network, build the :class:`Trainer`. Writes nothing: bad input fails here."""
    if resume:
        if not cfg.out:
            raise ValueError("resume needs the run's directory (out)")
        from dnas.rundir import refuse_changes
        refuse_changes(saved_config(cfg.out), cfg, RESUMABLE_CHANGES, cfg.out)
    if cfg.checkpoint_every < 1 or (cfg.checkpoint_steps is not None and cfg.checkpoint_steps < 1):
        raise ValueError("checkpoint_every and checkpoint_steps must be positive")
    genotype, search_cfg = resolve_genotype(cfg.genotype)
    benchmark = None
    if cfg.nb201_table is not None:
        if genotype.space != "nb201":
            raise ValueError(f"--nb201-table looks up NAS-Bench-201 cells; this genotype is of the "
                             f"{genotype.space!r} space")
        from dnas.nb201_table import NB201Table
        benchmark = NB201Table.load(cfg.nb201_table).lookup(genotype)
    dataset = cfg.dataset if cfg.dataset is not None else search_cfg.get("dataset")
    data_dir = cfg.data_dir if cfg.data_dir is not None else search_cfg.get("data_dir")
    data = load_dataset(dataset, limit_examples=cfg.limit_examples, seed=cfg.seed, data_dir=data_dir)
    space = train_space(genotype, search_cfg, data)
    refuse_precision(space, cfg.precision, space.name)
    proto = resolve_protocol(cfg, space, data.image_shape[0])
    network = space.network(genotype, **_network_options(cfg, space, search_cfg, data, proto))

    if cfg.devices < 1:
        raise ValueError(f"--devices must be positive, got {cfg.devices}")
    bs = int(proto["batch_size"])
    if bs % cfg.devices:
        raise ValueError(f"batch size {bs} is not divisible by {cfg.devices} devices")
    steps_per_epoch = num_batches(len(data.train_y), bs)
    if steps_per_epoch < 1:
        raise ValueError(f"batch size {bs} is larger than the training split ({len(data.train_y)} examples): "
                         "lower --batch-size or raise --limit-examples")
    total = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total = min(total, int(cfg.max_steps))
    epochs = math.ceil(total / steps_per_epoch)

    out = Path(cfg.out) if cfg.out else default_out_dir()
    trainer = Trainer(network, proto, total, momentum=cfg.momentum, lr_min=cfg.lr_min, num_devices=cfg.devices,
                      precision=cfg.precision, kernels=cfg.kernels)
    resolved = dict(out=str(out), space=space.name, genotype_json=genotype_to_json(genotype), network=network.config,
                    protocol=proto, total_steps=total, steps_per_epoch=steps_per_epoch, epochs_run=epochs,
                    dataset_name=data.name, num_train=int(len(data.train_y)), num_test=data.num_test,
                    backend=jax.default_backend(), jax_version=jax.__version__)
    return _TrainPrepared(cfg, out, genotype, data, proto, trainer, total, steps_per_epoch, epochs, benchmark,
                          resolved)


def run_train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False) -> dict:
    """Train the derived architecture ``cfg.genotype`` from scratch; returns the summary
    (also ``summary.json``). ``resume``: continue the run in ``cfg.out`` from its latest good
    checkpoint, ending as if never interrupted; ``overwrite``: replace the run in ``cfg.out``.

    Four stages: :func:`prepare_train` (checks, no disk writes), :func:`_start_train` (claim the
    directory, write the config, restore a checkpoint), :class:`_TrainLoop` (the epochs) and
    :func:`_finish_train` (summary, export, pictures)."""
    t_start = time.perf_counter()
    prep = prepare_train(cfg, resume=resume)
    state, progress, n_params = _start_train(prep, resume=resume, overwrite=overwrite)
    loop = _TrainLoop(prep, state, progress)
    loop.run()
    return _finish_train(prep, loop, n_params, time.perf_counter() - t_start)


def _start_train(prep: _TrainPrepared, *, resume: bool, overwrite: bool):
    """Stage 2: initialise the state, claim the output directory (every input is valid now),
    write ``config.json`` and ``genotype.json``, and on ``resume`` restore the latest good
    checkpoint and cut the logs back to it."""
    from dnas.distributed import to_host
    from dnas.options import config_to_dict
    from dnas.rundir import claim_out, discard_after, restore_latest, truncate_lines, write_json_atomic

    out = prep.out
    state = prep.trainer.init(jax.random.PRNGKey(prep.cfg.seed))
    n_params = count_params({k: v for k, v in state.params.items() if k != "aux"})
    claim_out(out, resume=resume, overwrite=overwrite, command="train")
    write_json_atomic(out / "config.json", {**config_to_dict(dataclasses.replace(prep.cfg, out=str(out))),
                                            "resolved": {**prep.resolved, "params": n_params}})
    save_genotype(prep.genotype, out / "genotype.json")
    progress: dict = {}
    if resume:
        state, progress, ckpt_step = restore_latest(out / "checkpoints", to_host(state),
                                                    layout=prep.trainer.network.layout)
        discard_after(out / "checkpoints", ckpt_step)
        for rel, n in progress.get("lines", {}).items():
            truncate_lines(out / rel, int(n))
    return prep.trainer.replicate(state), progress, n_params


class _TrainLoop:
    """Stage 3: the epochs of SGD, with per-step logs, per-epoch test evaluation, checkpoints
    (every ``checkpoint_every`` epochs / ``checkpoint_steps`` steps, and on SIGTERM/SIGINT before
    :class:`~dnas.run.Preempted` is raised) and a resume that skips the steps already taken."""

    def __init__(self, prep: _TrainPrepared, state, progress: dict):
        self.prep, self.state = prep, state
        self.step = int(progress.get("step", 0))
        self.history: list = list(progress.get("history", []))
        self.start_epoch, self.skip, self.sums, self.n = 0, 0, {}, 0
        if progress:
            self.start_epoch = int(progress["epoch"]) + (1 if progress["epoch_done"] else 0)
            if not progress["epoch_done"]:
                self.skip = self.step - self.start_epoch * prep.steps_per_epoch
                self.sums, self.n = dict(progress["sums"]), int(progress["n"])
        self.log = _MetricsLog(prep.out / "metrics.jsonl")
        self.pending: list = []
        self.compile_s = None

    def drain(self):
        """The pending steps' metrics to the host: checked finite, summed; the last returned."""
        host = jax.device_get(self.pending)
        for s_, m in host:
            check_finite(m, s_, keys=tuple(m), what="training")
            for k, v in m.items():
                self.sums[k] = self.sums.get(k, 0.0) + float(v)
            self.n += 1
        self.pending.clear()
        return host[-1] if host else None

    def checkpoint(self, epoch: int, epoch_done: bool) -> None:
        self.drain()
        save_checkpoint(self.prep.out / "checkpoints", self.state, self.step, what="training",
                        layout=self.prep.trainer.network.layout, progress={
            "epoch": epoch, "epoch_done": epoch_done, "sums": self.sums, "n": self.n, "history": self.history,
            "lines": {"metrics.jsonl": self.log.lines()}})

    def run(self) -> None:
        from dnas.run import Preempted, _StopSignals

        prep, cfg, proto, trainer = self.prep, self.prep.cfg, self.prep.proto, self.prep.trainer
        data, total = prep.data, prep.total
        x_train, y_train = data.train_x, data.train_y.astype(np.int32)
        bs = int(proto["batch_size"])
        step_fn = trainer.compiled_step(donate=True)
        pad, flip = _augment_settings(data)
        aug = jax.jit(augment_batch, static_argnames=("pad", "flip"))
        cut = jax.jit(cutout_batch, static_argnames=("size",))
        k_aug = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 0xA06)
        bar = None
        if cfg.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=total, initial=self.step, desc=f"train {prep.resolved['space']}", unit="step",
                       dynamic_ncols=True)
        try:
            with _StopSignals() as stop:
                for epoch in range(self.start_epoch, prep.epochs):
                    t_epoch = time.perf_counter()
                    drop_prob = jnp.float32(proto["drop_path"] * epoch / max(cfg.epochs, 1))
                    if not (epoch == self.start_epoch and self.skip):
                        self.sums, self.n = {}, 0
                    for i, (xb, yb) in enumerate(epoch_batches(x_train, y_train, bs, seed=cfg.seed, epoch=epoch)):
                        if i < self.skip:
                            continue
                        if self.step >= total:
                            break
                        xb = jnp.asarray(xb)
                        if cfg.augment:
                            ka, kc = jax.random.split(jax.random.fold_in(k_aug, self.step))
                            xb = aug(ka, xb, pad=pad, flip=flip)
                            if proto["cutout"]:
                                xb = cut(kc, xb, size=int(proto["cutout"]))
                        t0 = time.perf_counter()
                        self.state, metrics = step_fn(self.state, trainer.shard(xb), trainer.shard(jnp.asarray(yb)),
                                                      drop_prob)
                        if self.compile_s is None:
                            jax.block_until_ready(metrics)
                            self.compile_s = time.perf_counter() - t0
                            trim_heap()
                        self.step += 1
                        self.pending.append((self.step, metrics))
                        if self.step % cfg.log_every == 0 or self.step == total:
                            s_, m = self.drain()
                            self.log.write({"kind": "step", "step": s_, "epoch": epoch,
                                            **{k: float(v) for k, v in m.items()}})
                            if bar is not None:
                                bar.set_postfix(loss=f"{float(m['train_loss']):.3f}")
                        if bar is not None:
                            bar.update(1)
                        last_of_epoch = i + 1 == prep.steps_per_epoch or self.step >= total
                        if stop.signum is not None and not last_of_epoch:
                            self.checkpoint(epoch, False)
                            raise Preempted(self.step, prep.out, stop.signum, "train")
                        if cfg.checkpoint_steps and self.step % cfg.checkpoint_steps == 0 and not last_of_epoch:
                            self.checkpoint(epoch, False)
                    self.skip = 0
                    self.drain()
                    record = {"kind": "epoch", "step": self.step, "epoch": epoch,
                              **{k: v / max(self.n, 1) for k, v in self.sums.items()},
                              "drop_path": float(drop_prob), "epoch_time_s": time.perf_counter() - t_epoch}
                    if data.test_x is not None:
                        record.update(trainer.evaluate(self.state, data.test_x, data.test_y.astype(np.int32),
                                                       cfg.eval_batch_size))
                    self.log.write(record)
                    self.history.append(record)
                    if bar is not None and "test_acc" in record:
                        bar.set_postfix(loss=f"{record['train_loss']:.3f}", test_acc=f"{record['test_acc']:.3f}")
                    if ((epoch + 1) % cfg.checkpoint_every == 0 or self.step >= total or stop.signum is not None
                            or (cfg.checkpoint_steps and self.step % cfg.checkpoint_steps == 0)):
                        self.checkpoint(epoch, True)
                    if stop.signum is not None and self.step < total:
                        raise Preempted(self.step, prep.out, stop.signum, "train")
        finally:
            if bar is not None:
                bar.close()
            self.log.close()


def _finish_train(prep: _TrainPrepared, loop: _TrainLoop, n_params: int, wall: float) -> dict:
    """Stage 4: ``summary.json`` (final and best test accuracy, the NB201 lookup), the export,
    the pictures."""
    from dnas.rundir import write_json_atomic

    history, out = loop.history, prep.out
    final = history[-1] if history else {}
    tests = [r["test_acc"] for r in history if "test_acc" in r]
    summary = {"out": str(out), "space": prep.resolved["space"], "genotype": genotype_to_json(prep.genotype),
               "params": n_params, "steps": loop.step, "epochs": prep.epochs, "final": final,
               "final_test_acc": final.get("test_acc"), "best_test_acc": max(tests) if tests else None,
               "wall_time_s": wall, "compile_s": loop.compile_s}
    if prep.benchmark is not None:
        summary["nb201"] = prep.benchmark
    if prep.cfg.export:
        from dnas.export import export_network
        summary["export"] = export_network(prep.trainer, loop.state, prep.data.image_shape, out, prep.data)
    write_json_atomic(out / "summary.json", summary)
    _plots(out, prep.genotype, history)
    return summary


def _plots(out: Path, genotype, history: list) -> None:
    from dnas.run import save_picture
    from dnas.supernet.plot import plot_genotype

    save_picture(out / "genotype.png", lambda p: plot_genotype(genotype, p))
    save_picture(out / "training.png", lambda p: _plot_history(history, p))


def _plot_history(history: list, path: Path):
    if not history:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=110)
    ep = [r["epoch"] + 1 for r in history]
    ax_l.plot(ep, [r["train_loss"] for r in history], label="train")
    ax_a.plot(ep, [r["train_acc"] for r in history], label="train")
    if "test_acc" in history[0]:
        ax_l.plot(ep, [r["test_loss"] for r in history], label="test")
        ax_a.plot(ep, [r["test_acc"] for r in history], label="test")
    ax_l.set(xlabel="epoch", ylabel="loss")
    ax_a.set(xlabel="epoch", ylabel="accuracy")
    for ax in (ax_l, ax_a):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def restore_train_state(ckpt_dir, template: TrainState, step: int | None = None,
                        layout: str | None = None) -> TrainState:
    """Restore a :class:`TrainState` written by :func:`run_train` (latest step by default);
    ``layout``: the trained network's ``Network.layout``, which the checkpoint must record."""
    return restore_checkpoint(ckpt_dir, template, step, layout=layout)


__all__ = ["TrainConfig", "TrainState", "Trainer", "run_train", "resolve_genotype", "cutout_batch",
           "restore_train_state", "config_from_dict", "saved_config"]
