"""Uniform (fixed-point) quantizer in canonical form (d, qmax) and its inferred bitwidth.

docs/method.md §1.1 and §3; paper Eq. (1) and §2.3. Pure ``jax.numpy``.

The quantizer itself is one straight-through primitive with a hand-written VJP. Autodiff of
the formula would be correct but slow: its transpose materialises one masked copy of the
cotangent per ``where`` and reduces each θ-gradient separately (10× a bare fake-quantizer on
CPU). The rule below recomputes the residuals from ``x`` in the backward pass and reduces both
θ-gradients in one pass (:func:`mpdnn.quantizers._ste.sum_to_params`). It is reverse-mode only:
``jax.jvp``/``jacfwd`` through it raise.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from mpdnn.quantizers._ste import (
    at_least,
    ceil_log2_ste,
    round_half_away,
    round_ste,
    sum_to_params,
)


def _bounds(qmax: jax.Array, signed: bool) -> jax.Array:
    return -qmax if signed else jnp.zeros_like(qmax)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def quantize(x: jax.Array, d: jax.Array, qmax: jax.Array, signed: bool) -> jax.Array:
    """``Q(x) = d * round(clip(x, lo, qmax) / d)``, ``lo = -qmax`` (signed) or 0 (unsigned).

    Rounds half away from zero. Straight-through gradients (docs/method.md §1.1):

    * ``dQ/dx = 1`` strictly inside ``(lo, qmax)``, else 0 (unsigned: 0 for x <= 0, the
      clipped ReLU);
    * ``dQ/dd = round(c/d) - c/d`` (``(Q - x)/d`` inside the range, bounded by 1/2);
    * ``dQ/dqmax = +1`` where ``x >= qmax``, ``-1`` where ``x <= -qmax`` (signed), else 0.
      Ties go to the bound, as in NNabla's ``clip_by_value``.

    ``d`` and ``qmax`` are scalars or arrays broadcast to ``x``'s rank (per channel).

    NaN in, NaN out, with no extra operation: clip and round keep a NaN ``x``, and a NaN
    ``d`` or ``qmax`` makes every output NaN. (A NaN ``x`` gets ``dQ/dx = 1`` and a NaN
    ``dQ/dd``: it is not outside the range.)
    """
    c = jnp.clip(x, _bounds(qmax, signed), qmax)
    return d * round_half_away(c / d)


def _quantize_fwd(x, d, qmax, signed):
    return quantize(x, d, qmax, signed), (x, d, qmax)


def _quantize_bwd(signed, residuals, g):
    x, d, qmax = residuals
    # Recompute from x instead of letting XLA share clip(x)/d with the forward pass: sharing
    # materialises a full-size temporary and costs one more pass than it saves.
    x = lax.optimization_barrier(x)
    lo = _bounds(qmax, signed)
    above = x >= qmax
    below = x <= lo
    grad_x = jnp.where(above | below, jnp.zeros_like(g), g)
    scaled = jnp.clip(x, lo, qmax) / d
    outside = above.astype(g.dtype)
    if signed:
        outside = outside - below.astype(g.dtype)
    grad_d, grad_qmax = sum_to_params(
        (g * (round_half_away(scaled) - scaled), g * outside), (d, qmax)
    )
    return grad_x, grad_d, grad_qmax


quantize.defvjp(_quantize_fwd, _quantize_bwd)


def bits(d: jax.Array, qmax: jax.Array, *, signed: bool, b_min: float) -> jax.Array:
    """Inferred bitwidth (docs/method.md §3): ``max(ceil(log2(q/d + 1) + signed), b_min)``.

    ``q = round(qmax/d) * d`` is qmax snapped to the grid, so ``q/d = round(qmax/d)`` counts
    the positive levels the quantizer really outputs; the ``+1`` (signed) is the sign bit.
    Round and ceil are straight-through, so the result is differentiable w.r.t. ``d`` and
    ``qmax``; the ceil of the log is computed exactly (:func:`ceil_log2_ste`). A NaN ``d``
    or ``qmax`` gives NaN bits.
    """
    b = ceil_log2_ste(round_ste(qmax / d) + 1.0)
    if signed:
        b = b + 1.0
    return at_least(b, b_min)
