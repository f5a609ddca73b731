"""Anti-collapse remedies that change the search itself, composable with every relaxation.

DARTS's collapse (the cells fill with parameter-free ops as the search runs on) has a family of
published remedies. Those that change the search step live here, each as a :class:`Remedy`: a
wrapper of the relaxation (it sees what the mixed ops consume and the architecture objective)
and/or a perturbation of the architecture during the weight step. Because they act on the
relaxation's protocol (:mod:`dnas.relaxations.base`) and the search step, not on a space, they
compose with every relaxation, hypergradient estimator and space (a user's Flax model included),
and with data-parallel and vmapped-seed search:

* ``darts_minus`` (Chu et al., DARTS-, ICLR 2021): :func:`darts_minus`;
* ``beta_decay`` (Ye et al., β-DARTS, CVPR 2022): :func:`beta_decay`;
* ``sdarts`` (Chen & Hsieh, SDARTS, ICML 2020): :func:`sdarts` (``mode=rs`` or ``adv``).

Selected by ``SearchConfig.remedies`` / ``dnas search --remedy NAME[:k=v,...]`` /
``dnas.search(..., remedies={...})``. The other remedies of the toolkit are not step changes:
FairDARTS is a relaxation (``fair_darts``), DARTS+ and DARTS-ES are stopping rules
(:mod:`dnas.stopping`), RobustDARTS's eigenvalue is :mod:`dnas.hessian`, DARTS-PT is a selection
after the search (:mod:`dnas.select`). See ``docs/anticollapse.md``.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from dnas.relaxations.base import Relaxation


class Remedy(NamedTuple):
    """One remedy: pure functions the search step composes.

    ``relaxation(relax) -> relax``: wraps the relaxation (its ``sample``/``mix``/``penalty``).
    ``perturbation(loss, samples, key, progress) -> delta``: the perturbation of the weight
    step's samples (what the mixed ops consume), given the weight step's loss as a function of
    the perturbation; ``delta`` has the samples' structure and is added to their floating leaves.
    ``metrics(progress) -> {name: scalar}``: the remedy's schedule, logged every step.
    """

    name: str
    relaxation: Callable[[Relaxation], Relaxation] | None = None
    perturbation: Callable | None = None
    metrics: Callable[[jax.Array], dict] | None = None


# --------------------------------------------------------------------------- DARTS-

def linear_decay(beta0: float):
    """β(progress) = β₀ · (1 − progress): DARTS-'s default schedule, β₀ at the start, 0 at the end."""
    return lambda progress: beta0 * (1.0 - jnp.asarray(progress, jnp.float32))


def auxiliary_skip(x: jax.Array, y_shape) -> jax.Array:
    """The auxiliary skip of one choice point: ``x`` itself when the op keeps its shape; on a
    reducing edge (stride ``s``, channels kept) the parameter-free ``s×s`` average pool.

    DARTS-'s code uses a (parameterised) factorised reduction on reduction edges; a parameter-free
    pool keeps the remedy free of weights that would have to be derived away."""
    if tuple(x.shape) == tuple(y_shape):
        return x
    *lead, h, w, c = x.shape
    *_, ho, wo, co = y_shape
    if c != co or ho == 0 or wo == 0 or h % ho or w % wo or h // ho != w // wo:
        raise ValueError(f"darts_minus: no parameter-free auxiliary skip from shape {tuple(x.shape)} to "
                         f"{tuple(y_shape)} (the channels must match and the spatial size shrink by one integer factor)")
    s = h // ho
    window = (1,) * len(lead) + (s, s, 1)
    return lax.reduce_window(x, 0.0, lax.add, window, window, "VALID") / (s * s)


def darts_minus(beta0: float = 1.0) -> Remedy:
    """DARTS- (Chu et al., ICLR 2021, Sec. 3.2, eq. 4): every op choice point's output gains an
    auxiliary skip connection, ``ō(x) = β·x + Σ_o w_o·o(x)``, whose weight β decays linearly
    from β₀ to 0 over the search (``progress``), so the searched supernet ends as the plain one.

    The skip carries the gradient that otherwise makes ``skip_connect`` win for its easy
    optimisation (the paper's "unfair advantage"), so the candidates compete on what they add.
    β is not learnt and not part of the architecture; derivation is the relaxation's. Input
    choices (``dnas.nnx.InputChoice``) get no auxiliary skip.
    """
    if beta0 < 0:
        raise ValueError(f"darts_minus: beta0 must be non-negative, got {beta0}")
    schedule = linear_decay(beta0)

    def wrap(relax: Relaxation) -> Relaxation:
        def sample(arch, key, progress):
            inner = relax.sample(arch, key, progress)
            beta = schedule(progress)
            # one β per choice point, so the samples keep their leading choice-point axis
            return {g: {"inner": s, "_aux_beta": jnp.full((_leading(s),), beta, jnp.float32)}
                    for g, s in inner.items()}

        def mix(sample, candidates, x):
            y, state = relax.mix(sample["inner"], candidates, x)
            if not getattr(candidates, "auxiliary_skip", True):
                return y, state
            return y + sample["_aux_beta"].astype(y.dtype) * auxiliary_skip(x, y.shape).astype(y.dtype), state

        def eval_sample(arch):
            return {g: {"inner": s, "_aux_beta": jnp.zeros((_leading(s),), jnp.float32)}
                    for g, s in relax.eval_sample(arch).items()}
        return relax._replace(sample=sample, mix=mix, eval_sample=eval_sample)

    return Remedy("darts_minus", relaxation=wrap, metrics=lambda progress: {"aux_skip_beta": schedule(progress)})


