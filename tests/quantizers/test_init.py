"""docs/method.md §4 initialisation, with the expected numbers worked out by hand in each
comment.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mpdnn.quantizers as mq


def _close(theta, **expected):
    assert set(theta) == set(expected)
    for k, v in expected.items():
        assert float(theta[k]) == pytest.approx(v, rel=1e-7), k


def test_activation_init_is_1_875_at_4_bits():
    # d0 = 2^-3, qmax0 = d0 (2^4 - 1) = 1.875
    _close(mq.init_activation_theta(mq.activation_spec("uniform"), 4), d=0.125, qmax=1.875)
    _close(mq.init_activation_theta(mq.activation_spec("uniform", "b_d"), 4), b=4.0, d=0.125)


def test_weight_random_init():
    # d0 = 2^-3, qmax0 = d0 (2^3 - 1) = 0.875
    _close(mq.init_weight_theta(mq.weight_spec("uniform"), 4), d=0.125, qmax=0.875)
    _close(mq.init_weight_theta(mq.weight_spec("uniform", "b_qmax"), 4), b=4.0, qmax=0.875)


@pytest.mark.parametrize(
    "wmax, bits, d0, qmax0",
    [
        (1.0, 4, 2**-3, 0.875),  # log2(1/7) = -2.81 -> floor -3; qmax0 = 7 d0
        (1.0, 5, 2**-3, 1.875),  # log2(1/15) = -3.91 -> ceil -3 (authors' code for b0 > 4)
        (0.4, 3, 2**-3, 0.375),  # log2(0.4/3) = -2.91 -> floor -3; qmax0 = 3 d0
        (3.0, 4, 2**-2, 1.75),  # log2(3/7) = -1.22 -> floor -2
        # log2(0.05/127) = -11.3 -> ceil -11, below the box: d0 = 2^-8, qmax0 = 127 * 2^-8
        (0.05, 8, 2**-8, 127 * 2**-8),
        # log2(1e4/7) = 10.5 -> floor 10, above the box: d0 = 1, qmax0 = 7
        (1e4, 4, 1.0, 7.0),
    ],
)
def test_weight_init_from_float_weights(wmax, bits, d0, qmax0):
    w = jnp.array([0.1 * wmax, -wmax, 0.5 * wmax])
    spec = mq.weight_spec("uniform")
    theta = mq.init_weight_theta(spec, bits, weights=w)
    # The quantizer is exactly docs/method.md §4's; raw values on a box edge are nudged inside by a
    # relative 2^-10, where the box passes gradient (the snap maps them back onto the edge).
    params = mq.canonical(theta, spec)
    assert float(params.d) == d0
    assert float(theta["qmax"]) == pytest.approx(qmax0, rel=2**-9)
    assert float(mq.bitwidth(theta, spec)) == bits
    for name in ("d", "qmax"):
        lo, hi = spec.box(name)
        assert lo < float(theta[name]) < hi, name


def test_a_start_on_a_box_edge_still_gets_gradients():
    """max|W| = 0.05 at 4 bits puts d0 below the box (2^-8): the start must still learn."""
    spec = mq.weight_spec("uniform")
    w = jnp.linspace(-0.05, 0.05, 101)
    theta = mq.init_weight_theta(spec, 4, weights=w)
    g = jax.grad(lambda t: jnp.sum((mq.quantize(w, t, spec) - w) ** 2))(theta)
    assert float(g["d"]) != 0.0
    assert float(jax.grad(lambda t: mq.bitwidth(t, spec))(theta)["d"]) != 0.0


def test_all_zero_weights_fall_back_to_random_init():
    theta = mq.init_weight_theta(mq.weight_spec("uniform"), 4, weights=jnp.zeros(10))
    _close(theta, d=0.125, qmax=0.875)


def test_pow2_init():
    # weights: uniform qmax0 = 0.875 -> 2^round(-0.19) = 1; qmin0 = 1 / 2^(2^3 - 1) = 2^-7
    _close(mq.init_weight_theta(mq.weight_spec("pow2"), 4), qmin=2**-7, qmax=1.0)
    _close(mq.init_weight_theta(mq.weight_spec("pow2", "b_qmin"), 4), b=4.0, qmin=2**-7)
    # activations: uniform qmax0 = 1.875 -> 2^round(0.91) = 2; k = 4 - 1 (zero) = 3:
    # qmin0 = 2 / 2^7 = 2^-6
    _close(mq.init_activation_theta(mq.activation_spec("pow2"), 4), qmin=2**-6, qmax=2.0)


@pytest.mark.parametrize(
    "family, bits",
    # pow2 stops at 5 bits: at 6 a signed start spans 2^31 octaves, qmin = 2^-31 qmax, below
    # the qmin box (2^-16), so b_qmin and P3 starts are clipped and no longer equal b_qmax's.
    [("uniform", b) for b in (2, 3, 4, 6, 8)] + [("pow2", b) for b in (2, 3, 4, 5)],
)
def test_every_parametrization_starts_from_the_same_quantizer(family, bits):
    """The paper compares parametrizations from one starting point (Fig. 3, Table 1)."""
    w = jnp.linspace(-0.9, 0.7, 101)
    mags = 2.0 ** jnp.linspace(-20.0, 3.0, 20001)  # log-spaced: pow2 levels reach 2^-15
    x = jnp.concatenate([-mags, jnp.zeros(1), mags])
    outputs, widths = [], []
    for par in mq.PARAMETRIZATIONS[family]:
        spec = mq.weight_spec(family, par)
        theta = mq.init_weight_theta(spec, bits, weights=w)
        outputs.append(np.asarray(mq.quantize(x, theta, spec)))
        widths.append(float(mq.bitwidth(theta, spec)))
    for y in outputs[1:]:
        np.testing.assert_array_equal(y, outputs[0])
    assert widths == [bits] * len(widths)
    # the grid really has bits bits: at most 2^bits levels (2^bits - 1 for symmetric uniform)
    assert np.unique(outputs[0]).size == (2**bits - 1 if family == "uniform" else 2**bits)


@pytest.mark.parametrize("family", ["uniform", "pow2"])
def test_init_rejects_impossible_bits(family):
    with pytest.raises(ValueError, match="cannot start"):
        mq.init_weight_theta(mq.weight_spec(family), 1, weights=jnp.ones(3))
