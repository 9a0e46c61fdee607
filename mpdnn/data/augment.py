"""Device-side normalisation and CIFAR augmentation, pure ``jax.numpy``, for the jitted step.

The host keeps uint8 images (4x less to transfer than float32) and the step normalises and
augments them on the accelerator, with a key from ``fold_in(key, step)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def normalize(images: jax.typing.ArrayLike, scale: float, offset: float) -> jax.Array:
    """``images * scale + offset`` in float32 (e.g. uint8 CIFAR-10 → [-1, 1])."""
    return jnp.asarray(images).astype(jnp.float32) * scale + offset


def random_crop_flip(
    key: jax.Array, images: jax.typing.ArrayLike, *, pad: int = 4, flip: bool = True
) -> jax.Array:
    """docs/method.md §8's train augmentation: zero-pad, random ``H×W`` crop, horizontal flip p=0.5.

    Each image gets its own crop offset, uniform over the ``(2·pad + 1)²`` positions, and its
    own flip. ``images`` are NHWC and already normalised: the padding is 0 *in the normalised
    domain* (mid-grey for [-1, 1] inputs), as the authors' code pads the [-1, 1] image with
    zeros, not the raw pixels.

    Works under ``jit`` for any batch size and channel count: the crop is one
    ``lax.dynamic_slice`` per image under ``vmap`` (a single gather), the flip a ``where``.
    """
    images = jnp.asarray(images)
    n, height, width, channels = images.shape
    crop_key, flip_key = jax.random.split(key)
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offsets = jax.random.randint(crop_key, (n, 2), 0, 2 * pad + 1)

    def crop(image, offset):
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, channels))

    out = jax.vmap(crop)(padded, offsets)
    if flip:
        flips = jax.random.bernoulli(flip_key, 0.5, (n, 1, 1, 1))
        out = jnp.where(flips, out[:, :, ::-1], out)
    return out
