"""A device-resident search loop: the data on the device, several steps per compiled call.

On a GPU the NAS-Bench-201 search step is bound by kernel launches and host work, not
arithmetic (``docs/benchmarks.md``, "On a GPU"): the host loop of :func:`dnas.run.run_search`
slices every batch in NumPy, copies it to the device, augments it in a jitted call of its own
and dispatches the step, once per step. :class:`DeviceLoop` instead

* puts both halves of the training split on the device once (per seed, stacked along the
  member axis), as the standardised ``float32`` arrays the host loop reads, so that both loops
  see bit-identical inputs;
* per epoch sends only the example order (the permutations :func:`dnas.data.epoch_batches`
  draws, ``int32`` indices), and gathers, augments (:func:`dnas.data.augment_batch` with the
  host loop's keys, ``fold_in(key_aug, step)``) and steps on the device;
* runs ``chunk`` search steps per call as one ``lax.scan`` over
  :meth:`dnas.searcher.Searcher.step_function` (every seed vmapped, data parallel under
  ``shard_map`` as in the host loop), returning the chunk's metrics stacked, fetched to the
  host once per chunk.

It computes what the host loop computes, step for step (tested: α, weights and metrics equal
after N steps, on one and on 8 devices, with several seeds). On XLA:CPU the host loop stays the
default: autodiff's weight-gradient convolutions run far slower inside ``lax.scan`` loops there
(``docs/benchmarks.md``, "Loop modes"), and a CPU has no launch overhead to save.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dnas.data import augment_batch, num_batches

#: The second epoch_batches stream (the architecture half) uses seed + this, as dnas.run does.
ARCH_STREAM_OFFSET = 1_000_003
AUG_SALT = 0xA06


def epoch_order(n: int, batch_size: int, seed: int, epoch: int, steps: int) -> np.ndarray:
    """``(steps, batch_size)`` example indices of one epoch: the first ``steps`` batches of
    :func:`dnas.data.epoch_batches` (same permutation, ``default_rng([seed, epoch])``)."""
    order = np.random.default_rng([int(seed), int(epoch)]).permutation(n)
    return order[:steps * batch_size].reshape(steps, batch_size).astype(np.int32)


class DeviceLoop:
    """Chunks of search steps in one compiled call, reading a device-resident dataset.

    ``members``: per seed ``((wx, wy), (ax, ay))``, the weight and architecture halves (as
    :func:`dnas.run._member_data` returns them); ``seeds`` as the searcher's members.
    """

    def __init__(self, searcher, members, seeds, batch_size: int, augment: bool, pad: int, flip: bool):
        self.searcher, self.seeds, self.batch_size = searcher, tuple(int(s) for s in seeds), int(batch_size)
        self.augment, self.pad, self.flip = augment, int(pad), bool(flip)
        self.multi = len(self.seeds) > 1
        sizes = {(len(wy), len(ay)) for (_, wy), (_, ay) in members}
        if len(sizes) != 1:
            raise ValueError(f"the seeds' data halves differ in size ({sorted(sizes)}); the device loop stacks them")
        (self.n_w, self.n_a), = sizes
        self.steps_per_epoch = min(num_batches(self.n_w, batch_size), num_batches(self.n_a, batch_size))
        stack = (lambda *a: np.stack(a)) if self.multi else (lambda a: a)
        data = {"wx": stack(*[m[0][0] for m in members]), "wy": stack(*[m[0][1] for m in members]),
                "ax": stack(*[m[1][0] for m in members]), "ay": stack(*[m[1][1] for m in members])}
        self.data = self._replicated(data)
        keys = [jax.random.fold_in(jax.random.PRNGKey(s), AUG_SALT) for s in self.seeds]
        self.aug_keys = self._replicated(jnp.stack(keys) if self.multi else keys[0])
        self._compiled = jax.jit(self._chunk, donate_argnums=(0,))

    def _replicated(self, tree):
        s = self.searcher
        if s.num_devices == 1:
            return jax.device_put(tree)
        from jax.sharding import NamedSharding, PartitionSpec as P
        return jax.device_put(tree, NamedSharding(s.mesh, P()))

    # ------------------------------------------------------------------ the compiled chunk
    def _batches(self, data, aug_key, iw, ia, step):
        """One member's augmented (train, val) batches of ``step``, gathered on the device."""
        xt, yt = jnp.take(data["wx"], iw, axis=0), jnp.take(data["wy"], iw, axis=0)
        xv, yv = jnp.take(data["ax"], ia, axis=0), jnp.take(data["ay"], ia, axis=0)
        if self.augment:
            kt, kv = jax.random.split(jax.random.fold_in(aug_key, step))
            xt = augment_batch(kt, xt, pad=self.pad, flip=self.flip)
            xv = augment_batch(kv, xv, pad=self.pad, flip=self.flip)
        return (xt, yt), (xv, yv)

    def _chunk(self, state, data, aug_keys, idx_w, idx_a, steps):
        step_fn = self.searcher.step_function()
        batches = jax.vmap(self._batches, in_axes=(0, 0, 0, 0, None)) if self.multi else self._batches

        def body(state, xs):
            iw, ia, step = xs
            train_b, val_b = batches(data, aug_keys, iw, ia, step)
            return step_fn(state, train_b, val_b)
        # idx: (chunk, [S,] B); the member axis, if any, stays second
        return lax.scan(body, state, (idx_w, idx_a, steps))

    # ------------------------------------------------------------------ host side
    def epoch_indices(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, [S,] B)`` indices into the weight and architecture halves for ``epoch``."""
        b, n = self.batch_size, self.steps_per_epoch
        iw = [epoch_order(self.n_w, b, s, epoch, n) for s in self.seeds]
        ia = [epoch_order(self.n_a, b, s + ARCH_STREAM_OFFSET, epoch, n) for s in self.seeds]
        if self.multi:
            return np.stack(iw, axis=1), np.stack(ia, axis=1)
        return iw[0], ia[0]

    def run(self, state, idx_w: np.ndarray, idx_a: np.ndarray, first_step: int):
        """Run ``len(idx_w)`` steps from global step ``first_step``; returns the new state and
        the metrics stacked along a leading step axis (device arrays)."""
        steps = np.arange(first_step, first_step + len(idx_w), dtype=np.int32)
        return self._compiled(state, self.data, self.aug_keys, idx_w, idx_a, steps)


__all__ = ["DeviceLoop", "epoch_order"]
