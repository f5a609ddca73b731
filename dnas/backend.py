"""The backend seam: which formulation of each kernel a network runs, chosen once at the top.

XLA compiles the same program differently per backend, and several formulations that compute
the same function (and gradient) differ by large factors on XLA:CPU only (``docs/cpu.md``,
``docs/benchmarks.md``). A :class:`KernelPolicy` names those choices:

* ``matmul_1x1`` — a 1x1 convolution as a matrix product over the pixels;
* ``shifted_depthwise`` — a depthwise convolution as a weighted sum of shifted views
  (:mod:`dnas.kernels.cpu.depthwise`), and separable convolutions' ``auto`` formulation;
* ``branch_convs`` — convolutions inside a sampled op's ``lax.switch``, scanned loops and
  vmapped seeds through a custom backward pass written as forward-style convolutions
  (:mod:`dnas.kernels.cpu.branch_conv`);
* ``pin_bn_output`` / ``pin_nodes`` — BatchNorm outputs and cell-node sums stored once
  (:mod:`dnas.kernels.cpu.pin`);
* ``recompute_sampled`` — a sampled op differentiated by its own backward pass
  (:func:`dnas.supernet.mixed.switch_sampled`) rather than autodiff of ``lax.switch``, which
  keeps every candidate's residuals: a memory saving on every backend, on in both policies;
* ``unroll_loops`` — the default loop mode of the built-in spaces (loops over cells and edges
  unrolled at trace time; on XLA:CPU a weight-gradient convolution inside ``lax.scan`` is
  orders of magnitude slower, ``docs/benchmarks.md``).

:data:`XLA_CPU` turns every one on; :data:`NATIVE` (what GPUs and TPUs run) turns the CPU ones off:
JAX's own convolutions, ``lax.scan`` loops, no pins. The searcher, ``dnas train`` and the
benchmarks resolve the policy once (:func:`resolve`, ``--kernels auto|xla_cpu|native``) and
pass it down: the spaces receive it when built (their loop modes) and put it into the
:class:`~dnas.supernet.context.Ctx` of every forward pass, which is where the layers read it.
Both policies compute the same function; ``tests/test_backend.py`` runs the supernets under
both on the CPU and compares their outputs and gradients.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class KernelPolicy:
    name: str
    matmul_1x1: bool
    shifted_depthwise: bool
    branch_convs: bool
    pin_bn_output: bool
    pin_nodes: bool
    unroll_loops: bool
    recompute_sampled: bool = True


XLA_CPU = KernelPolicy("xla_cpu", matmul_1x1=True, shifted_depthwise=True, branch_convs=True, pin_bn_output=True,
                       pin_nodes=True, unroll_loops=True)
NATIVE = KernelPolicy("native", matmul_1x1=False, shifted_depthwise=False, branch_convs=False, pin_bn_output=False,
                      pin_nodes=False, unroll_loops=False)
POLICIES = {"xla_cpu": XLA_CPU, "native": NATIVE}
KERNEL_CHOICES = ("auto", *POLICIES)


def default_policy() -> KernelPolicy:
    """The policy of the backend JAX runs on: :data:`XLA_CPU` on the CPU, :data:`NATIVE` elsewhere.
    This is the one place that looks at the backend to choose kernels."""
    import jax
    return XLA_CPU if jax.default_backend() == "cpu" else NATIVE


def resolve(kernels: "str | KernelPolicy | None" = None) -> KernelPolicy:
    """``"auto"``/None: :func:`default_policy`; a name of :data:`POLICIES`; or a policy itself."""
    if isinstance(kernels, KernelPolicy):
        return kernels
    if kernels in (None, "auto"):
        return default_policy()
    if kernels not in POLICIES:
        raise ValueError(f"unknown kernel policy {kernels!r}; expected one of {', '.join(KERNEL_CHOICES)}")
    return POLICIES[kernels]
