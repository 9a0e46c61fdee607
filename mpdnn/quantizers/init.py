"""Initial raw θ for every parametrization (docs/method.md §4).

All initialisers first build the *uniform* starting point (d0, qmax0) of docs/method.md §4, then
express it in the spec's own parametrization, so that every parametrization starts from the
same quantizer (what the paper's Fig. 3 and Table 1 compare):

* weights from a float network: ``d0 = 2**floor(log2(max|W| / (2**(b0-1) - 1)))`` (``ceil``
  instead of ``floor`` when ``b0 > 4``, as in the authors' code), ``qmax0 = d0 (2**(b0-1)-1)``;
* weights from random init: ``d0 = 2**-3``, ``qmax0 = d0 (2**(b0-1) - 1)``;
* activations: ``d0 = 2**-3``, ``qmax0 = d0 (2**b0 - 1)`` (= 1.875 for b0 = 4);
* pow2: ``qmax0 = 2**round(log2 qmax0_uniform)``, ``qmin0 = qmax0 / 2**(2**k - 1)`` with k
  the spec's magnitude bits at b0. For the paper's two configurations (signed weights without
  zero, unsigned activations with zero) k = b0 - 1, docs/method.md §4's formula; for any other
  configuration this keeps the initial pow2 quantizer at exactly b0 bits.

Decisions where the paper is silent: an all-zero weight tensor (e.g. a zero-initialised bias) falls
back to the random-init rule, since log2(0) has no step; every initial raw value is clipped
strictly *inside* its box (a relative margin of 2**-10 from each edge), because the box passes
no gradient on or outside its edges (docs/method.md §2), so a θ started on an edge would never
move. The
margin never changes the quantizer: snapped values and rounded bits land back on the edge
value. The step is clipped before qmax0 is derived from it, so the start keeps b0 bits. A
signed pow2 start at b0 >= 6 spans 2**31 octaves or more, beyond the default qmin box
(2**-16): its qmin is clipped and the start has fewer than b0 bits.
"""

from __future__ import annotations

import math
import numbers
import operator

import jax
import jax.numpy as jnp
import numpy as np

from mpdnn.quantizers._ste import round_half_away
from mpdnn.quantizers.parametrizations import check_spec
from mpdnn.quantizers.spec import MAX_BITS, QuantSpec

RANDOM_INIT_STEP = 2.0**-3
_EDGE_MARGIN = 2.0**-10  # relative distance from a box edge, see the module docstring


def _inside(value: jax.typing.ArrayLike, lo: float, hi: float) -> jax.Array:
    """Clip into ``[lo, hi]`` shrunk by a relative margin, where the box passes gradient."""
    lo_in, hi_in = lo * (1 + _EDGE_MARGIN), hi * (1 - _EDGE_MARGIN)
    if not lo_in < hi_in:  # a degenerate box (e.g. TQT's fixed b): nothing is learned anyway
        lo_in = hi_in = lo
    return jnp.clip(jnp.asarray(value, jnp.float32), lo_in, hi_in)


def _uniform_start(spec: QuantSpec, bits: int, step: jax.Array) -> dict[str, jax.Array]:
    """Canonical uniform start (d, qmax, b) for ``bits`` with step ``step`` (boxed first)."""
    step = _inside(step, *spec.d_range)
    levels = 2.0 ** (bits - 1) - 1.0 if spec.signed else 2.0**bits - 1.0
    return {"b": jnp.float32(bits), "d": step, "qmax": step * levels}


def _express(spec: QuantSpec, start: dict[str, jax.Array], bits: int) -> dict[str, jax.Array]:
    """Write a uniform start in ``spec``'s parametrization, each value clipped to its box."""
    values = dict(start)
    if spec.family == "pow2":
        qmax = 2.0 ** round_half_away(jnp.log2(start["qmax"]))
        values["qmax"] = qmax
        # A Python float overflows past 2**1023 (a pow2 start above ~11 bits); the float32
        # qmin is 0 well before that, and the box clips it, so capping changes no start.
        octaves = min(2.0 ** spec.magnitude_bits(bits) - 1.0, 1023.0)
        values["qmin"] = qmax / 2.0**octaves
    theta = {}
    for name in spec.theta_names:
        lo, hi = spec.box(name)
        theta[name] = _inside(values[name], lo, hi)
    return theta


