"""Derived networks: the architecture a search chose, as a stand-alone network trained from scratch.

:func:`build_network` turns a genotype into a :class:`~dnas.supernet.network.Network` (pure
``init``/``apply`` over the layer kit) by asking the genotype's space: every space builds its
own from the same description as its supernet (``Space.network``), following the space's
evaluation protocol:

* ``nb201`` — the NAS-Bench-201 evaluation network (:func:`dnas.supernet.nb201.nb201_network`);
  the benchmark's networks are C=16, N=5 (:data:`NB201_DEFAULTS`);
* ``darts`` — the DARTS CIFAR evaluation network with drop path and the auxiliary head
  (:func:`dnas.supernet.darts.darts_network`); the paper's CIFAR-10 network is C=36, L=20
  (:data:`DARTS_DEFAULTS`);
* ``chain`` — the ProxylessNAS chain with every block its chosen MBConv
  (:func:`dnas.supernet.chain.chain_network`), built with the options of the space it was
  searched in.

A user model's genotype (``choices``) has no network here: :func:`dnas.fix` turns the model
itself into one.
"""
from __future__ import annotations

from dnas.supernet.chain import chain_network
from dnas.supernet.darts import NETWORK_DEFAULTS as DARTS_DEFAULTS, darts_network
from dnas.supernet.genotype import Genotype, GenotypeError
from dnas.supernet.nb201 import NETWORK_DEFAULTS as NB201_DEFAULTS, nb201_network
from dnas.supernet.network import DropPath, Network, Output, count_params, drop_path


def build_network(genotype: Genotype, **options) -> Network:
    """The stand-alone network of ``genotype``, built by its space (``Space.network``) with the
    space's options (``channels``, ``cells_per_stage``/``layers``, ``num_classes``,
    ``in_channels``, ...; an unknown option is an error naming the valid ones)."""
    from dnas.supernet.spaces import SPACES

    space = getattr(genotype, "space", None)
    if space == "choices":
        raise GenotypeError("a user model's genotype has no built-in network: dnas.fix(model, genotype) "
                            "gives the model with only the chosen candidates")
    if space not in SPACES or not hasattr(SPACES[space][0], "network"):
        raise GenotypeError(f"build_network: not a genotype of a built-in space: "
                            f"{type(genotype).__name__} {genotype!r}")
    return SPACES[space][0].network(genotype, **options)


__all__ = ["Network", "Output", "DropPath", "build_network", "nb201_network", "darts_network", "chain_network",
           "drop_path", "count_params", "NB201_DEFAULTS", "DARTS_DEFAULTS"]
