"""Freezing θ once the budgets are met (ours, docs/method.md §13: ``budget.freeze_epoch``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mpdnn.optim import Budget, freeze_quantizer_params, freeze_values
from mpdnn.optim.accounting import leaves_by_path
from tests.optim.cases import TINY_W_KB


def test_freeze_keeps_theta_from_the_first_feasible_update_at_or_after_its_start(tiny):
    acc, params, _ = tiny
    budgets = [Budget("weight_kb", TINY_W_KB + 1e-6)]  # met where θ stay at 4 bits
    tx = optax.chain(optax.sgd(0.1), freeze_quantizer_params(acc, budgets, start_step=2))
    state = tx.init(params)
    update = jax.jit(tx.update)
    grads = jax.tree.map(lambda v: jnp.full_like(v, 1e-3), params)  # small: bits stay 4
    history = [params]
    for _ in range(5):
        updates, state = update(grads, state, history[-1])
        history.append(optax.apply_updates(history[-1], updates))
    frozen = freeze_values(state)
    assert int(frozen.frozen_at) == 2 and bool(frozen.frozen) and int(frozen.count) == 5
    theta = [p for p in acc.learned_paths()]
    flat = [leaves_by_path(p) for p in history]
    for path in theta:
        assert not np.array_equal(flat[0][path], flat[2][path])  # moved before the freeze
        for later in flat[3:]:
            np.testing.assert_array_equal(later[path], flat[2][path])
    for path in ("fc1.kernel", "fc2.bias"):
        assert not np.array_equal(flat[4][path], flat[5][path])  # weights train on
    # over budget at the start step: no freeze until a feasible update comes
    tx = freeze_quantizer_params(acc, [Budget("weight_kb", 0.001)], start_step=0)
    _, state = jax.jit(tx.update)(grads, tx.init(params), params)
    assert int(state.frozen_at) == -1 and freeze_values(optax.sgd(0.1).init(params)) is None
