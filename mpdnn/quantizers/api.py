"""The public functional API of docs/method.md §10: ``quantize`` and ``bitwidth``."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from mpdnn.quantizers import pow2, uniform
from mpdnn.quantizers.parametrizations import Pow2Params, canonical, integer_bits
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
      arithmetic runs in float32 for half-precision inputs.
    """
    x = jnp.asarray(x)
    dtype = _compute_dtype(x.dtype)
    xc = x.astype(dtype)
    params = canonical(theta, spec, dtype)
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
    """
    if spec.learns_bits:
        return integer_bits(theta, spec)
    b_min = spec.b_range[0]
    params = canonical(theta, spec)
    if isinstance(params, Pow2Params):
        return pow2.bits(
            params.qmin, params.qmax, b_min=b_min, signed=spec.signed, with_zero=spec.with_zero
        )
    return uniform.bits(params.d, params.qmax, signed=spec.signed, b_min=b_min)
