"""The models the transform tests share: ResNet-20 and a tiny net with every kind of
quantizer."""

from __future__ import annotations

import pytest
from flax import nnx

from mpdnn import models, nn
from mpdnn.optim import Accounting

Q = nn.QuantConfig


@pytest.fixture(scope="module")
def resnet():
    """ResNet-20, U3 weights and activations learned from 4 bits (float-net init)."""
    model = models.build("resnet20", rngs=nnx.Rngs(0))
    nn.quantize_model(
        model,
        [nn.Rule(".*", Q(bits=4), kind="weight"), nn.Rule(".*", Q(bits=4), kind="activation")],
    )
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return Accounting.from_model(model), params


class Tiny(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.fc1 = nn.QLinear(4, 8, rngs=rngs)
        self.act = nn.ActQuant()
        self.fc2 = nn.QLinear(8, 3, rngs=rngs)
        nn.record_activation_shapes(self, (4,))

    def __call__(self, x):
        return self.fc2(self.act(self.fc1(x)))


@pytest.fixture(scope="module")
def tiny():
    """(accounting, params, model) of :class:`Tiny`: fc1 weights U3, the activation P3, fc2
    weights U1, all from 4 bits."""
    model = Tiny(nnx.Rngs(0))
    nn.quantize_model(
        model,
        [
            nn.Rule("fc1", Q(bits=4), kind="weight"),  # U3
            nn.Rule("act", Q(family="pow2", bits=4), kind="activation"),  # P3
            nn.Rule("fc2", Q(parametrization="b_d", bits=4), kind="weight"),  # U1
        ],
    )
    return Accounting.from_model(model), nnx.to_pure_dict(nnx.state(model, nnx.Param)), model
