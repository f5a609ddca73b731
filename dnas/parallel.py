"""Data parallelism over a 1-D device mesh, shared by the search (:class:`dnas.searcher.Searcher`)
and the training of derived networks (:class:`dnas.train.Trainer`).

A step written for one device, whose losses, gradients and BatchNorm moments are averaged with
``lax.pmean`` over the axis :data:`AXIS`, becomes a data-parallel step under
``jax.shard_map`` over :attr:`DataParallel.mesh`: the state replicated, the batch split along its
example axis. This is what ``jax.pmap`` does, in the sharded-jit form JAX now builds pmap on, and
it also spans processes under ``jax.distributed`` (every process passes the same global batch and
contributes its own rows, :func:`dnas.distributed.process_rows`). With one device every method is
the identity, so the single-device program carries no sharding at all.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

#: The mesh axis the examples of a batch are split over.
AXIS = "devices"


def device_mesh(num_devices: int) -> Mesh:
    """A 1-D mesh (axis :data:`AXIS`) over ``num_devices`` devices: the first ones, or under
    ``jax.distributed`` the first ``num_devices / P`` of every process."""
    devices = jax.devices()
    if jax.process_count() > 1:
        per = num_devices // jax.process_count()
        devices = [d for p in range(jax.process_count()) for d in [d for d in devices if d.process_index == p][:per]]
    if num_devices > len(devices):
        raise ValueError(f"{num_devices} devices requested but JAX sees {len(devices)} "
                         f"({jax.default_backend()}); on a CPU set "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count={num_devices}")
    return Mesh(np.asarray(devices[:num_devices]), (AXIS,))


class DataParallel:
    """``num_devices`` devices along :data:`AXIS`; ``batch_axis``: the axis of a batch's leaves
    that holds the examples (1 when a leading axis holds vmapped seeds)."""

    def __init__(self, num_devices: int, batch_axis: int = 0):
        self.num_devices, self.batch_axis = int(num_devices), int(batch_axis)
        if self.num_devices < 1:
            raise ValueError(f"num_devices must be positive, got {num_devices}")
        self.axis_name = AXIS if self.num_devices > 1 else None
        self._mesh: Mesh | None = None

    @property
    def mesh(self) -> Mesh:
        """The device mesh (built on first use, so one device never builds one)."""
        if self._mesh is None:
            self._mesh = device_mesh(self.num_devices)
        return self._mesh

    @property
    def batch_spec(self) -> P:
        return P(*([None] * self.batch_axis), AXIS)

    def map(self, fn, in_specs: tuple, out_specs):
        """``fn`` under ``shard_map`` on the mesh (``fn`` itself on one device). Specs are
        ``"state"`` (replicated) or ``"batch"`` (split), or a tuple of them."""
        if self.num_devices == 1:
            return fn

        def spec(s):
            if isinstance(s, tuple):
                return tuple(spec(x) for x in s)
            return P() if s == "state" else self.batch_spec
        return jax.shard_map(fn, mesh=self.mesh, in_specs=spec(in_specs), out_specs=spec(out_specs))

    def replicate(self, tree):
        """A copy of ``tree`` on every device of the mesh (a no-op on one device)."""
        if self.num_devices == 1:
            return tree
        if jax.process_count() > 1:  # every process holds the same host copy
            from dnas.distributed import to_host
            tree = to_host(tree)
        return jax.device_put(tree, NamedSharding(self.mesh, P()))

    def shard(self, batch):
        """Split a global batch over the devices along :attr:`batch_axis` (an error names a
        batch the devices do not divide)."""
        if self.num_devices == 1:
            return batch
        n, ax = self.num_devices, self.batch_axis
        for a in jax.tree_util.tree_leaves(batch):
            if a.shape[ax] % n:
                raise ValueError(f"global batch {a.shape[ax]} is not divisible by {n} devices")
        sharding = NamedSharding(self.mesh, self.batch_spec)
        if jax.process_count() == 1:
            return jax.device_put(batch, sharding)
        from dnas.distributed import process_rows

        def local(a):
            rows = process_rows(a.shape[ax])
            return np.asarray(a)[(slice(None),) * ax + (rows,)]
        return jax.tree_util.tree_map(
            lambda a: jax.make_array_from_process_local_data(sharding, local(a), a.shape), batch)
