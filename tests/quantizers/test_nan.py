"""NaN in, NaN out: a diverged input or quantizer must show, never be rounded onto the grid.

Before, a pow2 quantizer mapped NaN inputs to 0.0 (not even a value of a zero-less grid) and
finite outputs came from NaN θ, and ``bitwidth`` of a NaN θ reported b_min (2 bits), so a
NaN model was accounted as a 2-bit one. The finite values that the NaN elements sit beside
come from the float64 reference (``reference.py``); the NaN expectations are the rule itself.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import mpdnn.quantizers as mq
from tests.quantizers import reference as ref
from tests.quantizers.cases import all_spec_kwargs, spec_id, theta_cases

SPECS = all_spec_kwargs()
NAN = float("nan")
# Away from every rounding tie of the θ used below (THETA_CHOICES' first, in-box case).
X_FINITE = np.array([0.0, 0.3, -0.7, 1.1, -2.9, 5.0, 0.013, -0.004], np.float32)


def _theta(spec):
    return theta_cases(spec, 1, np.random.default_rng(0))[0]


def _jnp(theta):
    return {k: jnp.float32(v) for k, v in theta.items()}


@pytest.mark.parametrize("kw", SPECS, ids=spec_id)
def test_nan_input_gives_nan_output_and_leaves_the_rest_alone(kw, maybe_jit):
    spec = mq.QuantSpec(**kw)
    theta = _theta(spec)
    x = np.concatenate([[NAN], X_FINITE[:4], [-NAN], X_FINITE[4:]]).astype(np.float32)
    nan = np.isnan(x)
    y = np.asarray(maybe_jit(lambda x, t: mq.quantize(x, t, spec))(jnp.asarray(x), _jnp(theta)))
    assert np.isnan(y[nan]).all(), y
    expected, _, _ = ref.quantize_and_grads(x[~nan], theta, spec, np.ones((~nan).sum()))
    np.testing.assert_allclose(y[~nan], expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("kw", SPECS, ids=spec_id)
def test_a_nan_theta_makes_the_quantizer_nan(kw, maybe_jit):
    spec = mq.QuantSpec(**kw)
    q = maybe_jit(lambda x, t: mq.quantize(x, t, spec))
    for name in spec.theta_names:
        theta = {**_theta(spec), name: NAN}
        y = np.asarray(q(jnp.asarray(X_FINITE), _jnp(theta)))
        assert np.isnan(y).all(), (name, y)


@pytest.mark.parametrize("kw", SPECS, ids=spec_id)
def test_a_nan_theta_has_nan_bits(kw, maybe_jit):
    spec = mq.QuantSpec(**kw)
    bits = maybe_jit(lambda t: mq.bitwidth(t, spec))
    assert float(bits(_jnp(_theta(spec)))) == ref.bits(_theta(spec), spec)  # finite: unchanged
    for name in spec.theta_names:
        theta = {**_theta(spec), name: NAN}
        assert np.isnan(float(bits(_jnp(theta)))), name


@pytest.mark.parametrize("family", ["uniform", "pow2"])
def test_per_channel_nan_stays_in_its_channel(family, maybe_jit):
    spec = mq.weight_spec(family)
    if family == "uniform":
        channels = [{"d": NAN, "qmax": 1.0}, {"d": 0.1, "qmax": 1.0}, {"d": 0.3, "qmax": 2.0}]
    else:
        channels = [
            {"qmin": 0.01, "qmax": NAN},
            {"qmin": 0.05, "qmax": 1.1},
            {"qmin": 0.1, "qmax": 2.0},
        ]
    theta = {k: jnp.array([c[k] for c in channels], jnp.float32) for k in spec.theta_names}
    x = np.stack([X_FINITE] * 3, axis=1)
    y = np.asarray(maybe_jit(lambda x, t: mq.quantize(x, t, spec))(jnp.asarray(x), theta))
    bits = np.asarray(maybe_jit(lambda t: mq.bitwidth(t, spec))(theta))
    assert np.isnan(y[:, 0]).all() and np.isnan(bits[0])
    for c in (1, 2):
        expected, _, _ = ref.quantize_and_grads(x[:, c], channels[c], spec, np.ones(len(x)))
        np.testing.assert_allclose(y[:, c], expected, rtol=1e-6, atol=0)
        assert bits[c] == ref.bits(channels[c], spec)


def test_learned_b_with_a_nan_step_has_nan_bits_of_the_same_shape():
    """round(clip(b)) never reads d: a NaN d must still show in the bits, per channel where
    b is per channel, and for the whole tensor where b is one scalar."""
    spec = mq.weight_spec("uniform", "b_d")
    per_tensor = mq.bitwidth({"b": 4.0, "d": jnp.array([0.1, NAN])}, spec)
    assert per_tensor.shape == () and np.isnan(float(per_tensor))
    per_channel = np.asarray(
        mq.bitwidth({"b": jnp.array([4.0, 3.0]), "d": jnp.array([NAN, 0.1])}, spec)
    )
    assert np.isnan(per_channel[0]) and per_channel[1] == 3.0  # round(clip(3.0)) = 3


def test_nan_and_infinite_bit_counts_pass_through_the_exact_ceil_log2():
    # frexp gives NaN and inf the exponent 0; a bit count must not read them as 0 bits.
    got = np.asarray(mq.ceil_log2_ste(jnp.array([NAN, np.inf, 8.0, 9.0], jnp.float32)))
    assert np.isnan(got[0]) and got[1] == np.inf
    np.testing.assert_array_equal(got[2:], [3.0, 4.0])  # ceil(log2 8) = 3, ceil(log2 9) = 4


def test_snapping_a_nan_parameter_keeps_it_nan():
    got = np.asarray(mq.pow2_ste(jnp.array([NAN, 0.3, 3.0], jnp.float32)))
    assert np.isnan(got[0])
    np.testing.assert_array_equal(got[1:], [0.25, 4.0])  # log2 0.3 = -1.74 -> -2; log2 3 -> 2
    assert np.isnan(float(mq.exp2_int(jnp.float32(NAN))))
