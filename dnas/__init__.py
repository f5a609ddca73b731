"""dnas: differentiable neural architecture search in JAX.

The Python API (imported on first use, so that ``import dnas`` does not start JAX):

* :func:`dnas.search` — search a Flax NNX model with choice points, or a built-in space;
* :func:`dnas.fix` — the model with every choice point replaced by its choice;
* :mod:`dnas.nnx` — the choice points: ``Choice``, ``InputChoice``, ``Identity``, ``Zero``;
* :func:`dnas.register_space`, :func:`dnas.register_relaxation` — extend dnas from user code.
"""

__version__ = "0.1.0"

_LAZY = {
    "search": ("dnas.api", "search"),
    "SearchResult": ("dnas.api", "SearchResult"),
    "fix": ("dnas.nnx", "fix"),
    "register_space": ("dnas.plugins", "register_space"),
    "register_relaxation": ("dnas.plugins", "register_relaxation"),
}

__all__ = ["search", "SearchResult", "fix", "nnx", "register_space", "register_relaxation", "__version__"]


def __getattr__(name):
    import importlib
    if name == "nnx":
        return importlib.import_module("dnas.nnx")
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'dnas' has no attribute {name!r}")
