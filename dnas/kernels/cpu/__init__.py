"""XLA:CPU's formulations of kernels that XLA:CPU runs slowly in their plain form.

* :mod:`~dnas.kernels.cpu.branch_conv` — convolutions with a backward pass written as
  forward-style convolutions, fast inside ``lax.switch``, ``lax.scan`` and ``vmap``;
* :mod:`~dnas.kernels.cpu.depthwise` — depthwise convolutions as weighted sums of shifted views;
* :mod:`~dnas.kernels.cpu.pin` — a tensor stored once (a product with the identity), against
  XLA:CPU's fusion of cheap expressions into every consumer.

Which of them run is the :class:`dnas.backend.KernelPolicy`'s choice (``docs/cpu.md``).
"""
