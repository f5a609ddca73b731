"""Same-shaped leaves of a pytree kept as one stacked array each.

A Flax NNX model holds one parameter per layer: the DARTS cell space written with
:mod:`dnas.nnx` (:class:`dnas.supernet.darts.DartsNet`, 8 cells) has 1,399 weight arrays and
1,858 BatchNorm statistics, where its layer-kit form, which stacked a cell's 14 edges, had 219
and 294, of 20 and 4 distinct shapes. Every leaf is a parameter and an output of the compiled step and
has its own gradient-norm reduction, decay, momentum and update fusions, each with its own copy
of the learning-rate schedule: XLA compiles per-leaf work, so the step's compile time grows with
the number of leaves, not with the arithmetic.

:class:`StackedLeaves` keeps such a tree as ``{"float32[3,3,16,1]": (n, 3, 3, 16, 1), ...}``,
one array per (dtype, shape), in the order the leaves first appear. ``unstack`` splits the
arrays into the original leaves inside the traced step (one ``lax.split`` per group, whose
derivative is one concatenation), so the optimizer and the step's inputs and outputs see a
few dozen arrays. Every weight optimizer dnas uses (SGD with momentum and decay, global-norm
clipping, Adam) is elementwise or global, so it gives the same update stacked or per leaf up to
the order of the floating-point sums in the global norm.

Within a group the leaves follow the template's order, except that leaves of one ``order``
class (:class:`StackedLeaves`) are kept next to each other. :class:`~dnas.supernet.nnx_space.NNXSpace`
classes a choice point's weights by the candidates' structure and the weight's place in them,
so the copies of one weight over the edges a :func:`dnas.nnx.edge_loop` runs together are one
contiguous block of their group: the loop's stacking of those copies is then a concatenation of
adjacent slices of one array, which XLA folds into one slice (and the derivative's into one
concatenation), where interleaved copies leave a slice, a reshape and a fusion per copy.
"""
from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Callable, Hashable

import jax
import jax.numpy as jnp
import numpy as np


def group_name(shape, dtype) -> str:
    """``float32[3,3,16,1]``: the key of the stacked array holding leaves of this dtype and shape."""
    return f"{np.dtype(dtype).name}[{','.join(str(int(d)) for d in shape)}]"


def is_group_name(name: str) -> bool:
    """Whether ``name`` (a key) is one :func:`group_name` writes: ``float32[3,3,16,1]``."""
    return re.fullmatch(r"[a-z][a-z0-9]*\[(\d+(,\d+)*)?\]", name) is not None


def _concrete(arrays) -> bool:
    """Whether ``arrays`` are values, not tracers: outside a traced function (building a model
    from a state, initialising one) each group's split or stack, and each leaf's squeeze, would
    run as a small program of its own, compiled once per shape, where a copy on the host compiles
    nothing (``jax.device_put`` of the numpy result: ``jnp.asarray`` of a numpy array is itself
    a program per shape, ``lax.stage``; ``docs/benchmarks.md``, "A state back to the model, on
    the host"). Inside a traced step they are part of one program and stay there. (PRNG key
    arrays, which numpy cannot hold, stay with JAX.)"""
    return not any(isinstance(a, jax.core.Tracer) or jnp.issubdtype(a.dtype, jax.dtypes.extended)
                   for a in arrays)


def stack_arrays(arrays) -> jax.Array:
    """``jnp.stack(arrays)``: copied on the host when they are values (:func:`_concrete`), in the
    traced program otherwise."""
    if _concrete(arrays):
        return jax.device_put(np.stack([np.asarray(a) for a in arrays]))
    return jnp.stack(arrays)


