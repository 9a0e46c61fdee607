"""The initialisers refuse impossible starts in one line and never hide non-finite weights.

Before, ``bits=100`` and ``bits=2.5`` were accepted (a b-based start was clipped to the box
silently), and ``weights`` holding NaN silently gave the random-init θ. The valid range is the
decision written in ``init_weight_theta``'s docstring: a whole number of bits from
``max(b_range[0], 2 signed / 1 unsigned)`` up to ``b_range[1]`` where b is a raw θ (U1, U2,
b-based pow2), up to 24 for U3 and P3, whose inferred bits have no upper cap (docs/method.md §3).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mpdnn.quantizers as mq

INITS = {
    "weight": lambda spec, bits: mq.init_weight_theta(spec, bits),
    "activation": lambda spec, bits: mq.init_activation_theta(spec, bits),
}


def _raises(exc, match, fn, *args, **kwargs):
    with pytest.raises(exc, match=match) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value), str(info.value)
    return str(info.value)


@pytest.mark.parametrize("kind", INITS)
@pytest.mark.parametrize("bits", [2.5, 4.000001, float("nan"), float("inf")], ids=repr)
def test_fractional_bits_are_a_value_error(kind, bits):
    spec = mq.weight_spec() if kind == "weight" else mq.activation_spec()
    _raises(ValueError, "whole number of bits", INITS[kind], spec, bits)


@pytest.mark.parametrize("kind", INITS)
@pytest.mark.parametrize("bits", [True, "4", None, [4]], ids=repr)
def test_bits_that_are_not_a_number_are_a_type_error(kind, bits):
    spec = mq.weight_spec() if kind == "weight" else mq.activation_spec()
    _raises(TypeError, "bits must be", INITS[kind], spec, bits)


@pytest.mark.parametrize(
    "spec, lo, hi",
    [
        (mq.weight_spec("uniform", "b_d"), 2, 8),  # b boxed to the weight box [2, 8]
        (mq.weight_spec("pow2", "b_qmin"), 2, 8),
        (mq.activation_spec("uniform", "b_qmax"), 1, 8),  # activation box [1, 8]
        (mq.weight_spec("uniform"), 2, 24),  # U3: signed grid needs 2; no cap below 24
        (mq.weight_spec("pow2"), 2, 24),
        (mq.activation_spec("uniform"), 1, 24),
        (mq.weight_spec("uniform", b_range=(3, 8)), 3, 24),  # b_min = 3
        (mq.QuantSpec(parametrization="b_d", b_range=(4, 4)), 4, 4),  # TQT's pinned b
    ],
    ids=lambda v: v.describe() if isinstance(v, mq.QuantSpec) else str(v),
)
def test_bits_must_lie_in_the_documented_range(spec, lo, hi):
    init = INITS["weight" if spec.signed else "activation"]
    for bits in (lo, hi, float(lo)):
        theta = init(spec, bits)
        assert set(theta) == set(spec.theta_names)
    for bits in (lo - 1, hi + 1, 100, 0, -4):
        message = _raises(ValueError, "cannot start", init, spec, bits)
        assert f"[{lo}, {hi}]" in message


def test_an_integral_float_is_the_same_start_as_the_int():
    # docs/method.md §4 random init at 4 bits: d0 = 2^-3, qmax0 = 7 d0 = 0.875
    theta = mq.init_weight_theta(mq.weight_spec(), 4.0)
    assert {k: float(v) for k, v in theta.items()} == {"d": 0.125, "qmax": 0.875}
    theta = mq.init_weight_theta(mq.weight_spec(), np.int64(4))
    assert {k: float(v) for k, v in theta.items()} == {"d": 0.125, "qmax": 0.875}


@pytest.mark.parametrize("init", ["init_weight_theta", "init_activation_theta"])
def test_a_spec_given_as_a_string_is_a_type_error(init):
    _raises(
        TypeError, "expects spec to be a mpdnn.quantizers.QuantSpec", getattr(mq, init), "d_qmax", 4
    )


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=repr)
def test_concrete_non_finite_weights_are_a_value_error(bad):
    for family in ("uniform", "pow2"):
        weights = np.array([0.3, bad, -0.5], np.float32)
        _raises(
            ValueError,
            "NaN or inf",
            mq.init_weight_theta,
            mq.weight_spec(family),
            4,
            weights=weights,
        )


def test_empty_and_non_numeric_weights_are_clear_errors():
    spec = mq.weight_spec()
    _raises(ValueError, "empty", mq.init_weight_theta, spec, 4, weights=jnp.zeros((0, 3)))
    _raises(TypeError, "numeric array", mq.init_weight_theta, spec, 4, weights="kernel")


@pytest.mark.parametrize("family", ["uniform", "pow2"])
@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=repr)
def test_traced_non_finite_weights_give_nan_theta_and_nan_bits(family, bad):
    """Under jit the values cannot be checked: the start is NaN, and shows as NaN bits."""
    for par in mq.PARAMETRIZATIONS[family]:
        spec = mq.weight_spec(family, par)
        theta = jax.jit(lambda w, spec=spec: mq.init_weight_theta(spec, 4, weights=w))(
            jnp.array([0.3, bad, -0.5], jnp.float32)
        )
        for name, value in theta.items():
            assert (float(value) == 4.0) if name == "b" else np.isnan(float(value)), (par, name)
        assert np.isnan(float(mq.bitwidth(theta, spec))), par


def test_traced_finite_weights_give_the_same_start():
    # max|W| = 1 at 4 bits: d0 = 2^floor(log2(1/7)) = 2^-3, qmax0 = 0.875 (docs/method.md §4)
    spec = mq.weight_spec()
    w = jnp.array([0.1, -1.0, 0.5])
    theta = jax.jit(lambda w: mq.init_weight_theta(spec, 4, weights=w))(w)
    assert {k: float(v) for k, v in theta.items()} == {"d": 0.125, "qmax": 0.875}
