"""An independent NumPy (float64) reading of docs/method.md §1–3, forward values and closed-form
gradients.

Written from the SPEC's formulas only, without importing mpdnn's numerics, so that tests
compare the library against a second implementation rather than against itself. Gradients are
the closed forms of docs/method.md §1 chained by hand through the parametrizations of §2.
"""

from __future__ import annotations

import math

import numpy as np

LN2 = math.log(2.0)


def rha(v):
    """Round half away from zero."""
    v = np.asarray(v, np.float64)
    return np.sign(v) * np.floor(np.abs(v) + 0.5)


def snap(v):
    """Power-of-two snap and its STE derivative snapped/raw."""
    s = 2.0 ** rha(np.log2(v))
    return s, s / v


def boxed(v, lo, hi):
    """Clip and its derivative (1 strictly inside, else 0)."""
    return float(np.clip(v, lo, hi)), float(lo < v < hi)


def canonical(theta: dict, spec) -> dict:
    """Canonical params plus d(canonical)/d(raw θ) as nested dicts: out[p] = value, jac[p][t]."""
    fam, par = spec.family, spec.parametrization
    signed, wz, p2 = spec.signed, spec.with_zero, spec.pow2_step
    val, jac = {}, {}

    def raw(name):
        lo, hi = getattr(spec, f"{name}_range")
        return boxed(float(theta[name]), lo, hi)

    def maybe_snap(v):
        return snap(v) if p2 else (v, 1.0)

    if "b" in theta and par.startswith("b_"):
        bb, db = raw("b")
        b = float(rha(bb))
        k = b - signed - (wz if fam == "pow2" else 0)
        val["b"] = b
    if fam == "uniform":
        if par == "b_d":
            dr, dd_raw = raw("d")
            d, ds = maybe_snap(dr)
            lev = 2.0**k - 1
            val.update(d=d, qmax=d * lev)
            jac["d"] = {"d": ds * dd_raw, "b": 0.0}
            jac["qmax"] = {"d": lev * ds * dd_raw, "b": d * 2.0**k * LN2 * db}
        elif par == "b_qmax":
            q, dq = raw("qmax")
            lev = 2.0**k - 1
            d, ds = maybe_snap(q / lev)
            val.update(d=d, qmax=q)
            jac["d"] = {"qmax": ds * dq / lev, "b": ds * q * (-(2.0**k) * LN2 / lev**2) * db}
            jac["qmax"] = {"qmax": dq, "b": 0.0}
        else:
            dr, dd_raw = raw("d")
            d, ds = maybe_snap(dr)
            q, dq = raw("qmax")
            val.update(d=d, qmax=q)
            jac["d"] = {"d": ds * dd_raw, "qmax": 0.0}
            jac["qmax"] = {"d": 0.0, "qmax": dq}
        return {"val": val, "jac": jac}
    if par == "b_qmax":
        qr, dq = raw("qmax")
        qmax, qs = maybe_snap(qr)
        e = min(2.0**k - 1, 100.0)
        de = 2.0**k * LN2 * db if 2.0**k - 1 < 100 else 0.0
        qmin = qmax * 2.0**-e
        val.update(qmin=qmin, qmax=qmax)
        jac["qmax"] = {"qmax": qs * dq, "b": 0.0}
        jac["qmin"] = {"qmax": 2.0**-e * qs * dq, "b": -qmin * LN2 * de}
    elif par == "b_qmin":
        qr, dq = raw("qmin")
        qmin, qs = maybe_snap(qr)
        e = min(2.0**k - 1, 100.0)
        de = 2.0**k * LN2 * db if 2.0**k - 1 < 100 else 0.0
        qmax = qmin * 2.0**e
        val.update(qmin=qmin, qmax=qmax)
        jac["qmin"] = {"qmin": qs * dq, "b": 0.0}
        jac["qmax"] = {"qmin": 2.0**e * qs * dq, "b": qmax * LN2 * de}
    else:
        r1, d1 = raw("qmin")
        r2, d2 = raw("qmax")
        qmin, s1 = maybe_snap(r1)
        qmax, s2 = maybe_snap(r2)
        val.update(qmin=qmin, qmax=qmax)
        jac["qmin"] = {"qmin": s1 * d1, "qmax": 0.0}
        jac["qmax"] = {"qmin": 0.0, "qmax": s2 * d2}
    return {"val": val, "jac": jac}


