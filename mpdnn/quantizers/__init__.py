"""Quantizers of Uhlich et al. (ICLR 2020) as pure JAX functions (docs/method.md §1–4, §10).

>>> import jax.numpy as jnp, mpdnn.quantizers as mq
>>> spec = mq.QuantSpec(family="uniform", parametrization="d_qmax", signed=True)
>>> mq.quantize(jnp.array([0.3, -2.0]), {"d": 0.25, "qmax": 1.0}, spec)
Array([ 0.25, -1.  ], dtype=float32)
>>> mq.bitwidth({"d": 0.25, "qmax": 1.0}, spec)
Array(4., dtype=float32)

This package imports nothing but JAX: no Flax, TensorFlow, tfds or orbax.
"""

from mpdnn.quantizers._ste import (
    box,
    ceil_log2_ste,
    ceil_ste,
    exp2_int,
    log2_exact,
    pow2_round,
    pow2_ste,
    round_half_away,
    round_ste,
)
from mpdnn.quantizers.api import bitwidth, quantize
from mpdnn.quantizers.init import init_activation_theta, init_weight_theta
from mpdnn.quantizers.parametrizations import Pow2Params, UniformParams, canonical
from mpdnn.quantizers.spec import (
    PAPER_NAMES,
    PARAMETRIZATIONS,
    SHORT_NAMES,
    QuantSpec,
    activation_spec,
    weight_spec,
)

__all__ = [
    "PAPER_NAMES",
    "PARAMETRIZATIONS",
    "SHORT_NAMES",
    "Pow2Params",
    "QuantSpec",
    "UniformParams",
    "activation_spec",
    "bitwidth",
    "box",
    "canonical",
    "ceil_log2_ste",
    "ceil_ste",
    "exp2_int",
    "init_activation_theta",
    "init_weight_theta",
    "log2_exact",
    "pow2_round",
    "pow2_ste",
    "quantize",
    "round_half_away",
    "round_ste",
    "weight_spec",
]
