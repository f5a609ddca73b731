"""Search three layers of your own Flax NNX network, then retrain what was chosen.

A small convolutional network for the embedded 8x8 digits with four choice points:

* ``block1``: which convolution follows the stem (3x3, 5x5, depthwise-separable 3x3, or none: skip);
* ``down``: how the 8x8 map is halved (max or average pooling, or a strided 3x3 convolution);
* ``block2``: a residual branch (3x3 or 1x1 convolution, or ``zero``: no branch at all);
* ``readout``: which feature map the classifier reads (an input choice: block 2's output or
  the downsampled map before it).

Run it (under a minute on 2 CPU cores):

    python examples/nnx_digits.py --out runs/nnx-digits

It prints the chosen architecture, then trains the fixed network from scratch and prints its
test accuracy. docs/own_model.md walks through the code.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import dnas
from dnas.nnx import Choice, Identity, InputChoice, Zero
from dnas.searcher import Hyper


class ConvBN(nnx.Module):
    """ReLU -> k x k convolution -> BatchNorm (the DARTS/NAS-Bench-201 op pattern)."""

    def __init__(self, c_in: int, c_out: int, k: int, rngs: nnx.Rngs, stride: int = 1, groups: int = 1):
        self.conv = nnx.Conv(c_in, c_out, (k, k), strides=stride, feature_group_count=groups, use_bias=False,
                             rngs=rngs)
        self.bn = nnx.BatchNorm(c_out, rngs=rngs)

    def __call__(self, x):
        return self.bn(self.conv(jax.nn.relu(x)))


class SepConv(nnx.Module):
    """Depthwise 3x3 then pointwise 1x1 (MobileNet's separable convolution)."""

    def __init__(self, c: int, rngs: nnx.Rngs):
        self.depthwise = ConvBN(c, c, 3, rngs, groups=c)
        self.pointwise = ConvBN(c, c, 1, rngs)

    def __call__(self, x):
        return self.pointwise(self.depthwise(x))


def max_pool(x):
    return nnx.max_pool(x, (2, 2), strides=(2, 2))


def avg_pool(x):
    return nnx.avg_pool(x, (2, 2), strides=(2, 2))


class DigitsNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, c: int = 16, num_classes: int = 10):
        self.stem = nnx.Conv(1, c, (3, 3), use_bias=False, rngs=rngs)
        self.stem_bn = nnx.BatchNorm(c, rngs=rngs)
        self.block1 = Choice({"conv3": ConvBN(c, c, 3, rngs), "conv5": ConvBN(c, c, 5, rngs),
                              "sep3": SepConv(c, rngs), "skip": Identity()}, label="block1")
        self.down = Choice({"max_pool": max_pool, "avg_pool": avg_pool,
                            "conv3_s2": ConvBN(c, c, 3, rngs, stride=2)}, label="down")
        self.block2 = Choice({"conv3": ConvBN(c, c, 3, rngs), "conv1": ConvBN(c, c, 1, rngs), "zero": Zero()},
                             label="block2")
        self.readout = InputChoice(2, 1, label="readout")
        self.head = nnx.Linear(c, num_classes, rngs=rngs)

    def __call__(self, x):
        h = self.block1(self.stem_bn(self.stem(x)))
        d = self.down(h)
        r = d + self.block2(d)
        features = self.readout([r, d])
        return self.head(jax.nn.relu(features).mean(axis=(1, 2)))


def space(in_channels: int = 1, num_classes: int = 10, channels: int = 16):
    """The network as a space factory, for the command line:
    ``dnas search --space examples.nnx_digits:space`` (from the repository root)."""
    if in_channels != 1:
        raise ValueError(f"DigitsNet's stem reads 1 channel, the data has {in_channels}")
    return DigitsNet(nnx.Rngs(0), c=channels, num_classes=num_classes)


def retrain(model: nnx.Module, epochs: int, seed: int = 0, batch_size: int = 64, lr: float = 0.05):
    """Train the fixed network from its initial weights on the digits' training split (SGD,
    cosine schedule); returns its test accuracy."""
    from dnas.data import load_dataset

    data = load_dataset("digits")
    steps = epochs * (len(data.train_y) // batch_size)
    opt = nnx.Optimizer(model, optax.sgd(optax.cosine_decay_schedule(lr, steps), momentum=0.9), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, x, y):
        def loss_fn(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    rng = np.random.default_rng(seed)
    model.train()
    for _ in range(epochs):
        order = rng.permutation(len(data.train_y))
        for i in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[i:i + batch_size]
            step(model, opt, jnp.asarray(data.train_x[idx]), jnp.asarray(data.train_y[idx]))
    model.eval()
    logits = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(data.test_x))
    return float(jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(data.test_y)))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="output directory of the search (default runs/<timestamp>)")
    p.add_argument("--relaxation", default="darts")
    p.add_argument("--epochs", type=int, default=15, help="search epochs")
    p.add_argument("--a-lr", type=float, default=0.01, help="architecture learning rate (Adam)")
    p.add_argument("--retrain-epochs", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    model = DigitsNet(nnx.Rngs(args.seed))
    result = dnas.search(model, "digits", relaxation=args.relaxation, epochs=args.epochs, out=args.out,
                         seed=args.seed, hyper=Hyper(a_lr=args.a_lr), progress=False)
    print(f"searched in {time.perf_counter() - t0:.0f} s; outputs in {result.out}/")
    print(f"chosen: {result.genotype}")
    print(f"supernet validation accuracy (last epoch): {result.summary['final']['val_acc']:.3f}, "
          f"mean entropy of the choices: {result.summary['final']['entropy']:.3f} nats")

    t1 = time.perf_counter()
    fixed = dnas.fix(DigitsNet(nnx.Rngs(args.seed + 1)), result.genotype)   # fresh weights, chosen ops only
    params = sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(nnx.state(fixed, nnx.Param)))
    acc = retrain(fixed, args.retrain_epochs, args.seed)
    print(f"fixed network: {params:,} parameters, test accuracy {acc:.3f} after {args.retrain_epochs} epochs "
          f"({time.perf_counter() - t1:.0f} s)")


if __name__ == "__main__":
    main()
