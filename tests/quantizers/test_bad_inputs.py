"""Wrong θ, spec or shapes are one clear line, the same under ``jax.jit`` as outside it.

Before, an extra θ key was silently ignored (a θ of another parametrization went unnoticed), a
per-channel θ of the wrong length failed deep inside JAX's broadcasting, and ``theta=None``, a
list or a spec given as a string raised raw attribute or indexing errors.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mpdnn.quantizers as mq
from tests.quantizers.cases import all_spec_kwargs, spec_id

SPECS = all_spec_kwargs()
ALL_KEYS = {"b": 4.0, "d": 0.125, "qmax": 1.0, "qmin": 2.0**-7}

CALLS = {
    "quantize": lambda theta, spec: mq.quantize(jnp.ones(3), theta, spec),
    "bitwidth": lambda theta, spec: mq.bitwidth(theta, spec),
    "canonical": lambda theta, spec: mq.canonical(theta, spec),
}


def _raises(exc, match, fn, *args):
    with pytest.raises(exc, match=match) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def _jitted(call, spec):
    return jax.jit(lambda theta: call(theta, spec))


@pytest.mark.parametrize("call", CALLS, ids=str)
@pytest.mark.parametrize("theta", [None, [0.125, 1.0], (0.125, 1.0), "d_qmax", 0.5], ids=repr)
def test_theta_that_is_not_a_mapping_is_a_type_error(call, theta):
    message = _raises(TypeError, "theta to be a mapping", CALLS[call], theta, mq.QuantSpec())
    assert "['d', 'qmax']" in message  # says what is expected


@pytest.mark.parametrize("call", CALLS, ids=str)
@pytest.mark.parametrize("spec", ["d_qmax", None, {"family": "uniform"}], ids=repr)
def test_spec_that_is_not_a_quantspec_is_a_type_error(call, spec):
    _raises(
        TypeError, "expects spec to be a mpdnn.quantizers.QuantSpec", CALLS[call], ALL_KEYS, spec
    )


@pytest.mark.parametrize("kw", SPECS, ids=spec_id)
def test_extra_theta_keys_are_an_error_eagerly_and_under_jit(kw):
    spec = mq.QuantSpec(**kw)
    extra = sorted(set(ALL_KEYS) - set(spec.theta_names))
    theta = {k: jnp.float32(v) for k, v in ALL_KEYS.items()}
    for name, call in CALLS.items():
        for fn in (lambda t, call=call: call(t, spec), _jitted(call, spec)):
            message = _raises(ValueError, "unexpected keys", fn, theta)
            assert str(extra) in message and str(list(spec.theta_names)) in message, name


def test_a_missing_key_still_names_the_expected_keys_under_jit():
    _raises(KeyError, "needs keys", _jitted(CALLS["bitwidth"], mq.QuantSpec()), {"d": 0.5})


@pytest.mark.parametrize(
    "d_shape",
    [(4,), (2,), (5, 1, 3), (1, 16, 3)],  # wrong channel count, or more axes than x
    ids=str,
)
def test_per_channel_theta_that_does_not_fit_x_is_a_value_error(d_shape, maybe_jit):
    spec = mq.QuantSpec()
    x = jnp.ones((16, 3))
    theta = {"d": jnp.full(d_shape, 0.125), "qmax": jnp.float32(1.0)}
    q = maybe_jit(lambda x, t: mq.quantize(x, t, spec))
    message = _raises(ValueError, "does not broadcast against x of shape \\(16, 3\\)", q, x, theta)
    assert str(d_shape) in message and "(3,)" in message


@pytest.mark.parametrize("d_shape", [(3,), (1, 3), (16, 1), (16, 3)], ids=str)
def test_per_channel_theta_that_fits_x_is_accepted(d_shape):
    spec = mq.QuantSpec()
    x = jnp.linspace(-1.0, 1.0, 48).reshape(16, 3)
    theta = {"d": jnp.full(d_shape, 0.25), "qmax": jnp.float32(1.0)}
    # d = 0.25, qmax = 1: Q(x) = 0.25 round(clip(x, -1, 1) / 0.25), here in float64
    expected = (
        0.25 * np.sign(np.asarray(x)) * np.floor(np.abs(np.asarray(x, np.float64)) / 0.25 + 0.5)
    )
    np.testing.assert_array_equal(mq.quantize(x, theta, spec), expected)


def test_theta_entries_that_do_not_broadcast_together_are_a_value_error(maybe_jit):
    spec = mq.QuantSpec()
    theta = {"d": jnp.full((3,), 0.125), "qmax": jnp.ones((4,))}
    bits = maybe_jit(lambda t: mq.bitwidth(t, spec))
    message = _raises(ValueError, "must broadcast together", bits, theta)
    assert "(3,)" in message and "(4,)" in message


@pytest.mark.parametrize(
    "value",
    ["0.125", None, True, 1j, object()],
    ids=["str", "None", "True", "complex", "object"],  # fixed ids: xdist workers must agree
)
def test_theta_entry_that_is_not_a_real_number_is_a_type_error(value):
    for call in CALLS.values():
        _raises(
            TypeError,
            "theta\\['d'\\] must be a real number",
            call,
            {"d": value, "qmax": 1.0},
            mq.QuantSpec(),
        )


def test_integer_and_numpy_theta_entries_are_still_accepted():
    spec = mq.QuantSpec()
    # d = 0.25 snaps to itself, qmax = 1: grid {0, ±0.25, ..., ±1} (4 bits: 4 levels + sign)
    for theta in ({"d": 0.25, "qmax": 1}, {"d": np.float32(0.25), "qmax": np.ones(())}):
        np.testing.assert_array_equal(
            mq.quantize(jnp.array([0.3, -2.0]), theta, spec), [0.25, -1.0]
        )
        assert float(mq.bitwidth(theta, spec)) == 4.0
