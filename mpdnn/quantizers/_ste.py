"""Straight-through primitives shared by the quantizer families.

Every rounding of a quantizer *parameter* (to an integer bitwidth, to a power of two, the
ceil of a bit count) goes through one of these ``jax.custom_jvp`` rules, so they work under
``jit``, ``vmap``, ``grad`` and forward-mode autodiff. The quantizers themselves
(``uniform.quantize``, ``pow2.quantize``) are ``custom_vjp`` rules in their family modules,
for speed; they use the exact rounding helpers defined here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def round_half_away(v: jax.Array) -> jax.Array:
    """Round half away from zero, ``sign(v) * floor(|v| + 0.5)`` computed exactly.

    ``jnp.round`` rounds half to even; the paper's NNabla code rounds half away from zero.
    ``lax.round`` with ``AWAY_FROM_ZERO`` is exact, unlike the textbook formula, which
    rounds 0.49999997 up in float32.
    """
    return lax.round(v, lax.RoundingMethod.AWAY_FROM_ZERO)


@jax.custom_jvp
def round_ste(v: jax.Array) -> jax.Array:
    """``round_half_away`` with identity gradient (straight-through estimator)."""
    return round_half_away(v)


@round_ste.defjvp
def _round_ste_jvp(primals, tangents):
    (v,), (t,) = primals, tangents
    return round_ste(v), t


@jax.custom_jvp
def ceil_ste(v: jax.Array) -> jax.Array:
    """``ceil`` with identity gradient (straight-through estimator)."""
    return jnp.ceil(v)


@ceil_ste.defjvp
def _ceil_ste_jvp(primals, tangents):
    (v,), (t,) = primals, tangents
    return ceil_ste(v), t


def _ceil_log2_exact(v: jax.Array) -> jax.Array:
    """``ceil(log2 v)`` for positive ``v``, exactly: ``v = f 2**e``, ``f`` in [1/2, 1)."""
    f, e = jnp.frexp(v)
    exact = (e - (f == 0.5).astype(e.dtype)).astype(v.dtype)
    # NaN and inf pass through: frexp gives them exponent 0, so a NaN bit count would
    # otherwise read as a small finite one.
    return jnp.where(jnp.isfinite(v), exact, v)


@jax.custom_jvp
def ceil_log2_ste(v: jax.Array) -> jax.Array:
    """``ceil(log2 v)`` for ``v > 0``, exact in value, with the gradient of ``log2``.

    A bit count must not depend on a float ``log2`` landing a hair above an integer: with
    ``log2(8) = 3.0000002``, ``ceil`` would give a 4-bit quantizer 5 bits. The value comes
    from the binary exponent (exact); the gradient is the straight-through ``1/(v ln 2)``
    that the paper's ``ceil(log2(.))`` gets with a straight-through ceil (docs/method.md §3).
    NaN gives NaN and inf gives inf.
    """
    return _ceil_log2_exact(v)


@ceil_log2_ste.defjvp
def _ceil_log2_ste_jvp(primals, tangents):
    (v,), (t,) = primals, tangents
    return ceil_log2_ste(v), t / (v * jnp.log(jnp.asarray(2.0, v.dtype)))


@jax.custom_jvp
def log2_exact(v: jax.Array) -> jax.Array:
    """``log2 v`` for ``v > 0``, exact where ``v`` is a power of two (the usual gradient)."""
    f, e = jnp.frexp(v)
    return jnp.where(f == 0.5, (e - 1).astype(v.dtype), jnp.log2(v))


@log2_exact.defjvp
def _log2_exact_jvp(primals, tangents):
    (v,), (t,) = primals, tangents
    return log2_exact(v), t / (v * jnp.log(jnp.asarray(2.0, v.dtype)))


def exact_pow2(e: jax.Array, dtype) -> jax.Array:
    """``2**e`` for integer-valued float ``e``, exact (``exp2`` is not exact on every backend)."""
    info = jnp.finfo(dtype)
    e = jnp.clip(e, info.minexp, info.maxexp - 1).astype(jnp.int32)
    return jnp.ldexp(jnp.ones((), dtype), e)


# Mantissa bits of float32(√2) = 1.41421354 (just below √2, which is irrational).
_F32_SQRT2_MANTISSA = 0x3504F3


def pow2_round(v: jax.Array) -> jax.Array:
    """``2**round(log2 v)`` for positive normal ``v``, exactly, without a gradient rule.

    With ``v = m 2**e``, ``m`` in [1, 2): ``round(log2 v) = e + [m > √2]``. For float32 this
    is read off the bits (no log, no pow: ~7x faster on CPU than ``log2`` + ``ldexp``, and
    exact, where a float32 ``log2`` can misround within an ulp of a geometric midpoint; no
    float has ``m = √2``, so the tie rule never applies). Other dtypes take the log route.
    NaN is outside the contract (it comes back as 0 or inf): the quantizers never pass it
    one, and :func:`pow2_ste`, the snap of parameters, keeps NaN as NaN.
    """
    if v.dtype != jnp.float32:
        return exact_pow2(round_half_away(jnp.log2(v)), v.dtype)
    bits = lax.bitcast_convert_type(v, jnp.int32)
    up = (bits & 0x007FFFFF) > _F32_SQRT2_MANTISSA
    exponent = (bits & 0x7F800000) + jnp.where(up, jnp.int32(1 << 23), jnp.int32(0))
    return lax.bitcast_convert_type(exponent, jnp.float32)


@jax.custom_jvp
def pow2_ste(v: jax.Array) -> jax.Array:
    """Snap positive ``v`` to the nearest power of two in the log domain: ``2**round(log2 v)``.

    Gradient: straight-through in the log domain, ``d snap / d v = snap / v`` (docs/method.md §2,
    hardware constraint 3; docs/method.md §1.2, ``dQ/dx = P(a)/a``). The caller guarantees ``v >
    0``. A NaN stays NaN, so a diverged parameter is not snapped to a finite power of two.
    """
    return jnp.where(jnp.isnan(v), v, pow2_round(v))


@pow2_ste.defjvp
def _pow2_ste_jvp(primals, tangents):
    (v,), (t,) = primals, tangents
    snapped = pow2_ste(v)
    return snapped, t * (snapped / v)


def box(v: jax.Array, lo: float, hi: float) -> jax.Array:
    """Clip ``v`` to ``[lo, hi]``; gradient 1 strictly inside, 0 on the bounds and outside.

    The strict inequality matches NNabla's ``maximum_scalar``/``minimum_scalar`` backward
    (``x > val``), which the authors' code uses; ``jnp.clip`` would split the gradient 1/2 at
    a tie instead.
    """
    inside = (v > lo) & (v < hi)
    return jnp.where(inside, v, lax.stop_gradient(jnp.clip(v, lo, hi)))


def at_least(v: jax.Array, lo: float) -> jax.Array:
    """``max(v, lo)`` with gradient only where ``v > lo`` (NNabla's ``maximum_scalar``)."""
    return jnp.where(v > lo, v, lax.stop_gradient(jnp.maximum(v, lo)))


@jax.custom_jvp
def exp2_int(e: jax.Array) -> jax.Array:
    """``2**e`` for integer-valued ``e``, exact in value, with the smooth gradient ``2**e ln 2``.

    Used for the bit-derived quantities ``2**k - 1`` of docs/method.md §2; ``jnp.power`` is not
    exact
    on every backend, and an inexact ``2**k`` would put U1's qmax off its own grid.
    A NaN exponent (a NaN bitwidth θ) gives NaN, not the 2**0 of a NaN-to-integer cast.
    """
    return jnp.where(jnp.isnan(e), e, exact_pow2(round_half_away(e), e.dtype))


@exp2_int.defjvp
def _exp2_int_jvp(primals, tangents):
    (e,), (t,) = primals, tangents
    y = exp2_int(e)
    return y, t * y * jnp.log(jnp.asarray(2.0, y.dtype))


def sum_to_params(
    contributions: tuple[jax.Array, ...], params: tuple[jax.Array, ...]
) -> tuple[jax.Array, ...]:
    """Reduce per-element gradient contributions to the shapes of their (broadcast) params.

    ``contributions[i]`` has the input's shape; ``params[i]`` is a scalar (per tensor) or an
    array of the input's rank with 1 on broadcast axes (per channel). Per-tensor params are
    summed in one variadic reduction over rows then a short final sum: on CPU, XLA runs a
    single full reduction about twice as slowly (one thread) and would make one pass per
    parameter.
    """
    if all(p.ndim == 0 for p in params):
        rows = _row_count(contributions[0].size)
        flat = [c.reshape(rows, -1) for c in contributions]
        zeros = tuple(jnp.zeros((), c.dtype) for c in flat)
        partial_sums = lax.reduce(
            tuple(flat), zeros, lambda a, b: tuple(u + v for u, v in zip(a, b, strict=True)), (1,)
        )
        return tuple(jnp.sum(s).astype(p.dtype) for s, p in zip(partial_sums, params, strict=True))
    out = []
    for c, p in zip(contributions, params, strict=True):
        if p.ndim == 0:
            out.append(jnp.sum(c).astype(p.dtype))
            continue
        axes = tuple(
            i for i, (n, m) in enumerate(zip(c.shape, p.shape, strict=True)) if m == 1 and n != 1
        )
        out.append(jnp.sum(c, axis=axes, keepdims=True).reshape(p.shape).astype(p.dtype))
    return tuple(out)


def _row_count(size: int) -> int:
    """A row count dividing ``size`` for the two-stage reduction of a 1-D array."""
    for rows in (1024, 256, 64, 16, 4, 2):
        if size % rows == 0 and size >= 4 * rows:
            return rows
    return 1
