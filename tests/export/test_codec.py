"""mpdnn.export.codec: weight codes at every bitwidth, activation grids in NumPy.

Expected values come from :func:`mpdnn.quantizers.quantize` (the network's quantizer),
expected codes from the format's definition recomputed here; never from the exporter.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

import mpdnn.quantizers as mq
from mpdnn import export as ex
from tests.export.cases import quantized_values, round_trip


def reload_one(tmp_path, w, theta, spec):
    """``w`` through encode_weight, write and load; its values checked against quantize."""
    sizes, loaded = round_trip(tmp_path, [ex.encode_weight("w", w, theta, spec)])
    got = loaded.weights["w"]
    expected = quantized_values(w, theta, spec)
    np.testing.assert_array_equal(got.values, expected)
    np.testing.assert_array_equal(got.integers * got.step, expected)
    return sizes, loaded, got, expected


@pytest.mark.parametrize("parametrization", ["d_qmax", "b_qmax", "b_d"])
@pytest.mark.parametrize("bits", range(2, 9))
def test_uniform_round_trip_every_bitwidth(tmp_path, bits, parametrization):
    rng = np.random.default_rng(bits)
    step = 2.0 ** -int(rng.integers(2, 6))
    levels = 2 ** (bits - 1) - 1
    theta = {
        "d_qmax": {"d": step, "qmax": step * levels},
        "b_qmax": {"b": bits, "qmax": step * levels},
        "b_d": {"b": bits, "d": step},
    }[parametrization]
    spec = mq.weight_spec("uniform", parametrization)
    assert float(mq.bitwidth(theta, spec)) == bits  # docs/method.md §3: ceil(log2(levels + 1)) + 1
    w = rng.normal(0.0, step * levels * 0.7, (3, 3, 5, 7)).astype(np.float32)
    w.flat[:4] = [10.0, -10.0, 0.5 * step, -2.5 * step]  # both clips, two ties
    sizes, loaded, got, expected = reload_one(tmp_path, w, theta, spec)
    assert got.bits == bits and got.step == step and got.encoding == "uniform"
    assert got.integers.min() == -levels and got.integers.max() == levels
    assert sizes["payload_bytes"] == math.ceil(w.size * bits / 8) == loaded.payload_bytes
    # Two's complement in `bits` bits, as the format says.
    np.testing.assert_array_equal(got.codes, np.mod(got.integers.ravel(), 2**bits))


@pytest.mark.parametrize("parametrization", ["qmin_qmax", "b_qmax", "b_qmin"])
@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_pow2_round_trip(tmp_path, bits, parametrization):
    rng = np.random.default_rng(10 + bits)
    magnitudes = 2 ** (bits - 1)  # sign bit + exponent index (docs/method.md §3: ceil(log2 M) + 1)
    emax = int(rng.integers(-3, 2))
    emin = emax - magnitudes + 1
    qmin, qmax = 2.0**emin, 2.0**emax
    theta = {
        "qmin_qmax": {"qmin": qmin, "qmax": qmax},
        "b_qmax": {"b": bits, "qmax": qmax},
        "b_qmin": {"b": bits, "qmin": qmin},
    }[parametrization]
    spec = mq.weight_spec("pow2", parametrization)
    assert float(mq.bitwidth(theta, spec)) == bits
    w = (rng.choice([-1, 1], 200) * 2.0 ** rng.uniform(emin - 2, emax + 1, 200)).astype(np.float32)
    w[:3] = [0.0, qmin / math.sqrt(2), -(2.0 ** (emin + 0.5))]  # zero -> +qmin; midpoints
    sizes, _, got, expected = reload_one(tmp_path, w, theta, spec)
    assert got.bits == bits and got.encoding == "pow2" and got.step == qmin
    # The code, recomputed from the values: sign bit on top, then log2|v| - log2 qmin.
    code = (expected < 0).astype(np.uint64) << np.uint64(bits - 1)
    code |= (np.log2(np.abs(expected)) - emin).astype(np.uint64)
    np.testing.assert_array_equal(got.codes, code)
    assert sizes["payload_bytes"] == math.ceil(w.size * bits / 8)


@pytest.mark.parametrize("family", ["uniform", "pow2"])
def test_activation_quantizer_matches_quantize(family):
    spec = mq.activation_spec(family)
    theta = {"d": 0.13, "qmax": 1.9} if family == "uniform" else {"qmin": 0.03, "qmax": 1.7}
    params = mq.canonical(theta, spec)
    step = float(params.d if family == "uniform" else params.qmin)
    rng = np.random.default_rng(1)
    ties = np.arange(-2, 20) * step + 0.5 * step  # uniform rounding ties
    edges = 2.0 ** (np.arange(-8, 2) + 0.5)  # pow2 geometric midpoints
    near = np.concatenate([ties, edges, [step / math.sqrt(2), float(params.qmax), 0.0]])
    x = np.concatenate(
        [rng.normal(0.5, 1, 500), near, np.nextafter(near, 0), np.nextafter(near, 9)]
    )
    x = x.astype(np.float32)
    q = ex.ActivationQuantizer.from_entry(ex.encode_activation("a", x.shape, theta, spec))
    expected = np.asarray(mq.quantize(jnp.asarray(x), theta, spec))
    np.testing.assert_array_equal(q.values(x), expected)
    np.testing.assert_array_equal(q.integers(x) * q.step, expected)
    assert q.bits == int(mq.bitwidth(theta, spec))
