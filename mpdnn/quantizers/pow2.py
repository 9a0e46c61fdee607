"""Power-of-two quantizer in canonical form (qmin, qmax) and its inferred bitwidth.

SPEC §1.2 and §3; paper Eq. (2). Pure ``jax.numpy``; gradients come from autodiff of the
formulas, with the straight-through snap of :mod:`mpdnn.quantizers._ste`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from mpdnn.quantizers._ste import at_least, ceil_ste, pow2_ste


def quantize(
    x: jax.Array, qmin: jax.Array, qmax: jax.Array, *, signed: bool, with_zero: bool
) -> jax.Array:
    """``Q(x) = s * (qmin*I1 + 2**round(log2 a)*I2 + qmax*I3)``, ``a = |x|``, ``s = sign(x)``.

    ``I1 = [a < qmin]`` (or ``[qmin/√2 <= a < qmin]`` with zero, smaller magnitudes map to
    0), ``I2 = [qmin <= a < qmax]``, ``I3 = [a >= qmax]``; unsigned inputs pass a ReLU first.
    Indicators and sign carry no gradient (``sign(0) = +1``), so ``dQ/dx = P(a)/a`` on I2,
    ``dQ/dqmin = s`` on I1 and ``dQ/dqmax = s`` on I3. The sum form is the authors'; it
    matters only when ``qmin > qmax``, where I1 and I3 overlap.
    """
    if not signed:
        x = jnp.where(x > 0, x, jnp.zeros_like(x))
    s = lax.stop_gradient(jnp.where(x < 0, -1.0, 1.0).astype(x.dtype))
    a = jnp.abs(x)
    below = a < qmin
    if with_zero:
        below = below & (a >= qmin / math.sqrt(2.0))
    inside = (a >= qmin) & (a < qmax)
    above = a >= qmax
    # Double `where`: log2 is only ever evaluated on a > 0, so neither the value nor the
    # gradient can see log2(0) = -inf.
    p = pow2_ste(jnp.where(inside, a, jnp.ones_like(a)))
    i1, i2, i3 = (lax.stop_gradient(m.astype(x.dtype)) for m in (below, inside, above))
    return s * (qmin * i1 + p * i2 + qmax * i3)


def bits(qmin: jax.Array, qmax: jax.Array, *, b_min: float) -> jax.Array:
    """Inferred bitwidth (SPEC §3): ``max(ceil(log2(log2(qmax/qmin) + 1) + 1), b_min)``.

    ``log2(qmax/qmin) + 1`` is the number of magnitudes; the ``+1`` is the sign bit
    (weights) or the zero code (activations). Where ``qmax <= qmin`` there is one magnitude
    (the authors' formula would take the log of a non-positive number there; its result is
    ``b_min`` wherever it is defined, and so is ours).
    """
    levels = jnp.log2(qmax / qmin) + 1.0
    safe = jnp.where(levels > 1.0, levels, lax.stop_gradient(jnp.ones_like(levels)))
    return at_least(ceil_ste(jnp.log2(safe) + 1.0), b_min)
