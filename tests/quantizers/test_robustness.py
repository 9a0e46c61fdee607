"""No NaN/inf anywhere; dtypes round-trip; jit, vmap and forward mode; spec validation."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mpdnn.quantizers as mq
from tests.quantizers.cases import all_spec_kwargs, spec_id

SPECS = all_spec_kwargs()

# θ inside, on and far outside every box, including the degenerate qmin = qmax and
# qmin > qmax, and raw values of the wrong sign.
EXTREME = [-1e6, -1.0, 0.0, 2**-16, 2**-8, 1.0, 8.0, 127.0, 255.0, 1e6]
X_EXTREME = jnp.array(
    [0.0, -0.0, 1e-30, -1e-30, 1e-8, 0.5, -3.0, 1e4, -1e4, 3e38, -3e38], jnp.float32
)


def _finite(tree) -> bool:
    return all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize("kw", SPECS, ids=spec_id)
def test_no_nan_or_inf_in_values_or_gradients(kw):
    spec = mq.QuantSpec(**kw)
    names = spec.theta_names

    @jax.jit
    def everything(x, theta):
        y, vjp = jax.vjp(lambda x, t: mq.quantize(x, t, spec), x, theta)
        gx, gt = vjp(jnp.ones_like(y))
        b, gb = jax.value_and_grad(lambda t: mq.bitwidth(t, spec))(theta)
        return y, gx, gt, b, gb

    rng = np.random.default_rng(0)
    cases = [{n: v for n in names} for v in EXTREME]  # every θ equal, e.g. qmin = qmax
    cases += [{n: float(rng.choice(EXTREME)) for n in names} for _ in range(30)]
    for theta in cases:
        out = everything(X_EXTREME, {k: jnp.float32(v) for k, v in theta.items()})
        assert _finite(out), (theta, out)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("family", ["uniform", "pow2"])
def test_dtype_round_trip_and_float32_rounding(dtype, family, maybe_jit):
    spec = mq.weight_spec(family)
    theta = mq.init_weight_theta(spec, bits=4)
    x = jax.random.normal(jax.random.key(0), (64,), jnp.float32).astype(dtype)
    f = maybe_jit(lambda x, t: mq.quantize(x, t, spec))
    y = f(x, theta)
    assert y.dtype == dtype and y.shape == x.shape
    # Rounding happens in float32 on the (exactly widened) input, then the grid value is
    # narrowed; with 4 bits every grid value is exact in every dtype here.
    expected = mq.quantize(x.astype(jnp.float32), theta, spec)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(expected))
    gx, gt = jax.grad(lambda x, t: f(x, t).astype(jnp.float32).sum(), argnums=(0, 1))(x, theta)
    assert gx.dtype == dtype
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(gt))
    assert _finite((gx, gt))


def test_integer_input_is_a_clear_error():
    with pytest.raises(TypeError, match="floating-point"):
        mq.quantize(jnp.arange(3), {"d": 0.5, "qmax": 1.0}, mq.QuantSpec())


def test_missing_theta_key_is_a_clear_error():
    with pytest.raises(KeyError, match="needs keys \\['d', 'qmax'\\]"):
        mq.quantize(jnp.ones(3), {"d": 0.5}, mq.QuantSpec())


def test_vmap_over_inputs_and_over_quantizers():
    spec = mq.QuantSpec()
    x = jax.random.normal(jax.random.key(1), (5, 32))
    theta = {"d": jnp.float32(0.125), "qmax": jnp.float32(1.0)}
    batched = jax.vmap(mq.quantize, in_axes=(0, None, None))(x, theta, spec)
    np.testing.assert_array_equal(batched, mq.quantize(x, theta, spec))
    # A batch of five quantizers, one per row: the same as five separate calls.
    thetas = {"d": jnp.full((5,), 0.125), "qmax": jnp.linspace(0.5, 2.0, 5)}
    rows = jax.vmap(lambda xi, ti: mq.quantize(xi, ti, spec))(x, thetas)
    for i in range(5):
        ti = {k: v[i] for k, v in thetas.items()}
        np.testing.assert_array_equal(rows[i], mq.quantize(x[i], ti, spec))
    bits = jax.vmap(lambda t: mq.bitwidth(t, spec))(thetas)
    assert bits.shape == (5,)


def test_per_channel_theta_broadcasts():
    spec = mq.QuantSpec()
    x = jax.random.normal(jax.random.key(2), (16, 3))
    theta = {"d": jnp.array([0.125, 0.25, 0.5]), "qmax": jnp.array([0.5, 1.0, 2.0])}
    y = mq.quantize(x, theta, spec)
    for c in range(3):
        tc = {k: v[c] for k, v in theta.items()}
        np.testing.assert_array_equal(y[:, c], mq.quantize(x[:, c], tc, spec))
    np.testing.assert_array_equal(mq.bitwidth(theta, spec), [4.0, 4.0, 4.0])


def test_spec_is_static_argument_and_leafless_pytree():
    spec = mq.QuantSpec()
    x = jnp.linspace(-2, 2, 9)
    theta = {"d": 0.25, "qmax": 1.0}
    a = jax.jit(mq.quantize, static_argnums=2)(x, theta, spec)
    b = jax.jit(mq.quantize)(x, theta, spec)  # spec passes through jit as a pytree
    np.testing.assert_array_equal(a, b)
    assert jax.tree.leaves(spec) == []
    assert hash(spec) == hash(mq.QuantSpec(b_range=(2.0, 8.0)))


def test_reverse_mode_only_and_bitwidth_forward_mode():
    """The quantizers are custom_vjp rules (single-pass backward): forward mode is refused
    loudly rather than silently wrong; bitwidth, a smooth-STE function, supports both."""
    x = jax.random.normal(jax.random.key(3), (50,))
    for spec in (mq.QuantSpec(), mq.QuantSpec(family="pow2", parametrization="b_qmin")):
        theta = mq.init_weight_theta(spec, 4)
        with pytest.raises(TypeError, match="forward-mode"):
            jax.jvp(lambda x, t=theta, s=spec: mq.quantize(x, t, s), (x,), (jnp.ones_like(x),))
    spec = mq.QuantSpec(family="pow2", parametrization="b_qmin")
    theta = {"b": jnp.float32(4.2), "qmin": jnp.float32(0.01)}
    fwd = jax.jacfwd(lambda t: mq.bitwidth(t, spec))(theta)
    rev = jax.grad(lambda t: mq.bitwidth(t, spec))(theta)
    for k in theta:
        np.testing.assert_allclose(fwd[k], rev[k], rtol=1e-6)


def test_spec_defaults_are_spec_section_10():
    s = mq.QuantSpec()
    assert (s.family, s.parametrization, s.signed, s.with_zero, s.pow2_step) == (
        "uniform",
        "d_qmax",
        True,
        False,
        True,
    )
    assert s.b_range == (2, 8) and s.d_range == (2**-8, 1.0)
    assert s.qmax_range == (2**-8, 127.0) and s.qmin_range == (2**-16, 127.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(family="int8"), "unknown family"),
        (dict(family="pow2", parametrization="d_qmax"), "unknown pow2 parametrization"),
        (dict(d_range=(1.0, 0.5)), "inverted"),
        (dict(qmax_range=(0.0, 1.0)), "positive"),
        (dict(b_range=(2, 40)), "b_range"),
        (dict(parametrization="b_d", b_range=(1, 8)), "needs at least 2 bits"),
        (
            dict(family="pow2", parametrization="b_qmax", with_zero=True, b_range=(1, 8)),
            "at least 2",
        ),
    ],
)
def test_bad_spec_is_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mq.QuantSpec(**kwargs)


def test_importing_quantizers_loads_no_flax_tensorflow_tfds_or_orbax():
    code = (
        "import sys, mpdnn.quantizers; "
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('flax', 'tensorflow', 'tensorflow_datasets', 'orbax')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("family", ["uniform", "pow2"])
def test_per_channel_theta_gradients_equal_per_column_gradients(family):
    spec = mq.weight_spec(family)
    x = jax.random.normal(jax.random.key(4), (64, 3))
    w = jax.random.normal(jax.random.key(5), (64, 3))
    if family == "uniform":
        theta = {"d": jnp.array([0.1, 0.2, 0.4]), "qmax": jnp.array([0.5, 1.1, 2.0])}
    else:
        theta = {"qmin": jnp.array([0.01, 0.05, 0.1]), "qmax": jnp.array([0.5, 1.1, 2.0])}
    g = jax.grad(lambda t: jnp.sum(w * mq.quantize(x, t, spec)))(theta)
    for c in range(3):
        tc = {k: v[c] for k, v in theta.items()}
        gc = jax.grad(lambda t, c=c: jnp.sum(w[:, c] * mq.quantize(x[:, c], t, spec)))(tc)
        for k in theta:
            np.testing.assert_allclose(g[k][c], gc[k], rtol=1e-5, atol=1e-6)


def test_pow2_round_matches_log_domain_rounding_and_is_exact_at_the_sqrt2_boundary():
    rng = np.random.default_rng(0)
    v = np.concatenate([np.exp(rng.uniform(-80, 80, 200_000)), 2.0 ** np.arange(-120, 120)]).astype(
        np.float32
    )
    got = np.asarray(mq.pow2_round(jnp.asarray(v)), np.float64)
    lg = np.log2(v.astype(np.float64))
    away_from_mid = np.abs(lg - np.floor(lg) - 0.5) > 1e-6
    np.testing.assert_array_equal(got[away_from_mid], 2.0 ** np.round(lg[away_from_mid]))
    # float32(√2) = 1.41421354 < √2 rounds down; the next float up, 1.41421366 > √2, rounds up.
    below = np.float32(np.sqrt(2.0))
    above = np.nextafter(below, np.float32(2))
    assert float(below) < np.sqrt(2.0) < float(above)
    np.testing.assert_array_equal(mq.pow2_round(jnp.array([below, above]) * 8), [8.0, 16.0])