def _leading(tree) -> int:
    return jax.tree_util.tree_leaves(tree)[0].shape[0]


# --------------------------------------------------------------------------- β-DARTS

def beta_decay_loss(arch) -> jax.Array:
    """β-DARTS's Beta-Decay loss (Ye et al., CVPR 2022, eq. 8): the mean over choice points of
    the smooth maximum ``log Σ_o exp(α_o)``. Its gradient ``∂/∂α_o = softmax(α)_o / N`` pulls
    the largest α down hardest, so the softmax-activated α keep small values and variance
    (Sec. 3). Taken over every 2-D leaf of the architecture pytree (choice points × ops: α of
    each group; PC-DARTS's 1-D edge parameters are left alone)."""
    rows = [jax.nn.logsumexp(a, axis=-1) for a in jax.tree_util.tree_leaves(arch) if a.ndim == 2]
    if not rows:
        raise ValueError("beta_decay: the architecture holds no (choice points × ops) array to regularise")
    return jnp.mean(jnp.concatenate(rows))


def beta_decay(weight: float = 50.0) -> Remedy:
    """β-DARTS: the architecture objective gains ``λ(t)·L_β(α)`` (:func:`beta_decay_loss`),
    with λ rising linearly from 0 to ``weight`` over the search (the paper raises the weight
    linearly; ``weight`` is λ at the end). Works with every relaxation whose architecture has
    (choice points × ops) logits; an estimator differentiates it like any other term of
    ``L_val``."""
    if weight < 0:
        raise ValueError(f"beta_decay: weight must be non-negative, got {weight}")

    def lam(progress):
        return weight * jnp.asarray(progress, jnp.float32)

    def wrap(relax: Relaxation) -> Relaxation:
        def penalty(arch, progress):
            return relax.arch_penalty(arch, progress) + lam(progress) * beta_decay_loss(arch)
        return relax._replace(penalty=penalty)

    return Remedy("beta_decay", relaxation=wrap, metrics=lambda progress: {"beta_decay_weight": lam(progress)})


# --------------------------------------------------------------------------- SDARTS

def _is_float(a) -> bool:
    return jnp.issubdtype(a.dtype, jnp.floating)


def _is_weight(path, s) -> bool:
    """A leaf of the samples that is a mixing weight: floating, and not under a key starting with
    ``_`` (a remedy's own schedule, e.g. DARTS-'s β, which a perturbation leaves alone)."""
    private = any(str(getattr(k, "key", "")).startswith("_") for k in path)
    return _is_float(s) and not private


def perturb_samples(samples, delta):
    """The samples with ``delta`` added to their mixing weights (:func:`_is_weight`) and clipped
    to [0, 1] (weights stay weights); other leaves (sampled indices, schedules) are kept. The clip
    only shrinks the perturbation, so it stays in its L∞ ball."""
    def add(path, s, d):
        return jnp.clip(s + d.astype(s.dtype), 0.0, 1.0) if _is_weight(path, s) else s
    return jax.tree_util.tree_map_with_path(add, samples, delta)


