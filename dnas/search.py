"""The bilevel search step and loop (DARTS, Liu et al., ICLR 2019, Algorithm 1).

The whole search state is one explicit pytree, :class:`SearchState`; one search step is one
pure function ``step(state, train_batch, val_batch) -> (state, metrics)``:

1. the architecture step: ``α ← α - ξ_α ∇_α L_val(w, α)`` on a batch of the architecture
   half of the training split (first order: ``w`` is treated as a constant, DARTS eq. 6 with
   ξ = 0), with Adam(3e-4, β=(0.5, 0.999)) and L2 weight decay 1e-3;
2. the weight step: ``w ← w - ξ_w ∇_w L_train(w, α)`` on a batch of the weight half with
   the updated α, by SGD (momentum 0.9, cosine learning rate 0.025 → 0.001, weight decay
   3e-4, gradient-norm clip 5).

How α becomes the mixed ops' weights is the relaxation's business (:mod:`dnas.relaxations`).
With ``num_devices > 1`` the step runs data parallel (``jit`` of ``shard_map``, the form
``jax.pmap`` itself is built on since JAX 0.8): every device holds the same replicated state
and PRNG key, takes its shard of the global batch, BatchNorm statistics are synchronised over
devices and the losses are averaged with ``lax.pmean`` (so their gradients are the global-batch
gradients) before the identical optimizer updates, so α and the weights are the same on every
device and equal the single-device step on the global batch up to float reassociation. The replicated state is a set of global arrays: read
it (``device_get``, checkpointing) as if it lived on one device.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dnas.relaxations import Relaxation, entropy, get_relaxation
from dnas.supernet.layers import Ctx
from dnas.supernet.spaces import SearchSpace, build_space

AXIS = "devices"


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; raised before anything of that step is saved."""


class SearchState(NamedTuple):
    step: jax.Array          # int32 scalar: number of completed search steps
    params: Any              # supernet weights
    batch_stats: Any         # BatchNorm running statistics
    arch: Any                # architecture parameters (the relaxation's pytree)
    w_opt_state: Any         # weight optimizer state
    a_opt_state: Any         # architecture optimizer state
    key: jax.Array           # PRNG key (identical on every device)


@dataclasses.dataclass(frozen=True)
class Hyper:
    """Optimisation hyperparameters; the defaults are DARTS's CIFAR-10 search settings."""

    w_lr: float = 0.025
    w_lr_min: float = 0.001
    w_momentum: float = 0.9
    w_weight_decay: float = 3e-4
    w_grad_clip: float = 5.0
    a_lr: float = 3e-4
    a_beta1: float = 0.5
    a_beta2: float = 0.999
    a_weight_decay: float = 1e-3


def weight_optimizer(h: Hyper, total_steps: int) -> tuple[optax.GradientTransformation, Callable]:
    """SGD with momentum, L2 weight decay, global-norm clipping and a cosine schedule.

    The order matches DARTS's PyTorch code: the gradient is clipped first, then the decay
    term ``wd·w`` is added (``torch.optim.SGD(weight_decay=...)``), then momentum.
    """
    schedule = optax.cosine_decay_schedule(h.w_lr, max(int(total_steps), 1), alpha=h.w_lr_min / h.w_lr)
    tx = optax.chain(optax.clip_by_global_norm(h.w_grad_clip),
                     optax.add_decayed_weights(h.w_weight_decay),
                     optax.sgd(schedule, momentum=h.w_momentum))
    return tx, schedule


def arch_optimizer(h: Hyper) -> optax.GradientTransformation:
    """Adam on α with L2 decay added to the gradient (``torch.optim.Adam(weight_decay=...)``)."""
    return optax.chain(optax.add_decayed_weights(h.a_weight_decay),
                       optax.adam(h.a_lr, b1=h.a_beta1, b2=h.a_beta2))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels))


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))


