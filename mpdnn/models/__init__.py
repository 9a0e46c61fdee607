"""The paper's networks, built float and quantizable by rules (:mod:`mpdnn.nn.rules`)."""

from __future__ import annotations

from collections.abc import Callable

from flax import nnx

from mpdnn.models.convert import load_torchvision as load_torchvision
from mpdnn.models.mobilenet_v2 import MobileNetV2, mobilenet_v2
from mpdnn.models.resnet_cifar import ResNetCifar, resnet20
from mpdnn.models.resnet_imagenet import ResNetImageNet, resnet18
from mpdnn.models.small_cnn import SmallCNN, small_cnn

#: name → constructor ``(num_classes, *, rngs, **kwargs) -> nnx.Module``.
MODELS: dict[str, Callable[..., nnx.Module]] = {
    "resnet20": resnet20,
    "resnet18": resnet18,
    "mobilenet_v2": mobilenet_v2,
    "small_cnn": small_cnn,
}


def build(name: str, *, rngs: nnx.Rngs, **kwargs) -> nnx.Module:
    """Build a float model by name (``resnet20``, ``resnet18``, ``mobilenet_v2``,
    ``small_cnn``)."""
    try:
        make = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}") from None
    return make(rngs=rngs, **kwargs)


__all__ = [
    "MODELS",
    "MobileNetV2",
    "ResNetCifar",
    "ResNetImageNet",
    "SmallCNN",
    "build",
    "mobilenet_v2",
    "resnet18",
    "resnet20",
    "small_cnn",
]
