"""XLA:CPU loop modes chosen from a run's expected length.

On XLA:CPU two choices trade compile time for step time (``docs/benchmarks.md``, "Loop modes"
and "A short run starts stepping quickly"):

* the DARTS space's cell edges: unrolled at trace time (the fastest steps; an 8-cell step
  compiles for minutes) or run as loops (:func:`dnas.nnx.edge_loop`, one traced edge
  per loop: a few minutes, slower steps);
* the implicit estimators' linear-solver loop (CG, Neumann): unrolled at trace time, so that
  their Hessian-vector products run outside loops (XLA:CPU's autodiff convolutions are slow
  inside loops), or a ``fori_loop`` (a short compile, slower steps).

With ``--loops auto`` (no ``unroll`` option given) :func:`plan_cpu_loops` estimates each
mode's step time over the run from figures measured on the 2-core CPU at a reference size
(a space's ``cpu_loop_cost``, the DARTS space's; :data:`MEASURED` for the solver loop), the
step scaled by the run's work (batch × pixels × channels² × cells) relative to the reference,
and takes the fast mode only when the time it saves is at least twice its extra compile
(:meth:`LoopCost.prefer_fast`). A short run then starts stepping
within the two minutes a user will wait, and a long run keeps the fastest step.
On accelerators nothing changes (their loops are scanned anyway).
"""
from __future__ import annotations

import dataclasses

from dnas.backend import XLA_CPU, default_policy, resolve


@dataclasses.dataclass(frozen=True)
class LoopCost:
    """Measured ``(compile_s, step_s)`` of the fastest-step mode and of the short-compile mode
    at a reference size, and that size's work (batch × pixels × channels² × cells)."""

    ref_work: float
    fast: tuple[float, float]
    short: tuple[float, float]
    measured: str

    def prefer_fast(self, steps: int, work: float) -> bool:
        """The fast mode when the step time it saves over the run is at least twice its extra
        compile: it then wins the run by at least the wait it adds, so a run that waits longer
        for its first step is one long enough for the wait to be under half of what it saves."""
        saved = steps * (self.short[1] - self.fast[1]) * work / self.ref_work
        return saved >= 2.0 * (self.fast[0] - self.short[0])


def work(batch: int, image_shape, channels: int, cells: int) -> float:
    """A step's work relative measure: batch × pixels × channels² × cells."""
    h, w = image_shape[:2]
    return float(batch) * h * w * channels ** 2 * cells


#: The solver loop, measured on the 2-core CPU, jaxlib 0.10.2 (docs/benchmarks.md, "A short run
#: starts stepping"); the spaces' own loops are measured in their modules (``cpu_loop_cost``).
MEASURED = {
    # NB201 C=16 N=2 (6 cells), B=32, 8x8x1, implicit-cg with 10 CG iterations: fori_loop compile
    # 55 s, step 2.98 s (measured); unrolled: compile over 600 s (the first step did not come
    # within 10 minutes) and a step estimated at 9 first-order steps (0.081 s each; the K=5
    # ratio of docs/hypergrad.md is 5.0x)
    "implicit": LoopCost(work(32, (8, 8), 16, 6), fast=(600.0, 0.73), short=(55.2, 2.98),
                         measured="Searcher.compiled_step, implicit-cg unroll=False; unrolled bounded"),
}


#: ``SearchConfig.loop`` / ``--loop`` values.
LOOPS = ("auto", "host", "device")


def resolve_loop(loop: str) -> str:
    """``auto`` → the device-resident loop (:mod:`dnas.device_loop`) on accelerators, the host
    loop on XLA:CPU (where scanned steps run autodiff's weight-gradient convolutions slowly and
    there are no kernel launches to save); an unknown name is a ValueError."""
    if loop not in LOOPS:
        raise ValueError(f"unknown loop {loop!r}; expected one of {', '.join(LOOPS)}")
    if loop == "auto":   # the backend's kernel policy, chosen in one place (dnas.backend)
        return "host" if default_policy() is XLA_CPU else "device"
    return loop


def plan_cpu_loops(space: str, space_options: dict, hypergrad: str, hypergrad_options: dict,
                   total_steps: int, batch_size: int, image_shape, kernels: str = "auto") -> tuple[dict, dict, dict]:
    """``(space_options, hypergrad_options, plan)``: the options with the chosen loop modes
    filled in where the user left them open, and what was chosen and why (for config.json).
    A no-op unless the kernel policy is XLA:CPU's (:mod:`dnas.backend`; the measured costs are
    XLA:CPU's), and where ``unroll`` is set."""
    from dnas.supernet.space_base import SearchSpace
    from dnas.supernet.spaces import SPACES

    space_options, hypergrad_options = dict(space_options), dict(hypergrad_options)
    plan: dict = {}
    if resolve(kernels).name != "xla_cpu":
        return space_options, hypergrad_options, plan
    cls = SPACES[space][0] if isinstance(space, str) and space in SPACES else SearchSpace
    channels, cells = cls.loop_size(space_options)
    if cls.cpu_loop_cost is not None and "unroll" not in space_options:
        fast = cls.cpu_loop_cost.prefer_fast(total_steps, work(batch_size, image_shape, channels, cells))
        space_options["unroll"] = True if fast else False
        plan["space_loops"] = "unroll" if fast else "scan"
    if hypergrad.startswith("implicit") and "unroll" not in hypergrad_options:
        fast = MEASURED["implicit"].prefer_fast(total_steps, work(batch_size, image_shape, channels, cells))
        hypergrad_options["unroll"] = True if fast else False
        plan["solver_loop"] = "unroll" if fast else "fori_loop"
    if plan:
        plan["total_steps"] = int(total_steps)
    return space_options, hypergrad_options, plan
