"""Multi-process search with JAX's own runtime (``jax.distributed``).

One search can span several processes — several hosts of a GPU cluster, a TPU pod slice, or
several processes on one machine. Every process runs the same program: it calls
:func:`initialize` first, builds the same :class:`~dnas.searcher.Searcher` over *all* devices
of all processes (``jax.devices()`` is global after initialisation), computes the same global
batch from the same seed, and feeds only its own rows of it (:meth:`Searcher.shard` uses
``jax.make_array_from_process_local_data``). The compiled step is one SPMD program; its
``pmean`` over the device axis crosses processes (NCCL on GPU, ICI/DCN on TPU, gloo on CPU),
so α is the same single value on every device of every process. Only process 0 writes
outputs (:func:`is_primary`).

Launching::

    # explicit (any machine; e.g. 2 processes on one host, or one per host)
    dnas search --coordinator HOST:PORT --num-processes 2 --process-id 0 ...
    dnas search --coordinator HOST:PORT --num-processes 2 --process-id 1 ...

    # under a cluster launcher JAX recognises (SLURM ``srun``, Open MPI ``mpirun``, Cloud TPU
    # pod slices, Kubernetes): the launcher's environment says who is who
    srun --ntasks-per-node=1 dnas search --distributed ...
    gcloud compute tpus tpu-vm ssh NAME --worker=all --command="dnas search --distributed ..."
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np

_initialized = False


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Join the multi-process runtime (idempotent). With no arguments JAX detects the cluster
    from its launcher's environment (SLURM, Open MPI, Cloud TPU, Kubernetes) or
    ``JAX_COORDINATOR_ADDRESS``. On CPU the cross-process collectives use gloo."""
    global _initialized
    if _initialized:
        return
    explicit = [coordinator, num_processes, process_id]
    if any(v is not None for v in explicit) and not all(v is not None for v in explicit):
        raise ValueError("multi-process search needs all of --coordinator, --num-processes and --process-id "
                         "(or none of them, to let JAX detect the cluster)")
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id {process_id} is not in [0, {num_processes})")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
    _initialized = True


def is_primary() -> bool:
    """Whether this process writes the outputs (process 0)."""
    return jax.process_index() == 0


def to_host(tree: Any) -> Any:
    """A numpy copy of a pytree of (replicated) arrays, also when they span processes: a
    replicated array that is not fully addressable is read from this process's first shard."""
    def leaf(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(x.addressable_data(0))
        return np.asarray(jax.device_get(x))
    return jax.tree_util.tree_map(leaf, tree)


def process_rows(n: int) -> slice:
    """The rows of a global batch of ``n`` that this process feeds: an equal contiguous block
    per process, in process order (the order of ``jax.devices()``)."""
    p, i = jax.process_count(), jax.process_index()
    if n % p:
        raise ValueError(f"global batch {n} is not divisible by {p} processes")
    return slice(i * n // p, (i + 1) * n // p)