def uniform_forward(x, d, qmax, signed):
    """Q, dQ/dx, dQ/dd, dQ/dqmax of docs/method.md §1.1, elementwise."""
    x = np.asarray(x, np.float64)
    lo = -qmax if signed else 0.0
    c = np.clip(x, lo, qmax)
    r = rha(c / d)
    q = d * r
    dx = ((x > lo) & (x < qmax)).astype(np.float64)
    dd = r - c / d
    dqmax = (x >= qmax).astype(np.float64)
    if signed:
        dqmax = dqmax - (x <= -qmax)
    return q, dx, dd, dqmax


def pow2_forward(x, qmin, qmax, signed, with_zero):
    """Q, dQ/dx, dQ/dqmin, dQ/dqmax of docs/method.md §1.2, elementwise."""
    x = np.asarray(x, np.float64)
    if not signed:
        x = np.maximum(x, 0.0)
    s = np.where(x < 0, -1.0, 1.0)
    a = np.abs(x)
    i1 = a < qmin
    if with_zero:
        i1 &= a >= qmin / math.sqrt(2.0)
    i2 = (a >= qmin) & (a < qmax)
    i3 = a >= qmax
    p = np.where(i2, 2.0 ** rha(np.log2(np.where(i2, a, 1.0))), 0.0)
    q = s * (qmin * i1 + p * i2 + qmax * i3)
    dx = np.where(i2, p / np.where(i2, a, 1.0), 0.0)
    return q, dx, s * i1, s * i3


def quantize_and_grads(x, theta: dict, spec, cotangent):
    """Q(x), d<w,Q>/dx and d<w,Q>/dθ (dict over θ's keys) with w = cotangent."""
    c = canonical(theta, spec)
    v, jac = c["val"], c["jac"]
    w = np.asarray(cotangent, np.float64)
    if spec.family == "uniform":
        q, dx, dd, dqmax = uniform_forward(x, v["d"], v["qmax"], spec.signed)
        g_can = {"d": float(np.sum(w * dd)), "qmax": float(np.sum(w * dqmax))}
    else:
        q, dx, dqmin, dqmax = pow2_forward(x, v["qmin"], v["qmax"], spec.signed, spec.with_zero)
        g_can = {"qmin": float(np.sum(w * dqmin)), "qmax": float(np.sum(w * dqmax))}
    g_theta = {t: 0.0 for t in theta}
    for p, row in jac.items():
        for t, dpdt in row.items():
            g_theta[t] += g_can[p] * dpdt
    return q, w * dx, g_theta


def bits(theta: dict, spec) -> float:
    """Inferred or integer bitwidth of docs/method.md §3."""
    v = canonical(theta, spec)["val"]
    if spec.parametrization.startswith("b_"):
        return v["b"]
    b_min = spec.b_range[0]
    if spec.family == "uniform":
        q = rha(v["qmax"] / v["d"]) * v["d"]
        b = math.ceil(math.log2(q / v["d"] + 1.0) + (1.0 if spec.signed else 0.0))
        return float(max(b, b_min))
    levels = math.log2(v["qmax"] / v["qmin"]) + 1.0
    if levels <= 1.0:
        return float(b_min)
    # docs/method.md §3's +1 (sign or zero code); a signed grid with a zero code has 2·levels + 1
    # codes, one bit more (docs/method.md §3 states only the paper's two configurations).
    extra = 2.0 if (spec.signed and spec.with_zero) else 1.0
    return float(max(math.ceil(math.log2(levels)) + extra, b_min))
