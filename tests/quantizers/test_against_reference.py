"""Values and straight-through gradients of every parametrization against ``reference.py``.

The reference is an independent float64 NumPy reading of docs/method.md §1–3 with the closed-form
gradients of §1 chained by hand through §2 (finite differences of a step function mean
nothing). θ is drawn inside and outside its box; x covers the inside and outside of the range
and the exact bounds, where ties must go to the bound.
"""

from __future__ import annotations

import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mpdnn.quantizers as mq
from tests.quantizers.cases import (
    all_spec_kwargs,
    check_against_reference,
    check_bitwidths,
    spec_id,
)

SPECS = all_spec_kwargs()


@pytest.mark.parametrize("kw", SPECS, ids=spec_id)
def test_values_and_gradients_match_reference(kw, maybe_jit):
    rng = np.random.default_rng(zlib.crc32(spec_id(kw).encode()))
    check_against_reference(mq.QuantSpec(**kw), rng, wrap=maybe_jit)


def test_bitwidth_matches_reference(maybe_jit):
    errors = check_bitwidths(np.random.default_rng(7), wrap=maybe_jit)
    assert not errors, errors[:5]


# Hand-computed cases (no code involved): docs/method.md §1.1 gradients inside and outside the
# range.
def test_u3_closed_form_by_hand():
    spec = mq.QuantSpec(family="uniform", parametrization="d_qmax", signed=True)
    # raw d = 0.3 snaps to 0.25 (log2 0.3 = -1.74 -> -2); qmax = 1.0.
    x = jnp.array([0.3, 0.9, 1.7, -1.2, -0.05])
    theta = {"d": jnp.float32(0.3), "qmax": jnp.float32(1.0)}
    np.testing.assert_array_equal(mq.quantize(x, theta, spec), [0.25, 1.0, 1.0, -1.0, 0.0])
    gx, gt = jax.grad(lambda x, t: mq.quantize(x, t, spec).sum(), argnums=(0, 1))(x, theta)
    np.testing.assert_array_equal(gx, [1, 1, 0, 0, 1])
    # dQ/dd = round(c/d) - c/d: (1 - 1.2) + (4 - 3.6) + 0 + 0 + (0 + 0.2) = 0.4; chain 0.25/0.3.
    np.testing.assert_allclose(gt["d"], 0.4 * 0.25 / 0.3, rtol=1e-5)
    # dQ/dqmax = +1 (x=1.7) - 1 (x=-1.2).
    np.testing.assert_allclose(gt["qmax"], 0.0, atol=1e-7)
    g_qmax = jax.grad(lambda t: mq.quantize(x[2:3], t, spec).sum())(theta)["qmax"]
    assert float(g_qmax) == 1.0


def test_p3_closed_form_by_hand():
    spec = mq.QuantSpec(family="pow2", parametrization="qmin_qmax", signed=True)
    theta = {"qmin": jnp.float32(0.125), "qmax": jnp.float32(1.0)}
    x = jnp.array([0.05, 0.3, -0.7, 3.0, 0.0])
    # 0.05 < qmin -> qmin; 0.3 -> 2**round(-1.74) = 0.25; -0.7 -> -2**round(-0.51) = -0.5;
    # 3 >= qmax -> 1; 0 -> +qmin (sign(0) = +1, no zero without with_zero).
    np.testing.assert_array_equal(mq.quantize(x, theta, spec), [0.125, 0.25, -0.5, 1.0, 0.125])
    gx, gt = jax.grad(lambda x, t: mq.quantize(x, t, spec).sum(), argnums=(0, 1))(x, theta)
    np.testing.assert_allclose(gx, [0, 0.25 / 0.3, 0.5 / 0.7, 0, 0], rtol=1e-6)
    assert float(gt["qmin"]) == 2.0  # x = 0.05 and x = 0 (both sign +1)
    assert float(gt["qmax"]) == 1.0


def test_pow2_with_zero_threshold_by_hand():
    spec = mq.QuantSpec(family="pow2", parametrization="qmin_qmax", signed=False, with_zero=True)
    theta = {"qmin": jnp.float32(0.25), "qmax": jnp.float32(4.0)}
    # qmin/√2 = 0.1768: 0.17 -> 0, 0.18 -> qmin; negatives pass a ReLU first.
    x = jnp.array([0.17, 0.18, -3.0, 5.0])
    np.testing.assert_array_equal(mq.quantize(x, theta, spec), [0.0, 0.25, 0.0, 4.0])
    gt = jax.grad(lambda t: mq.quantize(x, t, spec).sum())(theta)
    assert float(gt["qmin"]) == 1.0 and float(gt["qmax"]) == 1.0


