"""Device-side normalisation and random crop + flip, against an independent NumPy search."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mpdnn.data import normalize, random_crop_flip

# Inputs come from NumPy and most calls are jitted: on a CPU every eager op and every
# jax.random draw of a new shape is its own XLA compile, which would dominate the suite.
crop_flip = jax.jit(random_crop_flip, static_argnames=("pad", "flip"))


def normal(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_normalize_maps_uint8_to_unit_range():
    images = jnp.array([[0, 255], [51, 204]], jnp.uint8)
    out = normalize(images, 2 / 255, -1.0)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, [[-1, 1], [-0.6, 0.6]], atol=1e-6)


def crops_of(image: np.ndarray, out: np.ndarray, pad: int) -> list[tuple[int, int, bool]]:
    """Every (dy, dx, flipped) for which ``out`` is that crop of the zero-padded ``image``."""
    h, w, _ = image.shape
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    found = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[dy : dy + h, dx : dx + w]
            found += [
                (dy, dx, f) for f, c in ((False, crop), (True, crop[:, ::-1])) if (c == out).all()
            ]
    return found


@pytest.mark.parametrize("shape", [(256, 6, 6, 1), (64, 8, 5, 3), (3, 32, 32, 3)])
def test_every_output_is_a_padded_crop_maybe_flipped(shape):
    pad = 2 if shape[1] < 32 else 4
    images = normal(shape, 1)
    out = np.asarray(crop_flip(jax.random.key(2), images, pad=pad))
    assert out.shape == shape and out.dtype == np.float32
    matches = [crops_of(x, y, pad) for x, y in zip(images, out, strict=True)]
    assert all(len(m) == 1 for m in matches), "each output must be exactly one crop"
    if shape[0] >= 64:
        # Fixed keys, so these bounds hold or fail deterministically; a wrong distribution
        # (no flips, one offset for the whole batch) lands far outside them.
        flips = sum(m[0][2] for m in matches)
        assert 0.3 * shape[0] < flips < 0.7 * shape[0]
        for axis in (0, 1):
            assert {m[0][axis] for m in matches} == set(range(2 * pad + 1))


def test_no_pad_no_flip_is_identity():
    images = normal((5, 7, 7, 3))
    np.testing.assert_array_equal(crop_flip(jax.random.key(1), images, pad=0, flip=False), images)


def test_flip_only_flips():
    images = normal((32, 4, 4, 1))
    out = np.asarray(crop_flip(jax.random.key(3), images, pad=0))
    flipped = [(o == x[:, ::-1]).all() for o, x in zip(out, images, strict=True)]
    same = [(o == x).all() for o, x in zip(out, images, strict=True)]
    assert all(f != s for f, s in zip(flipped, same, strict=True)) and 0 < sum(flipped) < 32


def test_jit_and_eager_agree_and_depend_on_key():
    # With the crop test above (jitted), this makes the eager path correct too.
    images = normal((16, 8, 8, 3))
    eager = random_crop_flip(jax.random.key(5), images)
    np.testing.assert_array_equal(crop_flip(jax.random.key(5), images), eager)
    assert not np.array_equal(crop_flip(jax.random.key(6), images), eager)


def test_padding_is_zero_in_the_normalised_domain():
    images = jnp.ones((64, 4, 4, 1))  # all-ones inputs: any 0 in the output came from padding
    out = np.asarray(crop_flip(jax.random.key(0), images, pad=2))
    assert set(np.unique(out)) == {0.0, 1.0}
