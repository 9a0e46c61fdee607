"""Property tests (hypothesis): grid membership, idempotence, level counts, monotone bits, ties."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

import mpdnn.quantizers as mq
from tests.quantizers.cases import bitwidth_boundary_cases

# One jitted function per spec, built once: hypothesis then only varies runtime values.
_N = 257


def _jitted(spec):
    return jax.jit(lambda x, theta: mq.quantize(x, theta, spec))


UNIFORM = {
    (par, signed): mq.QuantSpec(family="uniform", parametrization=par, signed=signed)
    for par in mq.PARAMETRIZATIONS["uniform"]
    for signed in (True, False)
}
POW2 = {
    (par, signed, wz): mq.QuantSpec(
        family="pow2", parametrization=par, signed=signed, with_zero=wz, b_range=(2, 6)
    )
    for par in mq.PARAMETRIZATIONS["pow2"]
    for signed in (True, False)
    for wz in (True, False)
}
Q_UNIFORM = {k: _jitted(s) for k, s in UNIFORM.items()}
Q_POW2 = {k: _jitted(s) for k, s in POW2.items()}
BITS = jax.jit(mq.bitwidth, static_argnums=1)

raw_b = st.floats(1.0, 9.0)
raw_d = st.floats(1e-3, 2.0)
raw_qmax = st.floats(1e-3, 150.0)
raw_qmin = st.floats(1e-6, 2.0)
inputs = st.lists(st.floats(-200.0, 200.0, width=32), min_size=_N, max_size=_N)


def _theta(spec, b, d, qmax, qmin):
    values = {"b": b, "d": d, "qmax": qmax, "qmin": qmin}
    return {k: jnp.float32(values[k]) for k in spec.theta_names}


@given(key=st.sampled_from(sorted(UNIFORM)), b=raw_b, d=raw_d, qmax=raw_qmax, xs=inputs)
def test_uniform_outputs_on_grid_idempotent_and_within_levels(key, b, d, qmax, xs):
    spec = UNIFORM[key]
    theta = _theta(spec, b, d, qmax, 0.0)
    x = jnp.asarray(xs, jnp.float32)
    y = Q_UNIFORM[key](x, theta)
    step = float(mq.canonical(theta, spec).d)
    assert math.log2(step) == round(math.log2(step))  # pow2_step: d is a power of two
    k = np.asarray(y, np.float64) / step
    np.testing.assert_array_equal(k, np.round(k))  # on the grid {k d}
    if not spec.signed:
        assert np.all(k >= 0)
    np.testing.assert_array_equal(Q_UNIFORM[key](y, theta), y)  # Q(Q(x)) = Q(x)
    if spec.parametrization != "b_qmax":
        # U2 derives d = pow2(qmax / (2^k - 1)); the snap can shrink d, so round(qmax/d) may
        # exceed 2^k - 1 (the authors' formula, kept exactly). U1 and U3 never do.
        levels = np.unique(np.concatenate([np.asarray(y), [0.0]])).size
        assert levels <= 2 ** float(BITS(theta, spec))


@given(key=st.sampled_from(sorted(POW2)), b=raw_b, qmin=raw_qmin, qmax=raw_qmax, xs=inputs)
def test_pow2_outputs_are_powers_of_two_idempotent_and_within_levels(key, b, qmin, qmax, xs):
    spec = POW2[key]
    theta = _theta(spec, b, 0.0, qmax, qmin)
    x = jnp.asarray(xs, jnp.float32)
    y = np.asarray(Q_POW2[key](x, theta), np.float64)
    mag = np.abs(y[y != 0])
    params = mq.canonical(theta, spec)
    if float(params.qmin) > float(params.qmax):
        # Disordered (training's projection prevents it): the authors' sum form maps the
        # overlap qmax <= |x| < qmin of I1 and I3 to qmin + qmax, not a power of two.
        mag = mag[mag != float(params.qmin) + float(params.qmax)]
    np.testing.assert_array_equal(np.log2(mag), np.round(np.log2(mag)))
    if not (spec.with_zero or not spec.signed):
        assert np.all(y != 0)  # no zero code: 0 maps to +qmin
    if not spec.signed:
        assert np.all(y >= 0)
    if float(params.qmin) <= float(params.qmax):
        # A disordered quantizer (qmin > qmax, which training's projection prevents) maps
        # small inputs to qmin and qmin itself to qmax: neither idempotent nor 2^b levels.
        np.testing.assert_array_equal(Q_POW2[key](jnp.asarray(y, jnp.float32), theta), y)
        levels = np.unique(y).size
        assert levels <= 2 ** float(BITS(theta, spec))


@given(
    signed=st.booleans(),
    d=raw_d,
    q1=st.floats(1e-3, 150.0),
    q2=st.floats(1e-3, 150.0),
)
def test_u3_bits_monotone_in_qmax_over_d(signed, d, q1, q2):
    spec = mq.QuantSpec(family="uniform", parametrization="d_qmax", signed=signed)
    lo, hi = sorted((q1, q2))
    b_lo = float(BITS({"d": jnp.float32(d), "qmax": jnp.float32(lo)}, spec))
    b_hi = float(BITS({"d": jnp.float32(d), "qmax": jnp.float32(hi)}, spec))
    assert b_lo <= b_hi
    # and decreasing in d at fixed qmax
    b_fine = float(BITS({"d": jnp.float32(d / 4), "qmax": jnp.float32(hi)}, spec))
    assert b_hi <= b_fine


@given(qmin=raw_qmin, q1=st.floats(1e-3, 150.0), q2=st.floats(1e-3, 150.0), signed=st.booleans())
def test_p3_bits_monotone_in_qmax_over_qmin(qmin, q1, q2, signed):
    spec = mq.QuantSpec(
        family="pow2", parametrization="qmin_qmax", signed=signed, with_zero=not signed
    )
    lo, hi = sorted((q1, q2))
    b_lo = float(BITS({"qmin": jnp.float32(qmin), "qmax": jnp.float32(lo)}, spec))
    b_hi = float(BITS({"qmin": jnp.float32(qmin), "qmax": jnp.float32(hi)}, spec))
    assert b_lo <= b_hi


@given(k=st.integers(-40, 40), signed=st.booleans())
def test_ties_round_half_away_from_zero(k, signed):
    """x = (k + 1/2) d lies exactly between two grid points: it goes to the one away from 0."""
    if not signed:
        k = abs(k)
    d = 0.25
    theta = {"d": jnp.float32(d), "qmax": jnp.float32(100.0)}
    x = (k + 0.5) * d if k >= 0 else (k - 0.5) * d
    y = float(Q_UNIFORM[("d_qmax", signed)](jnp.float32([x] * _N), theta)[0])
    expected = (k + 1) * d if k >= 0 else (k - 1) * d
    assert y == expected


def test_round_half_away_is_exact_where_the_textbook_formula_is_not():
    # float32 0.49999997 + 0.5 rounds up to 1.0, so sign(v)*floor(|v|+0.5) gives 1 here.
    v = np.nextafter(np.float32(0.5), np.float32(0))
    assert float(mq.round_half_away(jnp.float32(v))) == 0.0
    np.testing.assert_array_equal(
        mq.round_half_away(jnp.array([0.5, 1.5, 2.5, -0.5, -2.5])), [1, 2, 3, -1, -3]
    )


@pytest.mark.parametrize("par", ["b_qmax", "b_qmin"])
def test_pow2_b_based_have_exactly_2_pow_b_levels(par):
    """Signed pow2 without zero at b bits: 2^(b-1) magnitudes × 2 signs = 2^b codes."""
    spec = mq.QuantSpec(family="pow2", parametrization=par, signed=True)
    x = jnp.linspace(-300.0, 300.0, 200_001)
    for b in (2, 3, 4):
        values = {"b": jnp.float32(b), "qmax": jnp.float32(1.0), "qmin": jnp.float32(2**-6)}
        theta = {k: values[k] for k in spec.theta_names}  # an extra key is an error
        assert np.unique(np.asarray(mq.quantize(x, theta, spec))).size == 2**b


@pytest.mark.parametrize("bits", range(2, 17))
def test_bitwidth_is_exact_at_every_power_of_two_boundary(bits):
    """A b-bit grid reports b bits, one more level reports b + 1 (no float log2 slop)."""
    for spec, theta, expected in bitwidth_boundary_cases(bits):
        theta = {k: jnp.float32(v) for k, v in theta.items()}
        assert float(BITS(theta, spec)) == expected, (spec.describe(), theta)
        assert float(mq.bitwidth(theta, spec)) == expected
