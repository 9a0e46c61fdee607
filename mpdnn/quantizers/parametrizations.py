"""Parametrizations: raw learnable θ → canonical quantizer parameters (docs/method.md §2).

Each parametrization is a small conversion, not a copy of the quantizer. The hardware
constraints of the paper's §2.2 are applied here, in the forward pass, all straight-through:

1. box: every raw θ is clipped to its range (gradient 1 strictly inside, 0 outside);
2. integer bitwidth: ``b <- round(b)``;
3. power-of-two step (``pow2_step``): ``d <- 2**round(log2 d)`` after the derivation, and
   ``qmin``/``qmax`` of pow2 quantizers snapped the same way.

===========  =======  ==============  ====================================
paper        family   θ               derived
===========  =======  ==============  ====================================
U1           uniform  b, d            qmax = d (2^k - 1)
U2           uniform  b, qmax         d = qmax / (2^k - 1)
U3           uniform  d, qmax         b inferred (§3)
—            pow2     b, qmax         qmin = qmax 2^(-(2^k) + 1)
—            pow2     b, qmin         qmax = qmin 2^(2^k - 1)
P3           pow2     qmin, qmax      b inferred (§3)
===========  =======  ==============  ====================================

k is the number of magnitude bits (``QuantSpec.magnitude_bits``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mpdnn.quantizers._ste import box, exp2_int, pow2_ste, round_ste
from mpdnn.quantizers.spec import QuantSpec

# A b-based pow2 quantizer spans 2**(2**k - 1) between qmin and qmax; at 8 bits that is
# 2**255, which overflows float32 and turns gradients into inf * 0 = NaN. Capping the
# exponent at 100 keeps every value and gradient finite (qmin >= 2**-16 gives qmax <= 2**108)
# and changes nothing in practice: a dynamic range above 2**100 clips no real tensor.
MAX_POW2_EXPONENT = 100.0


class UniformParams(NamedTuple):
    """Canonical uniform quantizer: step ``d`` and dynamic range ``qmax`` (docs/method.md §1.1)."""

    d: jax.Array
    qmax: jax.Array


class Pow2Params(NamedTuple):
    """Canonical power-of-two quantizer: smallest and largest magnitude (docs/method.md §1.2)."""

    qmin: jax.Array
    qmax: jax.Array


def check_spec(spec: object, where: str) -> QuantSpec:
    """``spec`` itself, or a TypeError when it is not a :class:`QuantSpec` (e.g. a string)."""
    if not isinstance(spec, QuantSpec):
        raise TypeError(
            f"{where} expects spec to be a mpdnn.quantizers.QuantSpec, got "
            f"{type(spec).__name__} {spec!r} (build one with QuantSpec(...) or weight_spec())"
        )
    return spec


def theta_shapes(theta: object, spec: object, where: str = "canonical") -> dict[str, tuple]:
    """Check ``theta`` against ``spec`` and return the shape of each entry.

    Every check is on static things (the spec, θ's keys, the entries' types and shapes), so
    it raises the same one-line error under ``jax.jit`` as outside it:

    * ``spec`` must be a :class:`QuantSpec` and ``theta`` a mapping (TypeError);
    * the keys must be exactly ``spec.theta_names``: a missing key is a KeyError, an extra
      one a ValueError (an extra key is a θ of some other parametrization, never read, so a
      mix-up of parametrizations would go unnoticed);
    * every entry must be a real number or a numeric array (TypeError), and the entries'
      shapes must broadcast together (ValueError).
    """
    check_spec(spec, where)
    names = spec.theta_names
    if not isinstance(theta, Mapping):
        raise TypeError(
            f"{where} expects theta to be a mapping with keys {list(names)} for a "
            f"{spec.describe()} quantizer, got {type(theta).__name__}"
        )
    missing = [k for k in names if k not in theta]
    if missing:
        raise KeyError(
            f"theta for a {spec.describe()} quantizer needs keys {list(names)}; "
            f"'{missing[0]}' is missing (got {sorted(map(str, theta))})"
        )
    extra = sorted(str(k) for k in theta if k not in names)
    if extra:
        raise ValueError(
            f"theta for a {spec.describe()} quantizer has unexpected keys {extra}; "
            f"expected exactly {list(names)}"
        )
    shapes = {}
    for name in names:
        value = theta[name]
        dtype_shape = _dtype_and_shape(value)
        if dtype_shape is None:
            raise TypeError(
                f"theta[{name!r}] must be a real number or a numeric array, got "
                f"{type(value).__name__} {value!r}"[:200]
            )
        shapes[name] = dtype_shape[1]
    try:
        np.broadcast_shapes(*shapes.values())
    except ValueError:
        raise ValueError(
            f"theta entries of a {spec.describe()} quantizer must broadcast together, got "
            f"shapes {shapes}"
        ) from None
    return shapes


def _dtype_and_shape(value: object) -> tuple[np.dtype, tuple[int, ...]] | None:
    """A θ entry's dtype and shape without touching its values (tracers included), or None
    when it is not real-valued (a bool, a string, None, a complex number)."""
    if isinstance(value, bool | np.bool_):
        return None
    if isinstance(value, int | float):
        return np.dtype(type(value)), ()
    if hasattr(value, "dtype") and hasattr(value, "shape"):  # arrays, tracers, numpy scalars
        try:
            dtype, shape = np.dtype(value.dtype), tuple(value.shape)
        except TypeError:
            return None
    else:
        try:
            array = np.asarray(value)
        except (TypeError, ValueError):
            return None
        dtype, shape = array.dtype, array.shape
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
        return None
    return dtype, shape


def raw_value(theta: Mapping[str, jax.typing.ArrayLike], name: str, spec: QuantSpec, dtype):
    """Fetch θ[name] as an array of ``dtype``, with a clear error when it is missing."""
    try:
        value = theta[name]
    except KeyError:
        raise KeyError(
            f"theta for a {spec.describe()} quantizer needs keys {list(spec.theta_names)}; "
            f"'{name}' is missing (got {sorted(theta)})"
        ) from None
    return jnp.asarray(value, dtype=dtype)


def _boxed(theta, name: str, spec: QuantSpec, dtype) -> jax.Array:
    lo, hi = spec.box(name)
    return box(raw_value(theta, name, spec, dtype), lo, hi)


def _snap(v: jax.Array, spec: QuantSpec) -> jax.Array:
    return pow2_ste(v) if spec.pow2_step else v


def integer_bits(theta, spec: QuantSpec, dtype=jnp.float32) -> jax.Array:
    """``round(clip(b))`` of the b-based parametrizations (constraints 1 and 2)."""
    return round_ste(_boxed(theta, "b", spec, dtype))


def _pow2_exponent(theta, spec: QuantSpec, dtype) -> jax.Array:
    """``2**k - 1``: how many octaves separate qmin and qmax, capped (see MAX_POW2_EXPONENT)."""
    k = spec.magnitude_bits(integer_bits(theta, spec, dtype))
    e = exp2_int(k) - 1.0
    # ``e >= cap`` rather than ``not e < cap``: a NaN b must stay NaN, not become the cap.
    return jnp.where(
        e >= MAX_POW2_EXPONENT, lax.stop_gradient(jnp.full_like(e, MAX_POW2_EXPONENT)), e
    )


def canonical(
    theta: Mapping[str, jax.typing.ArrayLike], spec: QuantSpec, dtype=jnp.float32
) -> UniformParams | Pow2Params:
    """Map raw θ to the canonical parameters of ``spec.family`` with §2's constraints.

    Differentiable w.r.t. θ (straight-through through box, round and snap). θ must have
    exactly the keys ``spec.theta_names`` (:func:`theta_shapes` lists every check and its
    error). θ may hold scalars (per tensor, as in the paper) or arrays that broadcast
    against the input (per channel). A NaN raw value gives NaN canonical parameters.
    """
    theta_shapes(theta, spec, "canonical")
    return canonical_unchecked(theta, spec, dtype)


def canonical_unchecked(theta, spec: QuantSpec, dtype=jnp.float32) -> UniformParams | Pow2Params:
    """:func:`canonical` for a θ that :func:`theta_shapes` has already checked."""
    p = spec.parametrization
    if spec.family == "uniform":
        if p == "b_d":
            k = spec.magnitude_bits(integer_bits(theta, spec, dtype))
            d = _snap(_boxed(theta, "d", spec, dtype), spec)
            qmax = d * (exp2_int(k) - 1.0)
        elif p == "b_qmax":
            k = spec.magnitude_bits(integer_bits(theta, spec, dtype))
            qmax = _boxed(theta, "qmax", spec, dtype)
            d = _snap(qmax / (exp2_int(k) - 1.0), spec)
        else:  # d_qmax
            d = _snap(_boxed(theta, "d", spec, dtype), spec)
            qmax = _boxed(theta, "qmax", spec, dtype)
        return UniformParams(d=d, qmax=qmax)
    if p == "b_qmax":
        qmax = _snap(_boxed(theta, "qmax", spec, dtype), spec)
        qmin = qmax * exp2_int(-_pow2_exponent(theta, spec, dtype))
    elif p == "b_qmin":
        qmin = _snap(_boxed(theta, "qmin", spec, dtype), spec)
        qmax = qmin * exp2_int(_pow2_exponent(theta, spec, dtype))
    else:  # qmin_qmax
        qmin = _snap(_boxed(theta, "qmin", spec, dtype), spec)
        qmax = _snap(_boxed(theta, "qmax", spec, dtype), spec)
    return Pow2Params(qmin=qmin, qmax=qmax)
