"""ResNet-18 for ImageNet with the exact torchvision topology (docs/method.md §7).

stem conv7×7/64 stride 2 pad 3 → BN → act → max pool 3×3 stride 2 pad 1; four stages of two
basic blocks, widths 64/128/256/512, strides 1/2/2/2; block = conv3×3 → BN → act → conv3×3 →
BN → (+ shortcut) → act, the shortcut a 1×1 conv (stride s) → BN where the shape changes
(torchvision's ``downsample``), else the identity. Head: global average pool → linear
512→1000 with bias. Convs have no bias; BN momentum 0.9 (flax; torch's 0.1), eps 1e-5.

Quantization sites (the authors never released this network; our decisions, docs/method.md §7):

* weights: all 20 convs (stem and the three ``downsample`` convs included) and the linear
  layer, 11,679,912 values;
* activations: every ReLU is an unsigned :class:`~mpdnn.nn.ActQuant` site, 17 in all (stem
  plus two per block). Every block output passes a ReLU, so no signed site is needed: each
  conv input is the output of a site — except the first blocks' input, the max pool's output.
  That one gets **no** site: it is the max of quantized, non-negative values, so it already
  lies on the stem site's grid (and the pool's −∞ padding never wins a window), and a second
  quantizer could only re-round it. It is not counted in the activation memory; it is a
  quarter of the stem output, which is the largest tensor either way.

Paths read as torchvision's, e.g. ``stem``, ``stages.0.1.conv1``, ``stages.1.0.downsample``,
``head`` (torchvision: ``conv1``, ``layer1.1.conv1``, ``layer2.0.downsample.0``, ``fc``).
Torchvision initialises the classifier differently; that only matters when training from
scratch, not when loading pretrained weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mpdnn.models.resnet_cifar import ResidualBlock, batch_norm, residual_stages
from mpdnn.nn import ActQuant, QConv, QLinear, record_activation_shapes


class BasicBlock(ResidualBlock):
    """torchvision's ``BasicBlock``: the shortcut is the identity, or a 1×1 conv (stride s)
    + BN where the shape changes."""

    def __init__(self, in_features: int, features: int, stride: int, *, rngs: nnx.Rngs):
        super().__init__(in_features, features, stride, rngs=rngs)
        if stride != 1 or in_features != features:
            self.downsample = QConv(in_features, features, 1, strides=stride, padding=0, rngs=rngs)
            self.downsample_bn = batch_norm(features, rngs)
        else:
            self.downsample = self.downsample_bn = None

    def shortcut(self, x: jax.Array) -> jax.Array:
        return x if self.downsample is None else self.downsample_bn(self.downsample(x))


class ResNetImageNet(nnx.Module):
    """ResNet with basic blocks for 224×224 inputs; ``blocks=(2, 2, 2, 2)`` is ResNet-18."""

    def __init__(
        self,
        blocks: Sequence[int] = (2, 2, 2, 2),
        num_classes: int = 1000,
        *,
        rngs: nnx.Rngs,
        input_shape: Sequence[int] = (224, 224, 3),
        widths: Sequence[int] = (64, 128, 256, 512),
    ):
        if len(blocks) != len(widths):
            raise ValueError(f"{len(blocks)} stage depths but {len(widths)} widths")
        self.stem = QConv(input_shape[-1], widths[0], 7, strides=2, padding=3, rngs=rngs)
        self.stem_bn = batch_norm(widths[0], rngs)
        self.stem_act = ActQuant()
        self.stages, in_features = residual_stages(BasicBlock, blocks, widths, widths[0], rngs=rngs)
        self.head = QLinear(in_features, num_classes, rngs=rngs)
        self.input_shape = tuple(input_shape)
        record_activation_shapes(self, self.input_shape)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.stem_act(self.stem_bn(self.stem(x)))
        # Max of on-grid values stays on the grid: no activation site here (module docstring).
        x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage in self.stages:
            for block in stage:
                x = block(x)
        return self.head(jnp.mean(x, axis=(1, 2)))


def resnet18(num_classes: int = 1000, *, rngs: nnx.Rngs, **kwargs) -> ResNetImageNet:
    return ResNetImageNet((2, 2, 2, 2), num_classes, rngs=rngs, **kwargs)
