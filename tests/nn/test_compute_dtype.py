"""bfloat16 conv/linear operands (nn.set_compute_dtype): exact for quantized layers <= 8 bits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mpdnn import models, nn


def quantized_conv(bits: int, groups: int = 1) -> nn.QConv:
    conv = nn.QConv(16, 32, 3, groups=groups, rngs=nnx.Rngs(0))
    nn.quantize_model(conv, [nn.Rule(".*", nn.QuantConfig(mode="fixed", bits=bits), kind="weight")])
    return conv


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("groups", [1, 16])
def test_bf16_operands_are_exact_for_quantized_inputs_and_weights(bits, groups):
    conv = quantized_conv(bits, groups)
    # An unsigned 8-bit activation: integers 0..255 times a power-of-two step.
    codes = jax.random.randint(jax.random.key(1), (2, 8, 8, 16), 0, 256)
    x = codes.astype(jnp.float32) * 2.0**-5
    ref = conv(x)
    assert nn.set_compute_dtype(conv, jnp.bfloat16) == 1
    out = conv(x)
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


def test_linear_and_a_whole_network():
    model = models.build("resnet20", rngs=nnx.Rngs(0))
    nn.quantize_model(
        model,
        [
            nn.Rule(".*", nn.QuantConfig(bits=4), kind="weight"),
            nn.Rule(".*", nn.QuantConfig(bits=4), kind="activation"),
        ],
    )
    model.eval()
    x = jax.random.uniform(jax.random.key(2), (4, 32, 32, 3), minval=-1, maxval=1)
    ref = model(x)
    assert nn.set_compute_dtype(model, jnp.bfloat16) == 20  # 19 convs and the classifier
    out = model(x)
    assert out.dtype == jnp.float32
    # Only the network input (unquantized) is rounded to bfloat16: close, not equal.
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=0.05, atol=0.05)
    assert nn.set_compute_dtype(model, None) == 20
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(ref))


def test_gradients_flow_in_bf16():
    conv = quantized_conv(4)
    nn.set_compute_dtype(conv, jnp.bfloat16)
    x = jnp.ones((1, 4, 4, 16))

    def loss(m):
        return jnp.sum(m(x) ** 2)

    grads = nnx.grad(loss)(conv)
    g = grads["kernel"][...]
    assert g.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(g)))