def test_unsigned_uniform_replaces_relu():
    spec = mq.QuantSpec(family="uniform", parametrization="d_qmax", signed=False)
    theta = {"d": jnp.float32(0.5), "qmax": jnp.float32(2.0)}
    x = jnp.array([-1.0, 0.0, 0.6, 2.5])
    np.testing.assert_array_equal(mq.quantize(x, theta, spec), [0.0, 0.0, 0.5, 2.0])
    gx = jax.grad(lambda x: mq.quantize(x, theta, spec).sum())(x)
    np.testing.assert_array_equal(gx, [0.0, 0.0, 1.0, 0.0])  # dQ/dx = 0 for x <= 0
    g_qmax = jax.grad(lambda t: mq.quantize(x, t, spec).sum())(theta)["qmax"]
    assert float(g_qmax) == 1.0  # only x = 2.5; no -1 branch when unsigned


def test_u1_gradient_grows_with_bits():
    """Paper §2.3: U1's dQ/db grows exponentially with b; U3's gradients stay bounded."""
    x = jnp.full((1,), 100.0)  # saturated: dQ/dqmax = 1
    spec = mq.QuantSpec(family="uniform", parametrization="b_d", signed=True)
    grads = [
        float(jax.grad(lambda t: mq.quantize(x, t, spec).sum())({"b": b, "d": 0.125})["b"])
        for b in (3.0, 5.0, 7.0)
    ]
    # qmax = d (2**(b-1) - 1): dqmax/db = d 2**(b-1) ln 2.
    np.testing.assert_allclose(
        grads, [0.125 * 2 ** (b - 1) * math.log(2) for b in (3, 5, 7)], rtol=1e-6
    )


def test_bitwidth_gradients_closed_form():
    """docs/method.md §3 with straight-through ceil/round: the gradient of the smooth inner
    formula.
    """
    ln2 = math.log(2.0)
    # U3 signed: d raw 0.1 -> 0.125, qmax 1.0: q/d = 8, b = ceil(log2 9 + 1) = 5.
    spec = mq.QuantSpec()
    theta = {"d": jnp.float32(0.1), "qmax": jnp.float32(1.0)}
    b, g = jax.value_and_grad(lambda t: mq.bitwidth(t, spec))(theta)
    assert float(b) == 5.0
    d, qmax = 0.125, 1.0
    np.testing.assert_allclose(g["qmax"], 1 / (9 * ln2) / d, rtol=1e-6)
    np.testing.assert_allclose(g["d"], -qmax / d**2 / (9 * ln2) * (0.125 / 0.1), rtol=1e-6)
    # P3: qmin 2^-7, qmax raw 3.0 -> 4: L = log2(512) + 1 = 10, b = ceil(log2 10 + 1) = 5.
    spec = mq.QuantSpec(family="pow2", parametrization="qmin_qmax")
    theta = {"qmin": jnp.float32(2**-7), "qmax": jnp.float32(3.0)}
    b, g = jax.value_and_grad(lambda t: mq.bitwidth(t, spec))(theta)
    assert float(b) == 5.0
    np.testing.assert_allclose(g["qmax"], 1 / (10 * ln2) / (4.0 * ln2) * (4.0 / 3.0), rtol=1e-6)
    np.testing.assert_allclose(g["qmin"], -1 / (10 * ln2) / (2**-7 * ln2), rtol=1e-6)
    # At b_min the max() passes no gradient (NNabla's maximum_scalar is strict).
    spec = mq.QuantSpec()
    g = jax.grad(lambda t: mq.bitwidth(t, spec))({"d": jnp.float32(0.5), "qmax": jnp.float32(0.5)})
    assert float(g["d"]) == 0.0 and float(g["qmax"]) == 0.0
    # b-based: gradient 1 strictly inside the box, 0 outside.
    spec = mq.QuantSpec(parametrization="b_d")
    for raw, expected in [(4.3, 1.0), (9.0, 0.0), (1.0, 0.0)]:
        g = jax.grad(lambda t: mq.bitwidth(t, spec))({"b": jnp.float32(raw), "d": jnp.float32(0.1)})
        assert float(g["b"]) == expected
