"""Straight-through primitives: the only place where gradients are defined by hand.

Every rounding in mpdnn (to the grid, to an integer bitwidth, to a power of two) goes through
one of these. They are ``jax.custom_jvp`` rules, so they work under ``jit``, ``vmap``,
``grad`` and forward-mode autodiff alike.
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


def _exact_pow2(e: jax.Array, dtype) -> jax.Array:
    """``2**e`` for integer-valued float ``e``, exact (``exp2`` is not exact on every backend)."""
    info = jnp.finfo(dtype)
    e = jnp.clip(e, info.minexp, info.maxexp - 1).astype(jnp.int32)
    return jnp.ldexp(jnp.ones((), dtype), e)


@jax.custom_jvp
def pow2_ste(v: jax.Array) -> jax.Array:
    """Snap positive ``v`` to the nearest power of two in the log domain: ``2**round(log2 v)``.

    Gradient: straight-through in the log domain, ``d snap / d v = snap / v`` (SPEC §2,
    hardware constraint 3; SPEC §1.2, ``dQ/dx = P(a)/a``). The caller guarantees ``v > 0``.
    """
    return _exact_pow2(round_half_away(jnp.log2(v)), v.dtype)


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

    Used for the bit-derived quantities ``2**k - 1`` of SPEC §2; ``jnp.power`` is not exact
    on every backend, and an inexact ``2**k`` would put U1's qmax off its own grid.
    """
    return _exact_pow2(round_half_away(e), e.dtype)


@exp2_int.defjvp
def _exp2_int_jvp(primals, tangents):
    (e,), (t,) = primals, tangents
    y = exp2_int(e)
    return y, t * y * jnp.log(jnp.asarray(2.0, y.dtype))


@jax.custom_jvp
def round_to_grid(v: jax.Array, step: jax.Array) -> jax.Array:
    """``step * round(v / step)`` with the straight-through gradients of SPEC §1.1.

    ``d/dv = 1`` and ``d/dstep = round(v/step) - v/step``. Written as one rule rather than
    left to autodiff of the product: autodiff would transpose the two uses of ``step`` into
    two separate reductions, ``sum(g * round(v/step)) - sum(g * v/step)``, whose float32
    cancellation loses the small difference (errors ~eps * sum|v/step|). Here the gradient is
    a single reduction of the exact per-element residual.
    """
    return step * round_half_away(v / step)


@round_to_grid.defjvp
def _round_to_grid_jvp(primals, tangents):
    (v, step), (t_v, t_step) = primals, tangents
    scaled = v / step
    rounded = round_half_away(scaled)
    return step * rounded, t_v + t_step * (rounded - scaled)
