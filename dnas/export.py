"""The retrained network for serving: ``jax.export`` (serialized StableHLO).

``dnas train --export`` writes ``model.stablehlo`` — the trained network's inference function
(BatchNorm with its running statistics, the weights folded in as constants) serialized with
:func:`jax.export.export` — and ``model.json``, its input signature (NHWC float32 images with a
symbolic batch dimension, the input standardisation the data used, the class names). Any JAX
program reloads it with :func:`load_exported` and calls it without dnas, Flax or the genotype:
``jax.export.deserialize(blob).call(images)`` gives the logits. The StableHLO is lowered for
the platform the training ran on (XLA:CPU here); its calling convention is versioned by JAX
(``calling_convention_version`` in ``model.json``).
"""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dnas.distributed import to_host


def inference_fn(trainer, state):
    """``images -> logits`` of the trained network, with its weights and BatchNorm statistics
    closed over (they become constants of the exported program)."""
    from dnas.supernet.context import Ctx
    params, stats = to_host((state.params, state.batch_stats))
    params = {k: v for k, v in params.items() if k != "aux"}   # the auxiliary head trains only
    network = trainer.network

    def logits(images):
        ctx = Ctx(train=False, compute_dtype=trainer.compute_dtype, kernels=trainer.kernels)
        return network.apply(params, stats, images, ctx).logits.astype(jnp.float32)
    return logits


def export_network(trainer, state, image_shape, out: Path, data=None) -> dict:
    """Serialize the trained network to ``out/model.stablehlo`` and its signature to
    ``out/model.json``; returns the signature."""
    from dnas.rundir import atomic_path, write_json_atomic

    fn = jax.jit(inference_fn(trainer, state))
    (batch,) = jax.export.symbolic_shape("batch")
    spec = jax.ShapeDtypeStruct((batch, *image_shape), jnp.float32)
    exported = jax.export.export(fn)(spec)
    with atomic_path(out / "model.stablehlo") as tmp:
        tmp.write_bytes(exported.serialize())
    signature = {"file": "model.stablehlo", "input": {"shape": ["batch", *map(int, image_shape)], "dtype": "float32",
                                                     "layout": "NHWC"},
                 "output": {"shape": [d if isinstance(d, int) else str(d) for d in exported.out_avals[0].shape], "dtype": "float32",
                            "meaning": "logits"},
                 "platforms": list(exported.platforms),
                 "calling_convention_version": exported.calling_convention_version,
                 "jax_version": jax.__version__}
    if data is not None:
        signature["preprocessing"] = {"mean": np.asarray(data.mean).tolist(), "std": np.asarray(data.std).tolist(),
                                      "class_names": list(data.class_names)}
    write_json_atomic(out / "model.json", signature)
    return signature


def load_exported(path: str | Path):
    """The exported network at ``path`` (``model.stablehlo`` or its run directory), callable
    as ``exported.call(images)``."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.stablehlo"
    return jax.export.deserialize(bytearray(path.read_bytes()))


__all__ = ["export_network", "load_exported", "inference_fn"]
