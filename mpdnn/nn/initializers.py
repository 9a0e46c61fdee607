"""Weight initialisers drawn on the host from the layer's key.

``jax.nn.initializers`` compile one XLA program per kernel shape on first use; building a
network with 20–50 distinct shapes spent 8–14 s of a CPU's time compiling random-number
kernels (most of what ``python -m mpdnn.report`` waited for). These initialisers draw the same
distributions with NumPy, seeded from the JAX key (same key, same values), so building a model
compiles nothing. Signature as ``jax.nn.initializers``: ``init(key, shape, dtype)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Initializer = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]


def _generator(key: jax.Array) -> np.random.Generator:
    seed = np.asarray(jax.random.key_data(key), dtype=np.uint32).ravel().tolist()
    return np.random.Generator(np.random.PCG64(seed))


def normal(stddev: float) -> Initializer:
    """N(0, stddev²). Under a trace (e.g. ``nnx.eval_shape`` or a jitted, sharded init) the
    key has no value, so the draw falls back to ``jax.random.normal``: same distribution,
    different numbers than an eager build with the same key."""

    def init(key, shape, dtype=jnp.float32):
        try:
            rng = _generator(key)
        except jax.errors.TracerArrayConversionError:
            return (stddev * jax.random.normal(key, tuple(shape), jnp.float32)).astype(dtype)
        draw = rng.standard_normal(tuple(shape), dtype=np.float32)
        return jnp.asarray(draw * np.float32(stddev), dtype)

    return init


def variance_scaling(scale: float, mode: str) -> Initializer:
    """N(0, scale / fan) (untruncated), ``fan`` of an HWIO or ``(in, out)`` kernel.

    ``mode="fan_out"`` with ``scale=2`` is He-normal as torchvision's ``kaiming_normal_``
    (``mode="fan_out"``) for ResNets and MobileNetV2; ``"fan_in"`` with 1 is LeCun-normal.
    """
    if mode not in ("fan_in", "fan_out"):
        raise ValueError(f"mode must be 'fan_in' or 'fan_out', got {mode!r}")

    def init(key, shape, dtype=jnp.float32):
        receptive = math.prod(shape[:-2])
        fan = receptive * (shape[-2] if mode == "fan_in" else shape[-1])
        return normal(math.sqrt(scale / fan))(key, shape, dtype)

    return init


he_normal_fan_out = variance_scaling(2.0, "fan_out")
lecun_normal = variance_scaling(1.0, "fan_in")
