"""MobileNetV2 (width 1.0) for ImageNet with the exact torchvision topology (docs/method.md §7).

stem conv3×3/32 stride 2 → BN → ReLU6; 17 inverted residual blocks from the (t, c, n, s)
table :data:`INVERTED_RESIDUAL_SETTING`; block = expand conv1×1 (absent when t = 1) → BN →
ReLU6 → depthwise conv3×3 (stride s on the first block of a row) → BN → ReLU6 → project
conv1×1 → BN (linear bottleneck) → (+ input when stride 1 and in = out channels); final conv
1×1 to 1280 → BN → ReLU6 → global average pool → linear 1280→1000 with bias. Convs have no
bias and padding (k − 1)/2 as torch; BN momentum 0.9 (flax; torch's 0.1), eps 1e-5. Dropout
(torchvision's p = 0.2 before the classifier) is omitted: it is the identity at inference
and a training recipe may add it around the model.

Quantization sites (the authors never released this network; our decisions, docs/method.md §7):

* weights: all 52 convs (stem, depthwise and final included) and the linear layer,
  3,470,760 values;
* unsigned activation sites ``ActQuant(float_fn=relu6)`` replace each ReLU6: the stem, the
  expand (16 blocks) and depthwise (17 blocks) outputs and the final 1280-channel output,
  35 in all. The last one feeds the pool, as ResNet-20's last block output does (docs/method.md §5);
* one signed site ``ActQuant(signed=True, float_fn=identity)`` per block, ``out_act``, on the
  block output: after the residual sum where there is one (10 blocks), else after the project
  BN (7 blocks), 17 in all. The linear bottleneck has no ReLU but feeds the next block's
  expand conv and residual sum or, for the last block, the final conv; so every conv input
  but the image is a site's output, and a residual sum adds two tensors (the block input is
  the previous block's ``out_act``) and is quantized once, not each addend.

Initialisation as torchvision's: He-normal fan-out convs, N(0, 0.01) classifier (its max|W|
is below 7 · 2**-7, so a 4-bit float-net init puts the classifier's step at the d box's lower
edge, 2**-8; the initialiser starts raw θ just inside the box, where it still learns).

Paths: ``stem``, ``blocks.{i}.expand``/``depthwise``/``project`` (torchvision's
``features.{i + 1}``), ``final_conv`` (``features.18``), ``head`` (``classifier.1``).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mpdnn.models.resnet_cifar import batch_norm
from mpdnn.nn import (
    ActQuant,
    QConv,
    QLinear,
    identity,
    initializers,
    record_activation_shapes,
    relu6,
)

#: torchvision's (expansion t, output channels c, repeats n, first stride s), width 1.0.
INVERTED_RESIDUAL_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class InvertedResidual(nnx.Module):
    """[expand 1×1 → BN → ReLU6 →] depthwise 3×3 → BN → ReLU6 → project 1×1 → BN
    [→ + input] → signed site."""

    def __init__(
        self, in_features: int, features: int, stride: int, expansion: int, *, rngs: nnx.Rngs
    ):
        hidden = in_features * expansion
        if expansion != 1:
            self.expand = QConv(in_features, hidden, 1, padding=0, rngs=rngs)
            self.expand_bn = batch_norm(hidden, rngs)
            self.expand_act = ActQuant(float_fn=relu6)
        else:
            self.expand = self.expand_bn = self.expand_act = None
        self.depthwise = QConv(
            hidden, hidden, 3, strides=stride, padding=1, groups=hidden, rngs=rngs
        )
        self.depthwise_bn = batch_norm(hidden, rngs)
        self.depthwise_act = ActQuant(float_fn=relu6)
        self.project = QConv(hidden, features, 1, padding=0, rngs=rngs)
        self.project_bn = batch_norm(features, rngs)
        self.out_act = ActQuant(signed=True, float_fn=identity)
        self.residual = stride == 1 and in_features == features

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x
        if self.expand is not None:
            y = self.expand_act(self.expand_bn(self.expand(y)))
        y = self.depthwise_act(self.depthwise_bn(self.depthwise(y)))
        y = self.project_bn(self.project(y))
        return self.out_act(x + y if self.residual else y)


class MobileNetV2(nnx.Module):
    """MobileNetV2, width 1.0; the (t, c, n, s) table and widths are torchvision's."""

    def __init__(
        self,
        num_classes: int = 1000,
        *,
        rngs: nnx.Rngs,
        input_shape: Sequence[int] = (224, 224, 3),
        stem_features: int = 32,
        final_features: int = 1280,
        setting: Sequence[tuple[int, int, int, int]] = INVERTED_RESIDUAL_SETTING,
    ):
        self.stem = QConv(input_shape[-1], stem_features, 3, strides=2, padding=1, rngs=rngs)
        self.stem_bn = batch_norm(stem_features, rngs)
        self.stem_act = ActQuant(float_fn=relu6)
        blocks, in_features = [], stem_features
        for expansion, features, repeats, stride in setting:
            for j in range(repeats):
                blocks.append(
                    InvertedResidual(
                        in_features, features, stride if j == 0 else 1, expansion, rngs=rngs
                    )
                )
                in_features = features
        self.blocks = nnx.List(blocks)
        self.final_conv = QConv(in_features, final_features, 1, padding=0, rngs=rngs)
        self.final_bn = batch_norm(final_features, rngs)
        self.final_act = ActQuant(float_fn=relu6)
        self.head = QLinear(
            final_features, num_classes, rngs=rngs, kernel_init=initializers.normal(0.01)
        )
        self.input_shape = tuple(input_shape)
        record_activation_shapes(self, self.input_shape)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.stem_act(self.stem_bn(self.stem(x)))
        for block in self.blocks:
            x = block(x)
        x = self.final_act(self.final_bn(self.final_conv(x)))
        return self.head(jnp.mean(x, axis=(1, 2)))


def mobilenet_v2(num_classes: int = 1000, *, rngs: nnx.Rngs, **kwargs) -> MobileNetV2:
    return MobileNetV2(num_classes, rngs=rngs, **kwargs)
