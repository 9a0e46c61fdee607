"""The public functional API of docs/method.md §10: ``quantize`` and ``bitwidth``."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mpdnn.quantizers import pow2, uniform
from mpdnn.quantizers.parametrizations import (
    Pow2Params,
    canonical_unchecked,
    integer_bits,
    raw_value,
    theta_shapes,
)
from mpdnn.quantizers.spec import QuantSpec

Theta = Mapping[str, jax.typing.ArrayLike]


def _compute_dtype(dtype) -> jnp.dtype:
    """Rounding arithmetic runs in float32 (float64 when the input is float64)."""
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"quantize expects a floating-point array, got dtype {dtype}")
    return jnp.dtype(jnp.float64 if dtype == jnp.float64 else jnp.float32)


def _align(p: jax.Array, ndim: int) -> jax.Array:
    """Give a per-channel θ array the input's rank explicitly (numpy trailing-axis rules)."""
    if 0 < p.ndim < ndim:
        return p.reshape((1,) * (ndim - p.ndim) + p.shape)
    return p


def _broadcasts_to(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    """Whether an array of ``shape`` broadcasts to ``target`` without changing it."""
    try:
        return np.broadcast_shapes(shape, target) == tuple(target)
    except ValueError:
        return False


def quantize(x: jax.typing.ArrayLike, theta: Theta, spec: QuantSpec) -> jax.Array:
    """Fake-quantize ``x`` with the quantizer that raw parameters ``theta`` define.

    Args:
      x: floating-point array (float32, bfloat16, float16 or float64).
      theta: raw learnable values, keys ``spec.theta_names`` (e.g. ``{"d", "qmax"}`` for
        U3). Scalars per tensor; arrays broadcasting against ``x`` give per-channel
        quantizers.
      spec: the static :class:`QuantSpec`.

    Returns:
      An array of ``x``'s shape and dtype on the quantizer's grid (docs/method.md §1),
      differentiable
      w.r.t. ``x`` and ``theta`` with the straight-through gradients of docs/method.md §1–2. The
      arithmetic runs in float32 for half-precision inputs. NaN in ``x`` gives NaN there, and
      a NaN raw θ gives NaN wherever that quantizer applies: a diverged input or quantizer
      shows up instead of being rounded onto the grid.

    Raises (one line, the same under ``jax.jit``, since only static things are checked):
      TypeError: ``spec`` is not a :class:`QuantSpec`, ``theta`` not a mapping, an entry not
        real-valued, or ``x`` not floating-point.
      KeyError / ValueError: a key of ``spec.theta_names`` is missing / ``theta`` has other
        keys, or a θ entry's shape does not broadcast against ``x``.
    """
    shapes = theta_shapes(theta, spec, "quantize")
    x = jnp.asarray(x)
    dtype = _compute_dtype(x.dtype)
    for name, shape in shapes.items():
        if not _broadcasts_to(shape, x.shape):
            raise ValueError(
                f"theta[{name!r}] of shape {shape} does not broadcast against x of shape "
                f"{x.shape}: a per-channel θ must match x's trailing axes, e.g. shape "
                f"{x.shape[-1:]} for one quantizer per channel of the last axis"
            )
    xc = x.astype(dtype)
    params = canonical_unchecked(theta, spec, dtype)
    params = params._replace(**{k: _align(v, xc.ndim) for k, v in params._asdict().items()})
    if isinstance(params, Pow2Params):
        y = pow2.quantize(xc, params.qmin, params.qmax, spec.signed, spec.with_zero)
    else:
        y = uniform.quantize(xc, params.d, params.qmax, spec.signed)
    return y.astype(x.dtype)


def bitwidth(theta: Theta, spec: QuantSpec) -> jax.Array:
    """Bits per value of the quantizer ``theta`` defines (docs/method.md §3), as a float32 array.

    U1, U2 and the b-based pow2 cases: ``round(clip(b))``. U3 and P3: inferred from the
    canonical parameters, at least ``spec.b_range[0]``, with no upper cap. Differentiable
    w.r.t. ``theta`` by straight-through ceil/round, so a memory budget can train it.

    A NaN anywhere in ``theta`` gives NaN bits (per channel where the shapes allow), so a
    diverged quantizer is never accounted as a small finite bitwidth. ``theta`` and ``spec``
    are checked as in :func:`quantize`.
    """
    theta_shapes(theta, spec, "bitwidth")
    if spec.learns_bits:
        return _nan_where_theta_is(integer_bits(theta, spec), theta, spec)
    b_min = spec.b_range[0]
    params = canonical_unchecked(theta, spec)
    if isinstance(params, Pow2Params):
        return pow2.bits(
            params.qmin, params.qmax, b_min=b_min, signed=spec.signed, with_zero=spec.with_zero
        )
    return uniform.bits(params.d, params.qmax, signed=spec.signed, b_min=b_min)


def _nan_where_theta_is(bits: jax.Array, theta: Theta, spec: QuantSpec) -> jax.Array:
    """NaN bits where a raw θ other than ``b`` is NaN (``round(clip(b))`` never reads them).

    Elementwise where that θ's shape broadcasts to ``bits``' shape; otherwise (a per-channel
    step beside a per-tensor b) any NaN makes the whole result NaN, which keeps its shape.
    """
    for name in spec.theta_names:
        if name == "b":
            continue
        nan = jnp.isnan(raw_value(theta, name, spec, bits.dtype))
        # Explicit broadcasts: implicit rank promotion may be disabled (jax_numpy_rank_promotion).
        nan = jnp.broadcast_to(
            nan if _broadcasts_to(nan.shape, bits.shape) else jnp.any(nan), bits.shape
        )
        bits = jnp.where(nan, jnp.full_like(bits, jnp.nan), bits)
    return bits