class StackedLeaves:
    """The layout of a pytree whose leaves of equal dtype and shape are stacked (see the
    module's docstring). Built from a template tree (arrays or ``jax.ShapeDtypeStruct``);
    :meth:`stack` and :meth:`unstack` convert any tree of the template's structure and shapes.
    ``order(path)``, when given, names each leaf's class (a hashable, ``None`` for a class of its
    own): a group holds its leaves class by class, the classes in the order their first leaf
    appears, each class's leaves in the template's order."""

    def __init__(self, template: Any, order: Callable[[str], Hashable] | None = None):
        flat, self.treedef = jax.tree_util.tree_flatten_with_path(template)
        self.paths = [jax.tree_util.keystr(p, simple=True, separator="/") for p, _ in flat]
        classes: dict[Hashable, list[int]] = {}
        for i, path in enumerate(self.paths):
            key = None if order is None else order(path)
            classes.setdefault(("leaf", i) if key is None else ("class", key), []).append(i)
        self.groups: dict[str, list[int]] = {}
        for members in classes.values():
            for i in members:
                leaf = flat[i][1]
                self.groups.setdefault(group_name(leaf.shape, leaf.dtype), []).append(i)
        self.num_leaves = len(flat)

    def stack(self, tree) -> dict[str, jax.Array]:
        """``{group: the group's leaves stacked on a new first axis}``."""
        leaves = self.treedef.flatten_up_to(tree)
        return {name: stack_arrays([leaves[i] for i in idx]) for name, idx in self.groups.items()}

    def unstack(self, stacked: dict[str, jax.Array]):
        """The tree :meth:`stack` was given."""
        missing = sorted(set(self.groups) - set(stacked))
        if missing:
            raise ValueError(f"stacked leaves lack the groups {missing}")
        leaves: list = [None] * self.num_leaves
        if _concrete([stacked[name] for name in self.groups]):
            for name, idx in self.groups.items():
                host = np.asarray(stacked[name])
                for k, i in enumerate(idx):
                    leaves[i] = jax.device_put(host[k])
            return self.treedef.unflatten(leaves)
        for name, idx in self.groups.items():
            parts = jax.lax.split(stacked[name], [1] * len(idx), axis=0)
            for i, part in zip(idx, parts):
                leaves[i] = jnp.squeeze(part, 0)
        return self.treedef.unflatten(leaves)

    def leaf_path(self, name: str, index: int) -> str:
        """The original path (``cells/0/edges/3/conv/kernel``) of entry ``index`` of group ``name``."""
        return self.paths[self.groups[name][index]]

    def entries(self) -> dict[str, list[str]]:
        """``{group: the paths of its entries, in order}``: what each row of each stacked array holds."""
        return {name: [self.paths[i] for i in idx] for name, idx in self.groups.items()}


class WeightLayout:
    """A model's weights and BatchNorm statistics, each a :class:`StackedLeaves` (``stack``), or
    kept as they are (the identity): the one switch :class:`~dnas.supernet.nnx_space.NNXSpace`
    and its derived network share."""

    def __init__(self, params, stats, stack: bool = True, order: Callable[[str], Hashable] | None = None):
        self.layouts = (StackedLeaves(params, order), StackedLeaves(stats, order)) if stack else None

    def stacked(self, params, stats):
        if self.layouts is None:
            return params, stats
        return self.layouts[0].stack(params), self.layouts[1].stack(stats)

    def unstacked(self, params, stats):
        if self.layouts is None:
            return params, stats
        return self.layouts[0].unstack(params), self.layouts[1].unstack(stats)

    def stacked_stats(self, stats):
        return stats if self.layouts is None else self.layouts[1].stack(stats)

    def fingerprint(self) -> str | None:
        """A digest of which weight each row of each stacked array holds, ``None`` unstacked.

        Checkpoints record it (:func:`dnas.rundir.save_checkpoint`): two layouts of one model
        can stack the same arrays in another order (as dnas's ``order`` classes once changed),
        and a restore checks only names and shapes, so without it a resume across such a change
        would load permuted weights without an error. Unstacked, the leaves are stored under
        their own paths, which the restore checks."""
        if self.layouts is None:
            return None
        rows = {"params": self.layouts[0].entries(), "stats": self.layouts[1].entries()}
        return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]
