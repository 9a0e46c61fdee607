"""Power-of-two quantizer in canonical form (qmin, qmax) and its inferred bitwidth.

docs/method.md §1.2 and §3; paper Eq. (2). Pure ``jax.numpy``. Like the uniform quantizer, the
quantizer is one straight-through primitive with a hand-written, single-pass VJP (reverse mode
only); see :mod:`mpdnn.quantizers.uniform` for why.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from mpdnn.quantizers._ste import at_least, ceil_log2_ste, log2_exact, pow2_round, sum_to_params


def _regions(x, qmin, qmax, signed, with_zero):
    """Sign, magnitude and the indicators I1, I2, I3 of docs/method.md §1.2 (ReLU first if
    unsigned).
    """
    if not signed:
        x = jnp.maximum(x, jnp.zeros_like(x))
    s = jnp.where(x < 0, -jnp.ones_like(x), jnp.ones_like(x))  # sign(0) = +1
    a = jnp.abs(x)
    below = a < qmin
    if with_zero:
        below = below & (a >= qmin / math.sqrt(2.0))
    inside = (a >= qmin) & (a < qmax)
    above = a >= qmax
    # log2 only ever sees a > 0 (a >= qmin > 0 on I2), so neither value nor gradient can
    # meet log2(0) = -inf.
    a_safe = jnp.where(inside, a, jnp.ones_like(a))
    return s, a_safe, below, inside, above


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def quantize(
    x: jax.Array, qmin: jax.Array, qmax: jax.Array, signed: bool, with_zero: bool
) -> jax.Array:
    """``Q(x) = s * (qmin*I1 + 2**round(log2 a)*I2 + qmax*I3)``, ``a = |x|``, ``s = sign(x)``.

    ``I1 = [a < qmin]`` (with zero: ``[qmin/√2 <= a < qmin]``, smaller magnitudes map to 0),
    ``I2 = [qmin <= a < qmax]``, ``I3 = [a >= qmax]``; unsigned inputs pass a ReLU first.
    Indicators and sign carry no gradient (``sign(0) = +1``), so ``dQ/dx = P(a)/a`` on I2
    (straight-through in the log domain), ``dQ/dqmin = s`` on I1, ``dQ/dqmax = s`` on I3.
    The sum form is the authors'; it matters only when ``qmin > qmax``, where I1 and I3
    overlap.

    NaN in, NaN out: a NaN ``x``, or a NaN ``qmin``/``qmax`` (a diverged quantizer), gives NaN
    where it applies. Every indicator is false on NaN, so the formula alone would give 0, a
    value not even on a zero-less grid, and hide the divergence. The backward pass is the
    formula's: NaN elements pass no gradient to ``x`` or θ (a NaN cotangent still does).
    """
    s, a_safe, below, inside, above = _regions(x, qmin, qmax, signed, with_zero)
    p = pow2_round(a_safe)
    zero = jnp.zeros_like(x)
    q = s * (
        jnp.where(below, qmin, zero) + jnp.where(inside, p, zero) + jnp.where(above, qmax, zero)
    )
    nan = jnp.isnan(x) | (jnp.isnan(qmin) | jnp.isnan(qmax))
    return jnp.where(nan, jnp.full_like(q, jnp.nan), q)


def _quantize_fwd(x, qmin, qmax, signed, with_zero):
    return quantize(x, qmin, qmax, signed, with_zero), (x, qmin, qmax)


def _quantize_bwd(signed, with_zero, residuals, g):
    x, qmin, qmax = residuals
    x = lax.optimization_barrier(x)  # recompute, don't share temporaries (see uniform.py)
    s, a_safe, below, inside, above = _regions(x, qmin, qmax, signed, with_zero)
    p = pow2_round(a_safe)
    grad_x = jnp.where(inside, g * (p / a_safe), jnp.zeros_like(g))
    gs = g * s
    zero = jnp.zeros_like(g)
    grad_qmin, grad_qmax = sum_to_params(
        (jnp.where(below, gs, zero), jnp.where(above, gs, zero)), (qmin, qmax)
    )
    return grad_x, grad_qmin, grad_qmax


quantize.defvjp(_quantize_fwd, _quantize_bwd)


def bits(
    qmin: jax.Array,
    qmax: jax.Array,
    *,
    b_min: float,
    signed: bool = True,
    with_zero: bool = False,
) -> jax.Array:
    """Inferred bitwidth (docs/method.md §3): ``max(ceil(log2(log2(qmax/qmin) + 1)) + extra,
    b_min)``.

    ``log2(qmax/qmin) + 1`` is the number of magnitudes; ``extra`` is docs/method.md §3's ``+1``,
    the
    sign bit (weights) or the zero code (activations), and 2 for a signed quantizer with a
    zero code (a signed activation site, docs/method.md §7): its ``2·magnitudes + 1`` codes do not
    fit
    in one bit less (docs/method.md §3 is silent on this case; found by the property tests).
    Where ``qmax <= qmin`` there is one magnitude (the authors' formula would take the log
    of a non-positive number there; its result is ``b_min`` wherever it is defined, and so
    is ours). Both logs are exact on powers of two, so a snapped quantizer never gains a
    phantom bit from float error. A NaN ``qmin`` or ``qmax`` gives NaN bits.
    """
    levels = log2_exact(qmax / qmin) + 1.0
    # ``levels <= 1`` rather than ``not levels > 1``: NaN must stay NaN, not read as 1 level.
    safe = jnp.where(levels <= 1.0, lax.stop_gradient(jnp.ones_like(levels)), levels)
    extra = 2.0 if (signed and with_zero) else 1.0
    return at_least(ceil_log2_ste(safe) + extra, b_min)
