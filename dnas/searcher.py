"""The bilevel search step and loop (DARTS, Liu et al., ICLR 2019, Algorithm 1).

The whole search state is one explicit pytree, :class:`SearchState`; one search step is one
pure function ``step(state, train_batch, val_batch) -> (state, metrics)``:

1. the outer step: the hypergradient of ``L_val(w*(φ), φ)`` on a batch of the architecture
   half of the training split, for the outer variables ``φ`` = α and the tuned
   hyperparameters, by the chosen estimator of :mod:`dnas.hypergrad` (default ``first``:
   ``w`` treated as a constant, DARTS eq. 6 with ξ = 0); α then takes an Adam(3e-4,
   β=(0.5, 0.999)) step with L2 weight decay 1e-3, tuned hyperparameters (log learning rate,
   log weight decay) an Adam step of their own (``hyper_lr``);
2. the weight step: ``w ← w - ξ_w ∇_w L_train(w, α)`` on a batch of the weight half with
   the updated α, by SGD (momentum 0.9, cosine learning rate 0.025 → 0.001, weight decay
   3e-4, gradient-norm clip 5). A tuned learning rate is the base of the cosine schedule.

How α becomes the mixed ops' weights is the relaxation's business (:mod:`dnas.relaxations`).
With ``num_devices > 1`` the step runs data parallel (``jit`` of ``shard_map``, the form
``jax.pmap`` itself is built on since JAX 0.8): every device holds the same replicated state
and PRNG key, takes its shard of the global batch, BatchNorm statistics are synchronised over
devices and the losses are averaged with ``lax.pmean`` (so their gradients are the global-batch
gradients) before the identical optimizer updates, so α and the weights are the same on every
device and equal the single-device step on the global batch up to float reassociation. The replicated state is a set of global arrays: read
it (``device_get``, checkpointing) as if it lived on one device.

With ``num_seeds = S > 1`` the searcher runs S independent searches in one program
(``dnas search --seeds``): the state and the batches gain a leading member axis and the step is
``jax.vmap(step)`` (inside the data-parallel ``shard_map`` when there are several devices).
Every member has its own initialisation, PRNG stream, data order and α; nothing is shared, so
member i computes what a search with seed i computes alone (up to float reassociation of the
batched convolutions). On the CPU the members' convolutions run one after another
(:func:`dnas.kernels.cpu.branch_conv.member_conv`) rather than as JAX's batched form, a grouped
convolution that makes a whole step on XLA:CPU much slower (``docs/benchmarks.md``); estimators that differentiate twice
(all but :data:`dnas.hypergrad.FIRST_DERIVATIVES_ONLY`) keep JAX's form. Sampling
relaxations (GDAS, ProxylessNAS) lose their "only the sampled op" saving under ``vmap``:
``lax.switch`` with a per-member index evaluates every branch.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import Mesh

from dnas.backend import resolve as resolve_kernels
from dnas.parallel import AXIS, DataParallel, device_mesh  # noqa: F401 (AXIS, device_mesh re-exported)
from dnas.hypergrad import FIRST_DERIVATIVES_ONLY, Bilevel, check_tunable, get_hypergrad
from dnas.relaxations import Relaxation, entropy, get_relaxation, partial_channels
from dnas.remedies import (apply_to_relaxation, get_remedies, perturb_samples, remedy_metrics,
                           weight_step_perturbation)
from dnas.supernet.context import Ctx, stack_trees
from dnas.supernet.space_base import refuse_precision
from dnas.supernet.spaces import SPACES, SearchSpace, build_space, space_label, takes_option


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; raised before anything of that step is saved."""


# ``--precision``: the convolutions' compute dtype (``Ctx.compute_dtype``); None = float32 throughout.
PRECISIONS = {"float32": None, "bfloat16": jnp.bfloat16}


