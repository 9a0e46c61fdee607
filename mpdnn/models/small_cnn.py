"""A small quantizable CNN for tiny images (the default experiment's 8×8 digits).

conv3×3/``widths[0]`` → BN → act, then one stride-2 conv3×3 → BN → act per further width,
then global average pool → linear with bias. Every conv and the linear layer are weight
sites, every activation an unsigned site, exactly like ResNet-20 (docs/method.md §7) but small
enough
to train in seconds on a laptop CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mpdnn.models.resnet_cifar import batch_norm
from mpdnn.nn import ActQuant, QConv, QLinear, record_activation_shapes


class ConvBlock(nnx.Module):
    """conv3×3 (no bias) → BN → activation site."""

    def __init__(self, in_features: int, features: int, stride: int, *, rngs: nnx.Rngs):
        self.conv = QConv(in_features, features, 3, strides=stride, padding=1, rngs=rngs)
        self.bn = batch_norm(features, rngs)
        self.act = ActQuant()

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.act(self.bn(self.conv(x)))


class SmallCNN(nnx.Module):
    """``len(widths)`` conv blocks (the first at stride 1, the rest at stride 2) and a head."""

    def __init__(
        self,
        num_classes: int = 10,
        *,
        rngs: nnx.Rngs,
        input_shape: Sequence[int] = (8, 8, 1),
        widths: Sequence[int] = (16, 32, 32),
    ):
        if not widths:
            raise ValueError("SmallCNN needs at least one conv width")
        blocks, in_features = [], input_shape[-1]
        for i, features in enumerate(widths):
            blocks.append(ConvBlock(in_features, features, 1 if i == 0 else 2, rngs=rngs))
            in_features = features
        self.blocks = nnx.List(blocks)
        self.head = QLinear(in_features, num_classes, rngs=rngs)
        self.input_shape = tuple(input_shape)
        record_activation_shapes(self, self.input_shape)

    def __call__(self, x: jax.Array) -> jax.Array:
        for block in self.blocks:
            x = block(x)
        return self.head(jnp.mean(x, axis=(1, 2)))


def small_cnn(num_classes: int = 10, *, rngs: nnx.Rngs, **kwargs) -> SmallCNN:
    return SmallCNN(num_classes, rngs=rngs, **kwargs)
