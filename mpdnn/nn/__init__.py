"""Flax NNX layers that own quantizer parameters and call :mod:`mpdnn.quantizers`."""

from mpdnn.nn.layers import (
    ActQuant,
    LogitScale,
    QConv,
    QLinear,
    QuantizedWeights,
    identity,
    record_activation_shapes,
    relu,
    relu6,
    set_compute_dtype,
)
from mpdnn.nn.quantizer import FLOAT, QuantConfig, Quantizer, QuantParam, QuantState
from mpdnn.nn.rules import Rule, quantizable_sites, quantize_model

__all__ = [
    "FLOAT",
    "ActQuant",
    "LogitScale",
    "QConv",
    "QLinear",
    "QuantConfig",
    "QuantParam",
    "QuantState",
    "QuantizedWeights",
    "Quantizer",
    "Rule",
    "identity",
    "quantizable_sites",
    "quantize_model",
    "record_activation_shapes",
    "relu",
    "relu6",
    "set_compute_dtype",
]