def compute_dtype(precision: str):
    """The ``Ctx.compute_dtype`` of a ``--precision`` name; an unknown name is a ValueError."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


class SearchState(NamedTuple):
    step: jax.Array          # int32 scalar: number of completed search steps
    params: Any              # supernet weights
    batch_stats: Any         # BatchNorm running statistics
    arch: Any                # architecture parameters (the relaxation's pytree)
    w_opt_state: Any         # weight optimizer state
    a_opt_state: Any         # architecture optimizer state
    key: jax.Array           # PRNG key (identical on every device)
    hyper: Any = None        # {"log_lr", "log_wd"}: the weight optimizer's base lr and decay
    h_opt_state: Any = None  # optimizer state of the tuned hyperparameters


@dataclasses.dataclass(frozen=True)
class Hyper:
    """Optimisation hyperparameters; the defaults are DARTS's CIFAR-10 search settings."""

    w_lr: float = 0.025
    w_lr_min: float = 0.001
    w_momentum: float = 0.9
    w_nesterov: bool = False      # NAS-Bench-201's search protocol uses Nesterov momentum
    w_weight_decay: float = 3e-4
    w_grad_clip: float = 5.0
    a_lr: float = 3e-4
    a_beta1: float = 0.5
    a_beta2: float = 0.999
    a_weight_decay: float = 1e-3
    hyper_lr: float = 1e-2        # Adam step size of tuned log-hyperparameters


