"""Test cases shared by the pytest suite and ``scripts/check_quantizers_device.py``.

NumPy only (no pytest), so the same comparison against ``reference.py`` can run on a machine
that has JAX but no test tools, such as a lent GPU.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import mpdnn.quantizers as mq
from tests.quantizers import reference as ref


def all_spec_kwargs() -> list[dict]:
    """Every family × parametrization × signedness × with_zero (pow2) × pow2_step."""
    out = []
    for family, pars in mq.PARAMETRIZATIONS.items():
        zeros = (False, True) if family == "pow2" else (False,)
        for par, signed, with_zero, p2 in itertools.product(
            pars, (True, False), zeros, (True, False)
        ):
            out.append(
                dict(
                    family=family,
                    parametrization=par,
                    signed=signed,
                    with_zero=with_zero,
                    pow2_step=p2,
                )
            )
    return out


def spec_id(kw: dict) -> str:
    return "-".join(
        [
            kw["family"],
            kw["parametrization"],
            "s" if kw["signed"] else "u",
            *(["z"] if kw.get("with_zero") else []),
            "p2" if kw["pow2_step"] else "free",
        ]
    )


# Raw values per key: inside the weight boxes, and outside them on both sides.
THETA_CHOICES = {
    "b": [3.3, 4.6, 5.5001, 1.2, 9.7],
    "d": [0.3, 0.07, 0.011, 3.0, 1e-4],
    "qmax": [1.3, 0.6, 3.9, 200.0, 1e-3],
    "qmin": [0.02, 0.004, 0.2, 1e-7],
}


def theta_cases(spec: mq.QuantSpec, n: int, rng: np.random.Generator):
    names = spec.theta_names
    cases = [{k: THETA_CHOICES[k][0] for k in names}]  # one plain inside-the-box case
    for _ in range(n - 1):
        cases.append({k: float(rng.choice(THETA_CHOICES[k])) for k in names})
    # Store θ exactly as float32 so that both implementations see the same numbers.
    return [{k: float(np.float32(v)) for k, v in c.items()} for c in cases]


def inputs(spec: mq.QuantSpec, theta: dict, rng: np.random.Generator) -> np.ndarray:
    """x around the quantizer's range plus its exact bounds, minus near-ties.

    Near-ties (within 1e-3 of a rounding boundary) are dropped: float32 and float64 may
    round them differently, which says nothing about the formula.
    """
    v = ref.canonical(theta, spec)["val"]
    qmax = v["qmax"]
    x = rng.uniform(-2.0 * qmax, 2.0 * qmax, size=400)
    special = [0.0, qmax, -qmax, 2 * qmax, -2 * qmax]
    if spec.family == "pow2":
        qmin = v["qmin"]
        x = np.concatenate([x, rng.uniform(-2 * qmin, 2 * qmin, 100)])
        special += [qmin, -qmin, 0.5 * qmin, -0.3 * qmin]
    x = np.concatenate([x, special]).astype(np.float32).astype(np.float64)
    keep = np.ones_like(x, bool)
    if spec.family == "uniform":
        lo = -qmax if spec.signed else 0.0
        r = np.clip(x, lo, qmax) / v["d"]
        frac = np.abs(r) - np.floor(np.abs(r))
        keep &= np.abs(frac - 0.5) > 1e-3
    else:
        a = np.abs(x)
        with np.errstate(divide="ignore"):
            lg = np.log2(np.where(a > 0, a, 1.0))
        keep &= np.abs(lg - np.floor(lg) - 0.5) > 1e-3
        keep &= np.abs(a - v["qmin"] / math.sqrt(2.0)) > 1e-3 * v["qmin"]
    if not spec.pow2_step:
        # Derived bounds are inexact in float32 without the snap; exact-bound ties are
        # covered by the pow2_step=True cases, where every bound is exactly representable.
        for bound in (v["qmax"], v.get("qmin", v["qmax"])):
            keep &= np.abs(np.abs(x) - bound) > 1e-5 * bound
    return x[keep].astype(np.float32)


def check_against_reference(
    spec: mq.QuantSpec, rng: np.random.Generator, *, n_theta: int = 6, wrap: Callable = jax.jit
) -> None:
    """Values, dQ/dx and dQ/dθ of ``mq.quantize`` against ``reference.py``; raises on mismatch.

    ``wrap`` is ``jax.jit`` or the identity (eager).
    """

    def loss(x, theta, w):
        return jnp.sum(w * mq.quantize(x, theta, spec))

    value_and_grads = wrap(jax.value_and_grad(loss, argnums=(0, 1)))
    quant = wrap(lambda x, theta: mq.quantize(x, theta, spec))
    for theta in theta_cases(spec, n_theta, rng):
        x = inputs(spec, theta, rng)
        w = rng.normal(size=x.shape).astype(np.float32)
        q_ref, gx_ref, gt_ref = ref.quantize_and_grads(x, theta, spec, w)
        theta_j = {k: jnp.float32(v) for k, v in theta.items()}

        q = np.asarray(quant(jnp.asarray(x), theta_j), np.float64)
        np.testing.assert_allclose(q, q_ref, rtol=1e-6, atol=0, err_msg=f"values, θ={theta}")

        _, (gx, gt) = value_and_grads(jnp.asarray(x), theta_j, jnp.asarray(w))
        np.testing.assert_allclose(gx, gx_ref, rtol=1e-5, atol=1e-6, err_msg=f"dQ/dx, θ={theta}")
        # θ-gradients are float32 sums over x (rounding error ~ eps * sum|w| * sqrt(n)); with a
        # free step each c/d also carries error of order eps * qmax/d. A wrong formula, tie or
        # sign errs by ~|w_i|/2 on at least one term, far above this tolerance.
        v = ref.canonical(theta, spec)["val"]
        spread = 1.0 if spec.pow2_step else 1.0 + v["qmax"] / v.get("d", v["qmax"])
        atol = 4 * np.finfo(np.float32).eps * np.sum(np.abs(w)) * spread
        for k in theta:
            np.testing.assert_allclose(
                float(gt[k]), gt_ref[k], rtol=1e-5, atol=atol, err_msg=f"d/d{k}, θ={theta}"
            )


def bitwidth_boundary_cases(bits: int) -> list[tuple[mq.QuantSpec, dict, int]]:
    """(spec, θ, expected bits) exactly at and one level past a ``bits``-bit grid (docs/method.md
    §3).

    Counted by hand: a signed uniform grid with 2^(b-1) - 1 positive levels needs b bits and
    one more level needs b + 1; unsigned, 2^b - 1 levels above zero; signed pow2 without zero,
    2^(b-1) magnitudes spanning 2^(2^(b-1) - 1) from qmin to qmax.
    """
    d = 2.0**-6
    uni_s = mq.QuantSpec(qmax_range=(2**-8, 2.0**20))
    uni_u = mq.QuantSpec(signed=False, qmax_range=(2**-8, 2.0**20))
    p3 = mq.QuantSpec(family="pow2", parametrization="qmin_qmax", qmax_range=(2**-8, 2.0**120))
    cases = [
        (uni_s, {"d": d, "qmax": d * (2 ** (bits - 1) - 1)}, bits),
        (uni_s, {"d": d, "qmax": d * 2 ** (bits - 1)}, bits + 1),
        (uni_u, {"d": d, "qmax": d * (2**bits - 1)}, bits),
        (uni_u, {"d": d, "qmax": d * 2**bits}, bits + 1),
    ]
    if bits <= 7:  # the pow2 span 2^(2^(b-1)) must stay inside float32
        qmin = 2.0**-8  # inside the qmin box, and every qmax below stays inside its box
        cases += [
            (p3, {"qmin": qmin, "qmax": qmin * 2.0 ** (2 ** (bits - 1) - 1)}, bits),
            (p3, {"qmin": qmin, "qmax": qmin * 2.0 ** (2 ** (bits - 1))}, bits + 1),
        ]
    return cases


def check_bitwidths(rng: np.random.Generator, wrap: Callable = jax.jit) -> list[str]:
    """``mq.bitwidth`` against ``reference.bits`` for every spec, and at every boundary."""
    errors = []
    for kw in all_spec_kwargs():
        spec = mq.QuantSpec(**kw)
        bw = wrap(lambda theta, spec=spec: mq.bitwidth(theta, spec))
        for theta in theta_cases(spec, 12, rng):
            got = float(bw({k: jnp.float32(v) for k, v in theta.items()}))
            if got != ref.bits(theta, spec):
                errors.append(f"{spec_id(kw)} θ={theta}: {got} != {ref.bits(theta, spec)}")
    for bits in range(2, 17):
        for spec, theta, expected in bitwidth_boundary_cases(bits):
            got = float(wrap(lambda t, spec=spec: mq.bitwidth(t, spec))(theta))
            if got != expected:
                errors.append(f"boundary {spec.describe()} θ={theta}: {got} != {expected}")
    return errors
