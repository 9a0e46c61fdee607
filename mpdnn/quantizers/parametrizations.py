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
    return jnp.where(
        e < MAX_POW2_EXPONENT, e, lax.stop_gradient(jnp.full_like(e, MAX_POW2_EXPONENT))
    )


def canonical(
    theta: Mapping[str, jax.typing.ArrayLike], spec: QuantSpec, dtype=jnp.float32
) -> UniformParams | Pow2Params:
    """Map raw θ to the canonical parameters of ``spec.family`` with §2's constraints.

    Differentiable w.r.t. θ (straight-through through box, round and snap). Keys of θ beyond
    ``spec.theta_names`` are ignored. θ may hold scalars (per tensor, as in the paper) or
    arrays that broadcast against the input (per channel).
    """
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