class Searcher:
    """Binds a space, a relaxation and hyperparameters into pure init/step functions.

    ``init(key) -> SearchState`` and ``step(state, (x_t, y_t), (x_v, y_v)) -> (state, metrics)``
    are pure; :meth:`compiled_step` returns the jitted step (data parallel over N devices).
    """

    def __init__(self, space: SearchSpace, relaxation: Relaxation, hyper: Hyper = Hyper(),
                 total_steps: int = 1, num_devices: int = 1):
        self.space, self.relax, self.hyper = space, relaxation, hyper
        self.total_steps = max(int(total_steps), 1)
        self.num_devices = int(num_devices)
        self.w_tx, self.lr_schedule = weight_optimizer(hyper, self.total_steps)
        self.a_tx = arch_optimizer(hyper)
        self.axis_name = AXIS if self.num_devices > 1 else None
        self._mesh: Mesh | None = None

    # ------------------------------------------------------------------ state
    def init(self, key: jax.Array) -> SearchState:
        k_w, k_a, k_run = jax.random.split(key, 3)
        params, stats = self.space.init(k_w)
        arch = self.relax.init(k_a, self.space.groups)
        return SearchState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats, arch=arch,
                           w_opt_state=self.w_tx.init(params), a_opt_state=self.a_tx.init(arch), key=k_run)

    # ------------------------------------------------------------------ losses
    def _forward(self, params, stats, arch, x, key, progress, train: bool = True):
        samples = self.relax.sample(arch, key, progress)
        ctx = Ctx(train=train, axis_name=self.axis_name)
        return self.space.apply(params, stats, x, samples, self.relax.mix, ctx)

    def val_loss(self, arch, params, stats, batch, key, progress):
        """``L_val(w, α)`` plus the relaxation's penalty; differentiated w.r.t. ``arch``."""
        x, y = batch
        logits, _ = self._forward(params, stats, arch, x, key, progress)
        return self._mean(cross_entropy(logits, y)) + self.relax.arch_penalty(arch, progress), logits

    def train_loss(self, params, arch, stats, batch, key, progress):
        """``L_train(w, α)``; differentiated w.r.t. ``params``; also returns new BN stats."""
        x, y = batch
        logits, new_stats = self._forward(params, stats, arch, x, key, progress)
        return self._mean(cross_entropy(logits, y)), (logits, new_stats)

    def _mean(self, tree):
        """Average over the devices of the data-parallel axis (identity on one device).

        The losses are averaged *before* differentiation: the loss is then the mean over the
        global batch, and ``shard_map``'s autodiff (which sums the cotangents of replicated
        inputs over devices) returns exactly its gradient, already identical on every device.
        """
        return tree if self.axis_name is None else lax.pmean(tree, self.axis_name)

    # ------------------------------------------------------------------ step
    def arch_grad(self, state: SearchState, train_batch, val_batch, key, progress):
        """∇_α of the architecture objective: first order (w held fixed).

        Returns ``(grad, (val_loss, val_logits))``; second-order and implicit hypergradients
        replace this method.
        """
        (loss, logits), g = jax.value_and_grad(self.val_loss, has_aux=True)(
            state.arch, state.params, state.batch_stats, val_batch, key, progress)
        return g, (loss, logits)

    def step(self, state: SearchState, train_batch, val_batch):
        progress = jnp.minimum(state.step.astype(jnp.float32) / self.total_steps, 1.0)
        key, k_arch, k_w = jax.random.split(state.key, 3)

        g_arch, (v_loss, v_logits) = self.arch_grad(state, train_batch, val_batch, k_arch, progress)
        a_upd, a_opt = self.a_tx.update(g_arch, state.a_opt_state, state.arch)
        arch = optax.apply_updates(state.arch, a_upd)

        (t_loss, (t_logits, stats)), g_w = jax.value_and_grad(self.train_loss, has_aux=True)(
            state.params, arch, state.batch_stats, train_batch, k_w, progress)
        w_upd, w_opt = self.w_tx.update(g_w, state.w_opt_state, state.params)
        params = optax.apply_updates(state.params, w_upd)

        metrics = {
            "train_loss": t_loss, "train_acc": self._mean(accuracy(t_logits, train_batch[1])),
            "val_loss": v_loss, "val_acc": self._mean(accuracy(v_logits, val_batch[1])),
            "lr": self.lr_schedule(state.step),
            "entropy": entropy(self.relax.probs(arch)),
            "w_grad_norm": optax.tree.norm(g_w), "a_grad_norm": optax.tree.norm(g_arch),
        }
        new = SearchState(step=state.step + 1, params=params, batch_stats=stats, arch=arch,
                          w_opt_state=w_opt, a_opt_state=a_opt, key=key)
        return new, metrics

    @property
    def mesh(self) -> Mesh:
        """A 1-D device mesh over the first ``num_devices`` devices (axis :data:`AXIS`)."""
        if self._mesh is None:
            devices = jax.devices()
            if self.num_devices > len(devices):
                raise ValueError(f"{self.num_devices} devices requested but JAX sees {len(devices)} "
                                 f"({jax.default_backend()}); on a CPU set "
                                 f"XLA_FLAGS=--xla_force_host_platform_device_count={self.num_devices}")
            self._mesh = Mesh(np.asarray(devices[: self.num_devices]), (AXIS,))
        return self._mesh

    def compiled_step(self, donate: bool = True):
        """The jitted step; over ``num_devices > 1`` it is ``jit(shard_map(step))``: the state
        is replicated on every device of :attr:`mesh`, the batch is split along its leading
        axis, and the per-device step averages losses and BN moments with ``lax.pmean``
        (what ``jax.pmap`` does, in the sharded-jit form JAX now builds pmap on, which also
        spans processes under ``jax.distributed``)."""
        donate_argnums = (0,) if donate else ()
        if self.num_devices == 1:
            return jax.jit(self.step, donate_argnums=donate_argnums)
        rep, split = P(), P(AXIS)
        step = jax.shard_map(self.step, mesh=self.mesh, in_specs=(rep, split, split), out_specs=(rep, rep))
        return jax.jit(step, donate_argnums=donate_argnums)

    # ------------------------------------------------------------------ device placement
    def replicate(self, state: SearchState) -> SearchState:
        """Place a copy of ``state`` on every device of the mesh (a no-op on one device)."""
        if self.num_devices == 1:
            return state
        return jax.device_put(state, NamedSharding(self.mesh, P()))

    def shard(self, batch):
        """Split a global batch ``(x, y)`` over the devices along its leading axis."""
        if self.num_devices == 1:
            return batch
        n = self.num_devices
        for a in jax.tree_util.tree_leaves(batch):
            if a.shape[0] % n:
                raise ValueError(f"global batch {a.shape[0]} is not divisible by {n} devices")
        return jax.device_put(batch, NamedSharding(self.mesh, P(AXIS)))

    def probs(self, state: SearchState) -> dict:
        return jax.device_get(self.relax.probs(state.arch))

    def derive(self, state: SearchState):
        return self.space.derive(jax.device_get(self.relax.derive_scores(state.arch)))


def check_finite(metrics: dict, step: int) -> None:
    """Raise :class:`NonFiniteLossError` naming the step if a loss is NaN/inf."""
    for k in ("train_loss", "val_loss"):
        v = float(metrics[k])
        if not math.isfinite(v):
            raise NonFiniteLossError(
                f"{k} is {v} at step {step}: the search diverged (try a lower learning rate "
                "or check the data); no checkpoint was written for this step")


def make_searcher(space: str, relaxation: str = "darts", *, space_options: dict | None = None,
                  relaxation_options: dict | None = None, hyper: Hyper = Hyper(),
                  total_steps: int = 1, num_devices: int = 1) -> Searcher:
    space_options = dict(space_options or {})
    built = build_space(space, **space_options)
    relax = get_relaxation(relaxation, space=built, **(relaxation_options or {}))
    if relax.partial_channels != 1:  # the space's candidate ops see 1/K of the channels
        built = build_space(space, **{**space_options, "partial_channels": relax.partial_channels})
    return Searcher(built, relax, hyper, total_steps, num_devices)