def weight_optimizer(h: Hyper, total_steps: int) -> tuple[optax.GradientTransformation, Callable]:
    """SGD with momentum (Nesterov's with ``h.w_nesterov``), L2 weight decay, global-norm
    clipping and a cosine schedule.

    The order matches DARTS's PyTorch code: the gradient is clipped first, then the decay
    term ``wd·w`` is added (``torch.optim.SGD(weight_decay=...)``), then momentum. The
    learning rate and weight decay are injected hyperparameters (``optax.inject_hyperparams``):
    the search sets them in the optimizer state every step, as traced values, so they can be
    outer variables of the bilevel problem. ``tx.update`` alone uses ``w_lr`` (constant).
    """
    schedule = optax.cosine_decay_schedule(h.w_lr, max(int(total_steps), 1), alpha=h.w_lr_min / h.w_lr)

    def make(learning_rate, weight_decay):
        return optax.chain(optax.clip_by_global_norm(h.w_grad_clip), optax.add_decayed_weights(weight_decay),
                           optax.sgd(learning_rate, momentum=h.w_momentum, nesterov=h.w_nesterov))
    tx = optax.inject_hyperparams(make)(learning_rate=h.w_lr, weight_decay=h.w_weight_decay)
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
                 total_steps: int = 1, num_devices: int = 1, hypergrad: str = "first",
                 hypergrad_options: dict | None = None, tune: tuple[str, ...] = (), latency=None,
                 num_seeds: int = 1, precision: str = "float32", remedies=(), kernels=None):
        # anti-collapse remedies (dnas.remedies): wrappers of the relaxation, a weight-step perturbation
        self.remedies = tuple(remedies)
        self.base_relax = relaxation   # without the remedies' wrappers (dnas.select evaluates with it)
        relaxation = apply_to_relaxation(relaxation, self.remedies)
        self.perturbation = weight_step_perturbation(self.remedies)
        self.space, self.relax, self.hyper = space, relaxation, hyper
        self.precision, self.compute_dtype = precision, compute_dtype(precision)
        self.latency = latency  # a dnas.latency.objective.LatencyObjective, or None
        self.total_steps = max(int(total_steps), 1)
        self.num_devices = int(num_devices)
        self.hypergrad_name = hypergrad
        self.estimate = get_hypergrad(hypergrad, **(hypergrad_options or {}))
        self.tune = tuple(sorted(set(tune)))
        check_tunable(hypergrad, self.tune)
        if "wd" in self.tune and hyper.w_weight_decay <= 0:
            raise ValueError("--tune wd needs a positive initial weight decay (it is learnt in log space)")
        self.w_tx, self.lr_schedule = weight_optimizer(hyper, self.total_steps)
        self.a_tx = arch_optimizer(hyper)
        self.h_tx = optax.adam(hyper.hyper_lr)
        self.num_seeds = int(num_seeds)
        if self.num_seeds < 1:
            raise ValueError(f"num_seeds must be positive, got {num_seeds}")
        # the batch's examples follow the seeds' axis when seeds are vmapped
        self.parallel = DataParallel(self.num_devices, batch_axis=int(self.num_seeds > 1))
        self.axis_name = self.parallel.axis_name
        # the kernel policy (dnas.backend) of every forward pass: ``kernels``, else the space's as built
        self.kernels = resolve_kernels(kernels if kernels is not None else getattr(space, "kernels", None))
        # per-member convolutions under vmap on XLA:CPU (see the module docstring and Ctx.members)
        self.member_convs = (self.num_seeds > 1 and self.kernels.branch_convs
                             and hypergrad in FIRST_DERIVATIVES_ONLY)

    # ------------------------------------------------------------------ state
    def init(self, key: jax.Array) -> SearchState:
        k_w, k_a, k_run = jax.random.split(key, 3)
        params, stats = self.space.init(k_w)
        arch = self.relax.init(k_a, self.space.groups)
        hyper = {"log_lr": jnp.log(jnp.float32(self.hyper.w_lr)),
                 "log_wd": jnp.log(jnp.float32(max(self.hyper.w_weight_decay, 1e-30)))}
        w_opt, a_opt, h_opt = self._optimizer_states(params, arch, hyper)
        return SearchState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats, arch=arch,
                           w_opt_state=w_opt, a_opt_state=a_opt, key=k_run, hyper=hyper, h_opt_state=h_opt)

    @functools.cached_property
    def _optimizer_states(self):
        """The three optimizers' initial states as one jitted program: run op by op, each
        state leaf (a momentum buffer per weight group, ...) would be a small program compiled
        for its shape of its own."""
        return jax.jit(lambda params, arch, hyper: (self.w_tx.init(params), self.a_tx.init(arch),
                                                    self.h_tx.init(hyper)))

    def init_members(self, seeds) -> SearchState:
        """One initial state per seed, stacked along a leading member axis: member ``i`` is
        ``init(PRNGKey(seeds[i]))``, computed alone and stacked on the host. (``jax.vmap`` of
        ``init`` would build the model under a trace, which Flax NNX does in time quadratic in
        its number of layers: ``docs/benchmarks.md``, "A space builds with few compiles".)"""
        if len(seeds) != self.num_seeds:
            raise ValueError(f"{len(seeds)} seeds given to a searcher built for {self.num_seeds}")
        return stack_trees([self.init(jax.random.PRNGKey(int(s))) for s in seeds])

    @staticmethod
    def member(state, i: int):
        """Member ``i`` of a stacked pytree (a state, metrics) from :meth:`init_members`."""
        return jax.tree_util.tree_map(lambda a: a[i], state)

    # ------------------------------------------------------------------ hyperparameters
    def hparams(self, tuned: dict, step) -> tuple[jax.Array, jax.Array]:
        """The weight optimizer's learning rate at ``step`` and its weight decay.

        ``tuned`` holds the log values of the tuned hyperparameters (outer variables); an
        untuned one keeps its configured value (the learning rate its cosine schedule). A tuned
        learning rate is the base of the same cosine schedule: ``exp(log_lr)·s(t)/s(0)``.
        """
        lr = self.lr_schedule(step)
        if "log_lr" in tuned:
            lr = jnp.exp(tuned["log_lr"]) * (lr / self.hyper.w_lr)
        wd = jnp.exp(tuned["log_wd"]) if "log_wd" in tuned else jnp.float32(self.hyper.w_weight_decay)
        return lr, wd

    def _tuned(self, hyper: dict) -> dict:
        return {f"log_{k}": hyper[f"log_{k}"] for k in self.tune}

    def weight_update(self, grads, params, opt_state, tuned: dict, step):
        """One weight-optimizer step with the learning rate and decay of :meth:`hparams`."""
        lr, wd = self.hparams(tuned, step)
        hp = dict(opt_state.hyperparams, learning_rate=jnp.asarray(lr, jnp.float32),
                  weight_decay=jnp.asarray(wd, jnp.float32))
        upd, opt_state = self.w_tx.update(grads, opt_state._replace(hyperparams=hp), params)
        return optax.apply_updates(params, upd), opt_state

    # ------------------------------------------------------------------ losses
    def _forward(self, params, stats, arch, x, key, progress, train: bool = True, delta=None):
        samples = self.relax.sample(arch, key, progress)
        if delta is not None:  # SDARTS: the weight step under perturbed mixing weights (dnas.remedies)
            samples = perturb_samples(samples, delta)
        ctx = Ctx(train=train, axis_name=self.axis_name, members=self.member_convs,
                  custom_vjp=self.hypergrad_name in FIRST_DERIVATIVES_ONLY,
                  compute_dtype=self.compute_dtype, kernels=self.kernels)
        return self.space.apply(params, stats, x, samples, self.relax.mix, ctx)

    def val_loss(self, arch, params, stats, batch, key, progress):
        """``L_val(w, α)`` plus the relaxation's penalty; differentiated w.r.t. ``arch``. With a
        latency objective the cross-entropy becomes its latency loss (``dnas.latency``)."""
        x, y = batch
        logits, _ = self._forward(params, stats, arch, x, key, progress)
        loss = self._mean(cross_entropy(logits, y))
        if self.latency is not None:
            loss = self.latency.loss(loss, self.relax.derive_scores(arch))
        return loss + self.relax.arch_penalty(arch, progress), logits

    def train_loss(self, params, arch, stats, batch, key, progress, delta=None):
        """``L_train(w, α)``; differentiated w.r.t. ``params``; also returns new BN stats.
        ``delta``: a perturbation of the relaxation's samples (SDARTS, :mod:`dnas.remedies`)."""
        x, y = batch
        logits, new_stats = self._forward(params, stats, arch, x, key, progress, delta=delta)
        return self._mean(cross_entropy(logits, y)), (logits, new_stats)

    def _mean(self, tree):
        """Average over the devices of the data-parallel axis (identity on one device).

        The losses are averaged *before* differentiation: the loss is then the mean over the
        global batch, and ``shard_map``'s autodiff (which sums the cotangents of replicated
        inputs over devices) returns exactly its gradient, already identical on every device.
        """
        return tree if self.axis_name is None else lax.pmean(tree, self.axis_name)

    # ------------------------------------------------------------------ step
    def bilevel(self, state: SearchState, train_batch, val_batch, k_train, k_val, progress) -> Bilevel:
        """The bilevel problem at the current weights, over the outer variables
        ``{"arch": α, "hyper": tuned log-hyperparameters}`` (see :mod:`dnas.hypergrad`)."""
        stats, step = state.batch_stats, state.step
        return Bilevel(
            train_loss=lambda w, o: self.train_loss(w, o["arch"], stats, train_batch, k_train, progress),
            val_loss=lambda w, o: self.val_loss(o["arch"], w, stats, val_batch, k_val, progress),
            update=lambda g, w, s, o: self.weight_update(g, w, s, o["hyper"], step),
            weight_decay=lambda o: self.hparams(o["hyper"], step)[1])

    def outer_grad(self, state: SearchState, train_batch, val_batch, k_train, k_val, progress):
        """The hypergradient w.r.t. ``{"arch", "hyper"}`` by the chosen estimator; returns
        ``(grad, (val_loss, val_logits))``."""
        problem = self.bilevel(state, train_batch, val_batch, k_train, k_val, progress)
        outer = {"arch": state.arch, "hyper": self._tuned(state.hyper)}
        return self.estimate(problem, state.params, state.w_opt_state, outer)

    def step(self, state: SearchState, train_batch, val_batch):
        progress = jnp.minimum(state.step.astype(jnp.float32) / self.total_steps, 1.0)
        key, k_arch, k_w = jax.random.split(state.key, 3)

        g, (v_loss, v_logits) = self.outer_grad(state, train_batch, val_batch, k_w, k_arch, progress)
        a_upd, a_opt = self.a_tx.update(g["arch"], state.a_opt_state, state.arch)
        arch = optax.apply_updates(state.arch, a_upd)
        g_hyper = {k: g["hyper"].get(k, jnp.zeros_like(v)) for k, v in state.hyper.items()}
        h_upd, h_opt = self.h_tx.update(g_hyper, state.h_opt_state, state.hyper)
        hyper = optax.apply_updates(state.hyper, h_upd)

        delta = self.weight_step_delta(state.params, arch, state.batch_stats, train_batch, k_w, progress)
        (t_loss, (t_logits, stats)), g_w = jax.value_and_grad(self.train_loss, has_aux=True)(
            state.params, arch, state.batch_stats, train_batch, k_w, progress, delta)
        params, w_opt = self.weight_update(g_w, state.params, state.w_opt_state, self._tuned(hyper), state.step)
        lr, wd = self.hparams(self._tuned(hyper), state.step)

        metrics = {
            "train_loss": t_loss, "train_acc": self._mean(accuracy(t_logits, train_batch[1])),
            "val_loss": v_loss, "val_acc": self._mean(accuracy(v_logits, val_batch[1])),
            "lr": lr, "weight_decay": wd,
            "entropy": entropy(self.relax.probs(arch)),
            "w_grad_norm": optax.tree.norm(g_w), "a_grad_norm": optax.tree.norm(g["arch"]),
        }
        metrics.update({f"hypergrad_{k[4:]}": v for k, v in g["hyper"].items()})
        if self.latency is not None:
            metrics["expected_latency_ms"] = self.latency.expected(self.relax.derive_scores(arch))
        metrics.update(remedy_metrics(self.remedies, progress))
        new = SearchState(step=state.step + 1, params=params, batch_stats=stats, arch=arch,
                          w_opt_state=w_opt, a_opt_state=a_opt, key=key, hyper=hyper, h_opt_state=h_opt)
        return new, metrics

    def weight_step_delta(self, params, arch, stats, batch, key, progress):
        """The perturbation of the weight step's samples (SDARTS, :mod:`dnas.remedies`), or None.
        Drawn from a key derived from the weight step's (replicated over devices, its own per
        member); an adversarial one ascends the global batch's loss, so every device finds the
        same perturbation. The weight gradient does not flow through it."""
        if self.perturbation is None:
            return None
        samples = self.relax.sample(arch, key, progress)

        def loss(delta):
            return self.train_loss(params, arch, stats, batch, key, progress, delta)[0]
        delta = self.perturbation(loss, samples, jax.random.fold_in(key, 0x5DA7), progress)
        return jax.lax.stop_gradient(delta)

    # ------------------------------------------------------------------ curvature (RobustDARTS)
    def arch_hessian_extremes(self, state: SearchState, val_batch, iters: int = 20):
        """``(λ_max, λ_min)`` of ``∇²_α L_val(w, α)`` at the state's weights and α on
        ``val_batch`` (Zela et al., ICLR 2020: a rising λ_max announces DARTS's collapse),
        matrix-free by Lanczos on Hessian-vector products (:mod:`dnas.hessian`). The loss is
        the architecture step's (:meth:`val_loss`, BatchNorm on batch statistics) with the
        relaxation's samples fixed by a key derived from the state; under data parallelism it
        is the global batch's mean, so every device computes the same values."""
        from dnas.hessian import hessian_extremes
        progress = jnp.minimum(state.step.astype(jnp.float32) / self.total_steps, 1.0)
        k_sample, k_start = jax.random.split(jax.random.fold_in(state.key, 0x4E55))

        def loss(arch):
            return self.val_loss(arch, state.params, state.batch_stats, val_batch, k_sample, progress)[0]
        return hessian_extremes(loss, state.arch, k_start, iters)

    def hessian_function(self, iters: int = 20):
        """:meth:`arch_hessian_extremes` over every member and device, jitted (as
        :meth:`step_function`: vmapped over seeds, ``shard_map`` over the devices)."""
        fn = functools.partial(self.arch_hessian_extremes, iters=iters)
        if self.num_seeds > 1:
            fn = jax.vmap(fn)
        return jax.jit(self.parallel.map(fn, ("state", "batch"), "state"))

    @property
    def mesh(self) -> Mesh:
        """The 1-D device mesh (axis :data:`AXIS`) of :attr:`parallel`."""
        return self.parallel.mesh

    def step_function(self):
        """The step over every member and device, not yet jitted: ``jax.vmap(step)`` with
        several seeds, inside ``shard_map`` over :attr:`mesh` with several devices (the state
        replicated, the batch split along its example axis; the per-device step averages
        losses and BN moments with ``lax.pmean``: what ``jax.pmap`` does, in the sharded-jit
        form JAX now builds pmap on, which also spans processes under ``jax.distributed``).
        :meth:`compiled_step` jits it; :mod:`dnas.device_loop` scans it over a chunk of steps."""
        step = self.step if self.num_seeds == 1 else jax.vmap(self.step)
        return self.parallel.map(step, ("state", "batch", "batch"), ("state", "state"))

    def compiled_step(self, donate: bool = True):
        """The jitted :meth:`step_function` (the state's buffers donated by default)."""
        return jax.jit(self.step_function(), donate_argnums=(0,) if donate else ())

    # ------------------------------------------------------------------ device placement
    def replicate(self, state: SearchState) -> SearchState:
        """Place a copy of ``state`` on every device of the mesh (a no-op on one device)."""
        return self.parallel.replicate(state)

    def shard(self, batch):
        """Split a global batch ``(x, y)`` over the devices along its example axis (with several
        seeds the batch is ``(S, B, ...)`` and ``B`` is split); see :class:`dnas.parallel.DataParallel`."""
        return self.parallel.shard(batch)

    def probs(self, state: SearchState) -> dict:
        from dnas.distributed import to_host
        return to_host(self.relax.probs(to_host(state.arch)))

    def derive(self, state: SearchState):
        from dnas.distributed import to_host
        return self.space.derive(to_host(self.relax.derive_scores(to_host(state.arch))))


