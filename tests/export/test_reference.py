"""mpdnn.export.reference: the integer forward reproduces the jitted Flax model bit for bit.

Expected logits come from the Flax model itself (jitted, eval mode); float32 roundings are
checked against exact rational arithmetic; never against the reference.
"""

from __future__ import annotations

import math
import warnings
from fractions import Fraction

import jax
import numpy as np
import pytest
from flax import nnx

from mpdnn import export as ex
from mpdnn import optim
from mpdnn.data import find_cifar10_archive, load_dataset, normalize
from mpdnn.export import mpq, reference
from mpdnn.models import build
from mpdnn.nn import LogitScale, QuantConfig, Rule, quantize_model
from tests.export.cases import resnet20

FIRST_CONV_TERMS = 3 * 3 * 3  # 3×3 kernel over RGB


def _round_to_f32(exact: Fraction) -> np.float32:
    """Correctly rounded float32 of a rational (nearest, ties to even), independently."""
    guess = np.float32(float(exact))
    cands = [
        np.nextafter(guess, np.float32(-np.inf)),
        guess,
        np.nextafter(guess, np.float32(np.inf)),
    ]
    dist = [abs(Fraction(float(c)) - exact) for c in cands]
    best = min(dist)
    ties = [c for c, dd in zip(cands, dist, strict=True) if dd == best]
    return min(ties, key=lambda c: int(np.float32(c).view(np.int32)) & 1)


def test_fused_multiply_add_rounds_once():
    # Constructed so that a*b + c in float64 lands exactly halfway between two float32
    # (with the error below float64's resolution): rounding twice goes the wrong way.
    a = np.float32(2.0**-24 * (1 + 2.0**-23))
    b = np.float32(1 - 2.0**-23)
    c = np.float32(1 + 2.0**-23)
    assert np.float32(np.float64(a) * np.float64(b) + np.float64(c)) != c  # twice: wrong
    assert reference._fma32(np.array([a, -a]), np.array([b, b]), np.array([c, -c])).tolist() == [
        c,
        -c,
    ]
    rng = np.random.default_rng(0)
    a, b, c = (
        (rng.normal(0, 1, 3000) * 2.0 ** rng.integers(-30, 30, 3000)).astype(np.float32)
        for _ in range(3)
    )
    got = reference._fma32(a, b, c)
    want = [
        _round_to_f32(Fraction(float(x)) * Fraction(float(y)) + Fraction(float(z)))
        for x, y, z in zip(a, b, c, strict=True)
    ]
    np.testing.assert_array_equal(got, np.float32(want))


def test_batch_norm_matches_the_jitted_flax_batch_norm_bitwise():
    """XLA:CPU fuses BatchNorm's multiply-add into one FMA; the reference rounds likewise."""
    rng = np.random.default_rng(3)
    bn = nnx.BatchNorm(64, momentum=0.9, epsilon=1e-5, rngs=nnx.Rngs(0))
    bn.mean[...] = rng.normal(0, 1, 64).astype(np.float32)
    bn.var[...] = rng.uniform(0.01, 4, 64).astype(np.float32)
    bn.scale[...] = rng.normal(1, 0.5, 64).astype(np.float32)
    bn.bias[...] = rng.normal(0, 1, 64).astype(np.float32)
    bn.eval()
    graphdef, state = nnx.split(bn)
    x = rng.normal(0, 3, (8, 8, 8, 64)).astype(np.float32)
    flax_y = np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x))
    mul = np.asarray(mpq._batch_norm_multiplier(bn))
    centred = x - np.asarray(bn.mean[...])
    bias = np.asarray(bn.bias[...])
    np.testing.assert_array_equal(reference._fma32(centred, mul, bias), flax_y)
    assert np.any(centred * mul + bias != flax_y)  # two roundings would not reproduce it


def test_reference_refuses_other_models(tmp_path):
    model = build("small_cnn", rngs=nnx.Rngs(0))
    quantize_model(model, [Rule(".*", QuantConfig(), kind=None)])
    result = ex.export_model(model, tmp_path / "cnn.mpq")
    assert result["payload_bytes"] == math.ceil(float(optim.memory(model).weight_kb) * 1024)
    with pytest.raises(ex.ExportError, match="supports ResNetCifar .* not 'SmallCNN'"):
        ex.reference_forward(ex.load(tmp_path / "cnn.mpq"), np.zeros((1, 8, 8, 1), np.float32))


@pytest.fixture(scope="module")
def images():
    """Real CIFAR-10 test images when the shared archive is here, else synthetic ones."""
    if find_cifar10_archive() is not None:
        ds = load_dataset("cifar10", max_per_class=3)
    else:
        message = "CIFAR-10 archive not found: reference forward checked on synthetic images"
        warnings.warn(message, stacklevel=2)
        ds = load_dataset("synthetic", num_test=30)
    print(f"reference forward images: {ds.description}")
    x = np.asarray(normalize(ds.test_images, ds.pixel_scale, ds.pixel_offset), np.float32)
    return x, ds.name


def check_reference(model, path, x):
    """The reference forward against the jitted Flax model (see mpdnn.export's docstring)."""
    exported = ex.load(path)
    prefix = exported.table["architecture"]["prefix"]
    for name, w in exported.weights.items():  # the Flax model's own quantized weights
        module = model
        for part in name.removesuffix(".kernel").removesuffix(".bias").split("."):
            module = getattr(module, part) if not part.isdigit() else module[int(part)]
        flax_w = module.quantized_kernel() if name.endswith("kernel") else module.quantized_bias()
        np.testing.assert_array_equal(w.values, np.asarray(flax_w), err_msg=name)
    assert prefix == ("model." if isinstance(model, LogitScale) else "")
    result = ex.compare(model, exported, x)
    print(f"reference vs Flax: {result}")
    n = len(x)
    assert result["exact_sums"]  # so XLA's float32 convs are exact: equality must hold
    assert result["logits_equal_given_stem"] == n
    assert result["unexplained_differences"] == 0  # equal wherever the first codes agree
    assert result["logits_equal"] >= n // 2
    # Any float32 summation of n terms errs by at most n units of 2**-24 Σ|terms|.
    assert result["stem_conv_error_in_u"] <= FIRST_CONV_TERMS
    return result


def test_pow2_resnet20_reference_forward(tmp_path, images):
    p3 = QuantConfig(family="pow2")
    rules = [Rule(".*", p3, kind="weight"), Rule(".*", p3, kind="activation")]
    model = resnet20(rules, logit_scale=True)
    result = ex.export_model(model, tmp_path / "p3.mpq")
    assert result["payload_bytes"] == math.ceil(float(optim.memory(model).weight_kb) * 1024)
    check_reference(model, tmp_path / "p3.mpq", images[0][:16])


def test_reference_forward_reproduces_the_trained_resnet20(delivered, tmp_path, images):
    model = delivered
    ex.export_model(model, tmp_path / "m.mpq")
    x, name = images
    result = check_reference(model, tmp_path / "m.mpq", x)
    assert result["images"] == len(x) and name in ("cifar10", "synthetic")
