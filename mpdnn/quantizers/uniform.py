"""Uniform (fixed-point) quantizer in canonical form (d, qmax) and its inferred bitwidth.

SPEC §1.1 and §3; paper Eq. (1) and §2.3. Pure ``jax.numpy``; gradients come from autodiff of
the formulas, with the straight-through rounding of :mod:`mpdnn.quantizers._ste`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mpdnn.quantizers._ste import at_least, ceil_ste, round_ste, round_to_grid


def clip_to_range(x: jax.Array, qmax: jax.Array, *, signed: bool) -> jax.Array:
    """``clip(x, lo, qmax)`` with ``lo = -qmax`` (signed) or 0 (unsigned, a clipped ReLU).

    Gradients (SPEC §1.1): ``dc/dx = 1`` strictly inside ``(lo, qmax)``; ``dc/dqmax = +1``
    where ``x >= qmax`` and ``-1`` where ``x <= -qmax`` (signed). Ties go to the bound, as in
    NNabla's ``clip_by_value``.
    """
    lo = -qmax if signed else jnp.zeros_like(qmax)
    return jnp.where(x >= qmax, qmax, jnp.where(x > lo, x, lo))


def quantize(x: jax.Array, d: jax.Array, qmax: jax.Array, *, signed: bool) -> jax.Array:
    """``Q(x) = d * round(clip(x, lo, qmax) / d)``, round half away from zero, STE.

    Gradients: ``dQ/dx = 1`` inside the range, else 0; ``dQ/dd = round(c/d) - c/d``
    (``(Q - x)/d`` inside, bounded by 1/2); ``dQ/dqmax = ±1`` outside, 0 inside.
    """
    return round_to_grid(clip_to_range(x, qmax, signed=signed), d)


def bits(d: jax.Array, qmax: jax.Array, *, signed: bool, b_min: float) -> jax.Array:
    """Inferred bitwidth (SPEC §3): ``max(ceil(log2(q/d + 1) + signed), b_min)``.

    ``q = round(qmax/d) * d`` is qmax snapped to the grid, so the count matches the levels the
    quantizer can really output. The ``+1`` (signed) is the sign bit. Ceil and round are
    straight-through, so the result is differentiable w.r.t. ``d`` and ``qmax``.
    """
    q = round_ste(qmax / d) * d
    b = jnp.log2(q / d + 1.0)
    if signed:
        b = b + 1.0
    return at_least(ceil_ste(b), b_min)
