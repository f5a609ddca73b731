"""A user's plugin, as a separate package would ship it: a search space (a Flax NNX model with
its own candidate op) and a relaxation, loaded by ``dnas search --space dnas_test_plugin:space
--relaxation dnas_test_plugin:sharp_softmax`` without any edit of dnas (tests/test_nnx.py)."""
import jax
import jax.numpy as jnp
from flax import nnx

from dnas.nnx import Choice, Identity, Zero
from dnas.relaxations import Relaxation, dense_mix, init_alpha


class GatedConv(nnx.Module):
    """A candidate op dnas does not know: a 3x3 convolution gated by a learnt sigmoid."""

    def __init__(self, c: int, rngs: nnx.Rngs):
        self.conv = nnx.Conv(c, c, (3, 3), rngs=rngs)
        self.gate = nnx.Param(jnp.zeros((c,)))

    def __call__(self, x):
        return jax.nn.sigmoid(self.gate[...]) * self.conv(x)


class Tiny(nnx.Module):
    def __init__(self, in_channels: int, num_classes: int, width: int, rngs: nnx.Rngs):
        self.stem = nnx.Conv(in_channels, width, (3, 3), rngs=rngs)
        self.block = Choice({"gated": GatedConv(width, rngs), "conv1": nnx.Conv(width, width, (1, 1), rngs=rngs),
                             "skip": Identity(), "zero": Zero()}, label="block")
        self.head = nnx.Linear(width, num_classes, rngs=rngs)

    def __call__(self, x):
        h = jax.nn.relu(self.stem(x))
        return self.head(jax.nn.relu(self.block(h)).mean((1, 2)))


def space(in_channels: int, num_classes: int, width: int = 8):
    return Tiny(in_channels, num_classes, width, nnx.Rngs(0))


def sharp_softmax(temperature: float = 1.0) -> Relaxation:
    """DARTS with a tempered softmax, softmax(α / T): a relaxation dnas does not ship."""
    def probs(arch):
        return {g: jax.nn.softmax(a / temperature, axis=-1) for g, a in arch.items()}
    return Relaxation(name="sharp_softmax", init=init_alpha, sample=lambda arch, key, progress: probs(arch),
                      mix=dense_mix, eval_sample=probs, probs=probs)
