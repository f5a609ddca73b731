"""Fingerprint the lowered search step: the SHA-256 of ``jax.jit(searcher.step).lower(...)``'s
StableHLO with source locations removed. Two source trees that print the same fingerprint
compile the same program, so any difference in their timings is the machine's noise.

    python benchmarks/hlo_fingerprint.py                 # this tree
    PYTHONPATH=/path/to/other/tree python benchmarks/hlo_fingerprint.py

Prints one JSON object per configuration (the NB201, DARTS-space and chain configurations of
``docs/benchmarks.md``, "The backend seam and user models").
"""
import hashlib
import json
import re

import jax
import jax.numpy as jnp

from dnas.searcher import make_searcher
from dnas.supernet.chain import ChainConfig

CASES = {
    "nb201-darts": ("nb201", "darts", {"channels": 16, "cells_per_stage": 5}),
    "nb201-gdas": ("nb201", "gdas", {"channels": 16, "cells_per_stage": 5}),
    "darts-darts": ("darts", "darts", {"channels": 16, "layers": 8}),
    "chain-proxyless": ("chain", "proxyless", {"width_mult": 0.25, "stem_stride": 1,
                                               "stage_depths": tuple(min(d, 2) for d in ChainConfig.stage_depths)}),
}


def fingerprint(space: str, relaxation: str, options: dict, batch: int = 64) -> tuple[str, int]:
    s = make_searcher(space, relaxation, space_options={**options, "in_channels": 3, "num_classes": 10},
                      total_steps=1000)
    state = s.init(jax.random.PRNGKey(0))
    b = (jnp.zeros((batch, 32, 32, 3)), jnp.zeros((batch,), jnp.int32))
    text = jax.jit(s.step).lower(state, b, b).as_text()
    text = re.sub(r"loc\(.*?\)", "", text)
    text = re.sub(r"#loc\d*\s*=.*", "", text)
    return hashlib.sha256(text.encode()).hexdigest(), len(text)


if __name__ == "__main__":
    import dnas
    for name, (space, relaxation, options) in CASES.items():
        digest, size = fingerprint(space, relaxation, options)
        print(json.dumps({"case": name, "sha256": digest[:16], "chars": size, "dnas": dnas.__file__}))
