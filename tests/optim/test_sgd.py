"""NNabla's momentum SGD (docs/method.md §8) and our SGD on log θ (docs/method.md §13), against
their update rules written out by hand."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mpdnn.optim import sgd_log_space, sgd_nnabla
from tests.optim.cases import float_count


def test_sgd_nnabla_keeps_the_learning_rate_inside_the_velocity():
    lr = float_count(optax.piecewise_constant_schedule(0.1, {1: 0.1}))  # 0.1, then 0.01
    p0 = jnp.array([1.0, -2.0])
    g1, g2 = jnp.array([0.5, 1.0]), jnp.array([-1.0, 2.0])
    tx = sgd_nnabla(lr, momentum=0.9)
    state = tx.init(p0)
    u1, state = tx.update(g1, state, p0)
    p1 = optax.apply_updates(p0, u1)
    u2, state = tx.update(g2, state, p1)
    p2 = optax.apply_updates(p1, u2)
    v1 = 0.1 * np.array([0.5, 1.0])
    v2 = 0.9 * v1 + 0.01 * np.array([-1.0, 2.0])
    np.testing.assert_allclose(p1, np.array([1.0, -2.0]) - v1, rtol=1e-6)
    np.testing.assert_allclose(p2, np.array([1.0, -2.0]) - v1 - v2, rtol=1e-6)
    # optax.sgd puts lr outside the velocity: it differs once lr changes
    sgd = optax.sgd(lr, momentum=0.9)
    s = sgd.init(p0)
    w1, s = sgd.update(g1, s, p0)
    w2, s = sgd.update(g2, s, p0)
    assert not np.allclose(optax.apply_updates(optax.apply_updates(p0, w1), w2), p2)


def test_sgd_log_space_steps_log_theta():
    """v ← m·v + lr·θ·g, θ ← θ·exp(−v), written out for two steps."""
    params = {"d": jnp.array(0.25), "qmax": jnp.array([1.5, 3.0])}
    grads = {"d": jnp.array(2.0), "qmax": jnp.array([-1.0, 0.5])}
    tx = sgd_log_space(lambda count: 0.1 / (count.astype(jnp.float32) + 1), momentum=0.5)
    state = tx.init(params)
    theta = {k: np.asarray(v, np.float64) for k, v in params.items()}
    velocity = {k: np.zeros_like(v) for k, v in theta.items()}
    current = params
    for step in range(2):
        updates, state = jax.jit(tx.update)(grads, state, current)
        current = optax.apply_updates(current, updates)
        for k in theta:
            velocity[k] = 0.5 * velocity[k] + 0.1 / (step + 1) * theta[k] * np.asarray(grads[k])
            theta[k] = theta[k] * np.exp(-velocity[k])
            np.testing.assert_allclose(current[k], theta[k], rtol=1e-6)
    assert int(state.count) == 2
    with pytest.raises(ValueError, match="params"):
        tx.update(grads, state)
