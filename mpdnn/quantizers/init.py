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

import jax
import jax.numpy as jnp

from mpdnn.quantizers._ste import round_half_away
from mpdnn.quantizers.spec import QuantSpec

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
        values["qmin"] = qmax / 2.0 ** (2.0 ** spec.magnitude_bits(bits) - 1.0)
    theta = {}
    for name in spec.theta_names:
        lo, hi = spec.box(name)
        theta[name] = _inside(values[name], lo, hi)
    return theta


def _check_bits(spec: QuantSpec, bits: int) -> None:
    # Every start is first a uniform grid (docs/method.md §4), which needs one magnitude bit beside
    # the
    # sign: 2 bits signed, 1 unsigned, whatever the family.
    too_few = bits < (2 if spec.signed else 1)
    if too_few or spec.magnitude_bits(bits) < (1 if spec.family == "uniform" else 0):
        raise ValueError(f"cannot start a {spec.describe()} quantizer at {bits} bits")


def init_weight_theta(
    spec: QuantSpec, bits: int = 4, weights: jax.typing.ArrayLike | None = None
) -> dict[str, jax.Array]:
    """Raw θ for a weight quantizer starting at ``bits`` bits (docs/method.md §4).

    With ``weights`` (a float network's kernel, or for a bias quantizer its layer's kernel)
    the step follows ``max|W|``; without, the random-init step ``2**-3``.
    """
    _check_bits(spec, bits)
    step = jnp.float32(RANDOM_INIT_STEP)
    if weights is not None:
        wmax = jnp.max(jnp.abs(jnp.asarray(weights, jnp.float32)))
        ratio = jnp.where(wmax > 0, wmax, 1.0) / (2.0 ** (bits - 1) - 1.0)
        rounding = jnp.ceil if bits > 4 else jnp.floor
        step = jnp.where(wmax > 0, 2.0 ** rounding(jnp.log2(ratio)), step)
    return _express(spec, _uniform_start(spec, bits, step), bits)


def init_activation_theta(spec: QuantSpec, bits: int = 4) -> dict[str, jax.Array]:
    """Raw θ for an activation quantizer starting at ``bits`` bits: ``d0 = 2**-3`` (docs/method.md
    §4).
    """
    _check_bits(spec, bits)
    return _express(spec, _uniform_start(spec, bits, jnp.float32(RANDOM_INIT_STEP)), bits)