def _check_bits(spec: object, bits: object, where: str) -> int:
    """``bits`` as an int after the checks of :func:`init_weight_theta`'s docstring."""
    check_spec(spec, where)
    if isinstance(bits, bool | np.bool_):
        raise TypeError(f"{where}: bits must be a whole number of bits, got bool {bits!r}")
    if isinstance(bits, numbers.Real):
        value = float(bits)
        if not value.is_integer():
            raise ValueError(f"{where}: bits must be a whole number of bits, got {bits!r}")
        bits = int(value)
    else:
        try:
            bits = operator.index(bits)
        except TypeError:
            raise TypeError(
                f"{where}: bits must be a Python integer, got {type(bits).__name__} {bits!r}"[:200]
            ) from None
    # Every start is first a uniform grid (docs/method.md §4), which needs one magnitude bit
    # beside the sign: 2 bits signed, 1 unsigned, whatever the family.
    lo = max(2 if spec.signed else 1, math.ceil(spec.b_range[0]))
    if spec.learns_bits:
        hi, why = math.floor(spec.b_range[1]), "b is a raw θ boxed to spec.b_range"
    else:
        hi, why = MAX_BITS, f"b_range[0] is b_min; no QuantSpec box exceeds {MAX_BITS} bits"
    if not lo <= bits <= hi:
        raise ValueError(
            f"cannot start a {spec.describe()} quantizer at {bits} bits: expected an integer "
            f"in [{lo}, {hi}] ({why})"
        )
    return bits


def init_weight_theta(
    spec: QuantSpec, bits: int = 4, weights: jax.typing.ArrayLike | None = None
) -> dict[str, jax.Array]:
    """Raw θ for a weight quantizer starting at ``bits`` bits (docs/method.md §4).

    With ``weights`` (a float network's kernel, or for a bias quantizer its layer's kernel)
    the step follows ``max|W|``; without, the random-init step ``2**-3``.

    ``bits`` must be a whole number (an int, or a float such as ``4.0``) in ``[lo, hi]``.
    ``lo`` is the larger of ``spec.b_range[0]`` (``b_min``, docs/method.md §3: a start below it
    would be accounted at ``b_min`` bits) and the smallest grid, 2 bits signed or 1 unsigned.
    ``hi`` depends on whether b is learned. For U1, U2 and the b-based pow2 cases it is
    ``spec.b_range[1]``, the authors' box (8 by default, docs/method.md §2 constraint 1), since
    a start outside the box would be clipped to it silently (``bits=100`` would start at 8).
    For U3 and P3 the inferred bits have no upper cap (docs/method.md §3), so ``hi`` is 24, the
    widest bitwidth any :class:`QuantSpec` box allows (``2**(b-1)`` levels exact in float32).
    Their d, qmax and qmin boxes can still clip a wide start to fewer bits (docs/method.md §4).
    Anything else is a ValueError (a TypeError for a non-number).

    ``weights`` must be numeric, non-empty and finite. A concrete array holding NaN or inf
    raises ValueError. Under ``jax.jit`` the values are traced and cannot be checked. Then
    non-finite weights give a NaN step, and so NaN θ (a learned ``b`` stays ``bits``), which
    :func:`mpdnn.quantizers.bitwidth` reports as NaN bits and
    :func:`mpdnn.quantizers.quantize` as NaN outputs, rather than the random-init θ that a
    silent fallback would give.
    """
    bits = _check_bits(spec, bits, "init_weight_theta")
    step = jnp.float32(RANDOM_INIT_STEP)
    if weights is not None:
        try:
            w = jnp.asarray(weights, jnp.float32)
        except (TypeError, ValueError):
            raise TypeError(
                f"init_weight_theta: weights must be a numeric array, got {type(weights).__name__}"
            ) from None
        if w.size == 0:
            raise ValueError(
                f"init_weight_theta: weights of shape {w.shape} are empty; pass the layer's "
                "kernel, or weights=None for the random-init step"
            )
        wmax = jnp.max(jnp.abs(w))
        finite = jnp.isfinite(wmax)
        try:
            concrete_finite = bool(finite)
        except jax.errors.ConcretizationTypeError:  # traced under jit: NaN θ, see above
            concrete_finite = True
        if not concrete_finite:
            raise ValueError(
                f"init_weight_theta: weights contain NaN or inf (max|W| = {float(wmax)}); the "
                "float-net init (docs/method.md §4) needs finite weights"
            )
        ratio = jnp.where(wmax > 0, wmax, 1.0) / (2.0 ** (bits - 1) - 1.0)
        rounding = jnp.ceil if bits > 4 else jnp.floor
        step = jnp.where(wmax > 0, 2.0 ** rounding(jnp.log2(ratio)), step)
        step = jnp.where(finite, step, jnp.float32(jnp.nan))
    return _express(spec, _uniform_start(spec, bits, step), bits)


def init_activation_theta(spec: QuantSpec, bits: int = 4) -> dict[str, jax.Array]:
    """Raw θ for an activation quantizer starting at ``bits`` bits: ``d0 = 2**-3`` (docs/method.md
    §4).

    ``bits`` is checked as in :func:`init_weight_theta`.
    """
    bits = _check_bits(spec, bits, "init_activation_theta")
    return _express(spec, _uniform_start(spec, bits, jnp.float32(RANDOM_INIT_STEP)), bits)