def check_finite(metrics: dict, step: int, keys=("train_loss", "val_loss"), what: str = "search") -> None:
    """Raise :class:`NonFiniteLossError` naming the step if a loss (``keys``) is NaN/inf."""
    for k in keys:
        v = float(metrics[k])
        if not math.isfinite(v):
            raise NonFiniteLossError(
                f"{k} is {v} at step {step}: the {what} diverged (try a lower learning rate "
                "or check the data); no checkpoint was written for this step")


def _latency_objective(space: str, built: SearchSpace, space_options: dict, latency: dict):
    """The latency objective of the searched space, or of the *deployed* network when
    ``latency["space_options"]`` overrides the space's options (e.g. search a width-0.25 chain
    on 32×32 images while the latency is the full-width network's at 224×224, as in the
    published mobile tables). The deployed network must have the same choice points."""
    from dnas.latency.objective import make_latency_objective

    latency = dict(latency)
    deploy = latency.pop("space_options", None)
    if deploy and not isinstance(space, str):
        raise ValueError("latency space options rebuild a space by name; the space was given as an object")
    if deploy:
        target = build_space(space, **{**space_options, **deploy})
        shapes = {g: tuple(v) for g, v in target.groups.items()}
        if shapes != {g: tuple(v) for g, v in built.groups.items()}:
            raise ValueError(f"the latency space options {deploy} change the choice points of the {space} space "
                             f"({ {g: tuple(v) for g, v in built.groups.items()} } searched vs {shapes}); "
                             "only sizes that keep every choice point (width, resolution, stem stride) may differ")
        built = target
    return make_latency_objective(built, **latency)