def _uniform_like(samples, key, eps):
    """U[−ε, ε] noise on every mixing weight, zeros elsewhere (one key per leaf)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(samples)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(treedef, [
        jax.random.uniform(k, s.shape, jnp.float32, -eps, eps) if _is_weight(path, s)
        else jnp.zeros(s.shape, jnp.float32) for k, (path, s) in zip(keys, leaves)])


def pgd_linf(loss: Callable, samples, key, eps, steps: int = 7, random_start: bool = True):
    """Projected gradient ascent of ``loss(delta)`` in the L∞ ball of radius ``eps`` (Madry et
    al., 2018), as SDARTS-ADV attacks the mixing weights: ``steps`` signed-gradient steps of size
    ``2·eps/steps`` from a uniform random start, each followed by the projection onto the ball
    (and of the perturbed weights onto [0, 1], :func:`perturb_samples`). Returns the
    perturbation actually applied, ``perturb_samples(samples, δ) − samples``."""
    delta = _uniform_like(samples, key, eps) if random_start else jax.tree_util.tree_map(
        lambda s: jnp.zeros(s.shape, jnp.float32), samples)
    step = 2.0 * eps / steps

    def effective(d):
        return jax.tree_util.tree_map_with_path(
            lambda path, p, s: (p - s).astype(jnp.float32) if _is_weight(path, s) else jnp.zeros(s.shape, jnp.float32),
            perturb_samples(samples, d), samples)

    delta = effective(delta)
    for _ in range(steps):   # unrolled: XLA:CPU runs the convolutions of a scanned body far slower
        g = jax.grad(loss)(delta)
        delta = effective(jax.tree_util.tree_map(lambda a, b: jnp.clip(a + step * jnp.sign(b), -eps, eps), delta, g))
    return delta


def sdarts(mode: str = "rs", epsilon: float = 0.3, epsilon_min: float = 0.03, steps: int = 7) -> Remedy:
    """SDARTS (Chen & Hsieh, ICML 2020, Sec. 3, eq. 4-5): smooth the validation loss landscape in
    the architecture by training the weights under perturbed architectures,
    ``min_w E_{δ~U[−ε,ε]} L_train(w, ᾱ + δ)`` (``mode="rs"``, random smoothing) or
    ``min_w max_{‖δ‖∞≤ε} L_train(w, ᾱ + δ)`` (``mode="adv"``, adversarial, by
    :func:`pgd_linf`: 7 steps of size 2ε/7 from a random start, as the authors' code).

    ``ᾱ`` is what the mixed ops consume, the relaxation's samples (softmax(α) for DARTS, as in
    the paper, which perturbs the softmax-normalised α); perturbed weights are clipped to [0, 1].
    Only the weight step is perturbed; the architecture step is the relaxation's own. ε rises
    linearly from ``epsilon_min`` to ``epsilon`` over the search, as the authors' code ramps it
    per epoch (0.03 → 0.3). The ADV attack costs ``steps`` extra forward and backward passes of
    the weight step.
    """
    if mode not in ("rs", "adv"):
        raise ValueError(f"sdarts: mode must be 'rs' or 'adv', got {mode!r}")
    if not 0 <= epsilon_min <= epsilon:
        raise ValueError(f"sdarts: need 0 <= epsilon_min <= epsilon, got {epsilon_min}, {epsilon}")
    if steps < 1:
        raise ValueError(f"sdarts: steps must be positive, got {steps}")

    def eps(progress):
        return epsilon_min + (epsilon - epsilon_min) * jnp.asarray(progress, jnp.float32)

    def perturbation(loss, samples, key, progress):
        if mode == "rs":
            return _uniform_like(samples, key, eps(progress))
        return pgd_linf(loss, samples, key, eps(progress), steps)

    return Remedy(f"sdarts_{mode}", perturbation=perturbation, metrics=lambda progress: {"sdarts_epsilon": eps(progress)})


# --------------------------------------------------------------------------- registry

REGISTRY: dict[str, Callable[..., Remedy]] = {"darts_minus": darts_minus, "beta_decay": beta_decay, "sdarts": sdarts}


def get_remedies(spec: dict | None) -> tuple[Remedy, ...]:
    """``{name: {option: value}}`` → remedies, in a fixed (sorted) order; unknown names and
    options are errors that name them (before anything runs)."""
    import inspect

    from dnas.options import coerce_options
    out = []
    for name in sorted(spec or {}):
        if name not in REGISTRY:
            raise ValueError(f"unknown remedy {name!r}; available: {', '.join(sorted(REGISTRY))} "
                             "(FairDARTS is a relaxation: --relaxation fair_darts; DARTS+/DARTS-ES: --stop; "
                             "DARTS-PT: dnas select --method pt)")
        options = dict(spec[name] or {})
        params = inspect.signature(REGISTRY[name]).parameters
        bad = sorted(set(options) - set(params))
        if bad:
            raise ValueError(f"remedy {name!r} has no option(s) {bad}; options: {sorted(params)}")
        out.append(REGISTRY[name](**coerce_options(REGISTRY[name], options, f"remedy {name!r}")))
    if sum(r.perturbation is not None for r in out) > 1:
        raise ValueError("at most one remedy may perturb the weight step")
    return tuple(out)


def apply_to_relaxation(relax: Relaxation, remedies) -> Relaxation:
    for r in remedies:
        if r.relaxation is not None:
            relax = r.relaxation(relax)
    return relax


def weight_step_perturbation(remedies):
    return next((r.perturbation for r in remedies if r.perturbation is not None), None)


def remedy_metrics(remedies, progress) -> dict:
    out: dict[str, Any] = {}
    for r in remedies:
        if r.metrics is not None:
            out.update(r.metrics(progress))
    return out


__all__ = ["Remedy", "REGISTRY", "get_remedies", "darts_minus", "beta_decay", "sdarts", "beta_decay_loss",
           "pgd_linf", "perturb_samples", "auxiliary_skip", "linear_decay"]
