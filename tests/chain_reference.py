"""Reference values of the ``chain`` space from the code before it was declared with ``dnas.nnx``
(commit 20c0786, where the supernet was still a ``SearchSpace`` over dnas's layer kit).

That code's supernet initialised its weights (``init(PRNGKey(1))``), which were written into the
NNX model's layout and stored with the input, α and the supernet's logits, loss gradients and
BatchNorm statistics, and the logits of that code's derived network holding the supernet's
chosen ops' weights, in ``tests/data/chain_reference.npz``. ``tests/test_space_reference.py``
checks the current chain against them.

The generator ran at that commit and only there (it builds the old ``SearchSpace``, which no
longer exists): ``git checkout 20c0786 && PYTHONPATH=. python tests/chain_reference.py``.
"""
from __future__ import annotations

from pathlib import Path

#: a small chain: a stem, one stage of two blocks (the first changes the shape, the second keeps
#: it: a residual connection and ``zero`` among its options), a 64-channel head
OPTIONS = dict(in_channels=3, num_classes=5, width_mult=0.25, stage_widths=(24,), stage_depths=(2,),
               stage_strides=(2,), stem_stride=1, last_channels=64)
GENOTYPE = ("mb_k5_e3", "mb_k7_e6")   # block0 (6 options), block1 (7 options)
PATH = Path(__file__).parent / "data" / "chain_reference.npz"