def make_searcher(space, relaxation: str = "darts", *, space_options: dict | None = None,
                  relaxation_options: dict | None = None, hyper: Hyper = Hyper(),
                  total_steps: int = 1, num_devices: int = 1, hypergrad: str = "first",
                  hypergrad_options: dict | None = None, tune=(), latency: dict | None = None,
                  num_seeds: int = 1, precision: str = "float32", kernels: str = "auto",
                  remedies: dict | None = None) -> Searcher:
    """Build a :class:`Searcher` by names (``space``: a name, an import spec, or a space object or
    Flax NNX model, see :func:`~dnas.supernet.spaces.build_space`). ``latency``: keyword arguments of
    :func:`dnas.latency.objective.make_latency_objective` (``table_path``, ``loss``, ``target``,
    ``weight``, ``input_size``), plus ``space_options`` of the deployed network, or None.
    ``kernels``: the kernel policy (:mod:`dnas.backend`; ``auto``: the backend's), given to a
    built-in space and to the implicit estimators' loop default. ``remedies``: anti-collapse
    remedies ``{name: {option: value}}`` (:mod:`dnas.remedies`)."""
    remedy_list = get_remedies(remedies)
    space_options = dict(space_options or {})
    policy = resolve_kernels(kernels)
    if isinstance(space, str) and space in SPACES:
        space_options.setdefault("kernels", policy.name)
    if hypergrad.startswith("implicit"):
        hypergrad_options = {"unroll": policy.unroll_loops, **(hypergrad_options or {})}
    k = partial_channels(relaxation, **(relaxation_options or {}))
    if k != 1 and not takes_option(space, "partial_channels"):  # the candidate ops must be built for 1/K
        raise ValueError(f"relaxation {relaxation!r} runs the candidate ops on 1/{k} of the channels, and the "
                         f"space {space_label(space)!r} cannot build its ops that narrow: a space (or a model "
                         "factory) must take the option partial_channels=K and build its candidates for 1/K of "
                         "their input's channels (for PC-DARTS without partial channels use the relaxation "
                         "option k=1)")
    built = build_space(space, **({**space_options, "partial_channels": k} if k != 1 else space_options))
    relax = get_relaxation(relaxation, space=built, **(relaxation_options or {}))
    objective = None
    if latency:  # of the full-width network, also where PC-DARTS searches candidates built narrower
        full = built if k == 1 else build_space(space, **space_options)
        objective = _latency_objective(space, full, space_options, latency)
    refuse_precision(built, precision, space_label(space))
    return Searcher(built, relax, hyper, total_steps, num_devices, hypergrad=hypergrad,
                    hypergrad_options=hypergrad_options, tune=tuple(tune), latency=objective, num_seeds=num_seeds,
                    precision=precision, remedies=remedy_list, kernels=getattr(built, "kernels", policy))
