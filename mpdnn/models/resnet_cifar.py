"""ResNet-20 for CIFAR-10 exactly as the authors' code (docs/method.md §7).

stem conv3×3/16 → BN → act; three stages of three basic blocks, widths 16/32/64, strides
1/2/2; block = conv3×3 → BN → act → conv3×3 → BN → (+ shortcut) → act. Shortcut "option A":
stride-2 spatial subsampling plus zero-padding of the new channels (no projection conv). Head:
global average pool → linear 64→10 with bias. Convs have no bias; BN momentum 0.9, eps 1e-5.
Every ReLU is an unsigned activation site (19 in all), every conv and the linear layer a
weight site: all quantizable by rules (:func:`mpdnn.nn.quantize_model`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mpdnn.nn import ActQuant, QConv, QLinear, record_activation_shapes


def batch_norm(features: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
    """BatchNorm as in the authors' code: momentum 0.9, eps 1e-5."""
    return nnx.BatchNorm(features, momentum=0.9, epsilon=1e-5, rngs=rngs)


def residual_stages(
    make_block: Callable[..., nnx.Module],
    depths: Sequence[int],
    widths: Sequence[int],
    in_features: int,
    *,
    rngs: nnx.Rngs,
) -> tuple[nnx.List, int]:
    """Stages of residual blocks: stage i has ``depths[i]`` blocks of width ``widths[i]``,
    the first block of every stage but the first strides 2. Returns the stages and the
    output width. Shared by the CIFAR and ImageNet ResNets."""
    stages = []
    for i, (depth, features) in enumerate(zip(depths, widths, strict=True)):
        stage = []
        for j in range(depth):
            stride = 2 if (i > 0 and j == 0) else 1
            stage.append(make_block(in_features, features, stride, rngs=rngs))
            in_features = features
        stages.append(nnx.List(stage))
    return nnx.List(stages), in_features


class ResidualBlock(nnx.Module):
    """conv3×3 → BN → act → conv3×3 → BN → (+ ``shortcut(x)``) → act: the basic block of
    both ResNets; subclasses say what the shortcut is."""

    def __init__(self, in_features: int, features: int, stride: int, *, rngs: nnx.Rngs):
        self.conv1 = QConv(in_features, features, 3, strides=stride, padding=1, rngs=rngs)
        self.bn1 = batch_norm(features, rngs)
        self.act1 = ActQuant()
        self.conv2 = QConv(features, features, 3, padding=1, rngs=rngs)
        self.bn2 = batch_norm(features, rngs)
        self.act2 = ActQuant()

    def shortcut(self, x: jax.Array) -> jax.Array:
        raise NotImplementedError

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.act1(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.act2(y + self.shortcut(x))


class BasicBlockA(ResidualBlock):
    """The basic block with shortcut "option A": stride-2 subsampling plus zero-padded new
    channels, no projection conv (the authors' CIFAR ResNet)."""

    def __init__(self, in_features: int, features: int, stride: int, *, rngs: nnx.Rngs):
        super().__init__(in_features, features, stride, rngs=rngs)
        self.stride = stride
        self.pad_features = features - in_features

    def shortcut(self, x: jax.Array) -> jax.Array:
        if self.stride > 1:
            x = x[:, :: self.stride, :: self.stride, :]
        if self.pad_features:
            half = self.pad_features // 2
            x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (half, self.pad_features - half)))
        return x


class ResNetCifar(nnx.Module):
    """ResNet-(6n+2) for 32×32 inputs; ``depth=20`` is the paper's ResNet-20."""

    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        *,
        rngs: nnx.Rngs,
        input_shape: Sequence[int] = (32, 32, 3),
        widths: Sequence[int] = (16, 32, 64),
    ):
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 (20, 32, 44, 56), got {depth}")
        blocks = (depth - 2) // 6
        self.stem = QConv(input_shape[-1], widths[0], 3, padding=1, rngs=rngs)
        self.stem_bn = batch_norm(widths[0], rngs)
        self.stem_act = ActQuant()
        self.stages, in_features = residual_stages(
            BasicBlockA, [blocks] * len(widths), widths, widths[0], rngs=rngs
        )
        self.head = QLinear(in_features, num_classes, rngs=rngs)
        self.input_shape = tuple(input_shape)
        record_activation_shapes(self, self.input_shape)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.stem_act(self.stem_bn(self.stem(x)))
        for stage in self.stages:
            for block in stage:
                x = block(x)
        return self.head(jnp.mean(x, axis=(1, 2)))


def resnet20(num_classes: int = 10, *, rngs: nnx.Rngs, **kwargs) -> ResNetCifar:
    return ResNetCifar(20, num_classes, rngs=rngs, **kwargs)
