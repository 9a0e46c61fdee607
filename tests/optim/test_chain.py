"""budget_chain, the run's whole update (docs/method.md §6, §13): the authors' order by default,
budgets checked up front, our switches reaching θ only."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mpdnn.optim import (
    Budget,
    BudgetState,
    FreezeState,
    OptionError,
    budget_chain,
    budget_penalty,
    budget_values,
    check_options,
    clip_quantizer_gradients,
    project_quantizer_params,
    sgd_nnabla,
)
from mpdnn.optim.accounting import leaves_by_path
from tests.optim.cases import CROSSED, float_count, node, random_like, with_values


def test_budget_chain_rejects_infeasible_budgets_and_runs(tiny):
    acc, params, _ = tiny
    smallest = acc.min_sizes()
    with pytest.raises(ValueError, match=f"{smallest['weight_kb']:.4f} KB"):
        budget_chain(acc, [Budget("weight_kb", 0.9 * smallest["weight_kb"])], 0.1)
    with pytest.raises(ValueError, match="method"):
        budget_chain(acc, [], 0.1, method="sgd")
    budgets = [Budget("weight_kb", 1.01 * smallest["weight_kb"]), Budget("act_max_kb", 1.0)]
    for method in ("penalty", "lagrangian"):
        tx = budget_chain(acc, budgets, 0.1, method=method, initial_multiplier=1.0)
        params_crossed = with_values(params, CROSSED)
        grads = jax.tree.map(jnp.ones_like, params)
        updates, state = jax.jit(tx.update)(grads, tx.init(params), params_crossed)
        new = optax.apply_updates(params_crossed, updates)
        assert budget_values(state).violations[0] > 0
        # θ end inside their boxes
        assert float(node(new, "fc2.kernel_quant.b")) <= 8.0
        assert float(node(new, "act.quant.qmax")) <= 255.0
    no_budget = budget_chain(acc, [], 0.1)
    assert budget_values(no_budget.init(params)) is None


def test_budget_chain_state_is_the_tree_checkpoints_hold(tiny):
    """The optimizer state a checkpoint saves and a resumed run restores into, part by part:
    budget → weight decay → clip → NNabla SGD (scale, trace) → projection → freeze."""
    acc, params, _ = tiny
    tx = budget_chain(acc, [Budget("weight_kb", 1.0)], 0.1, freeze_step=0)
    state = tx.init(params)
    budget, decay, clip, sgd, projection, freeze = state
    assert isinstance(budget, BudgetState) and isinstance(freeze, FreezeState)
    assert decay == clip == projection == optax.EmptyState()
    assert sgd[0] == optax.EmptyState() and isinstance(sgd[1], optax.TraceState)
    jax.tree.map(np.testing.assert_array_equal, sgd[1].trace, jax.tree.map(np.zeros_like, params))
    _, after = jax.jit(tx.update)(random_like(params, seed=3, scale=0.01), state, params)
    assert jax.tree.structure(after) == jax.tree.structure(state)


def test_budget_chain_defaults_are_the_authors_update(resnet):
    """budget_chain() with its defaults equals the chain written out by hand (module
    docstring), update for update; the θ switches then change θ's updates only."""
    acc, params = resnet
    budgets = [Budget("weight_kb", 100.0), Budget("act_max_kb", 7.0)]
    lr = float_count(optax.piecewise_constant_schedule(0.03, {2: 0.1}))
    by_hand = optax.chain(
        budget_penalty(acc, budgets),
        optax.add_decayed_weights(2e-4),
        clip_quantizer_gradients(acc),
        sgd_nnabla(lr, momentum=0.9),
        project_quantizer_params(acc),
    )
    grads = random_like(params, seed=1, scale=0.01)

    def run(tx, steps=3):
        state, p, out = tx.init(params), params, []
        update = jax.jit(tx.update)
        for _ in range(steps):
            u, state = update(grads, state, p)
            p = optax.apply_updates(p, u)
            out.append(p)
        return out

    for a, b in zip(run(budget_chain(acc, budgets, lr)), run(by_hand), strict=True):
        jax.tree.map(np.testing.assert_array_equal, a, b)
    ours = run(
        budget_chain(
            acc,
            budgets,
            lr,
            clip=False,
            quant_learning_rate_scale=0.3,
            quant_momentum=0.0,
            quant_update="log",
        )
    )
    paper = run(by_hand)
    learned = set(acc.learned_paths())
    a, b = leaves_by_path(ours[-1]), leaves_by_path(paper[-1])
    assert any(not np.allclose(a[p], b[p]) for p in learned)
    # weights and BatchNorm: the same SGD (the penalty reaches only θ)
    for path in a:
        if path not in learned:
            np.testing.assert_allclose(a[path], b[path], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="quant_update"):
        budget_chain(acc, budgets, lr, quant_update="adam")


FINITE_KB = "a finite number > 0 KB"


@pytest.mark.parametrize(
    ("options", "name", "value", "rule"),
    [
        ({"method": "sgd"}, "method", "sgd", "'penalty' or 'lagrangian'"),
        ({"quant_update": "adam"}, "quant_update", "adam", "'linear' or 'log'"),
        ({"quant_learning_rate_scale": 0.0}, "quant_learning_rate_scale", 0.0, "> 0"),
        ({"quant_momentum": 1.0}, "quant_momentum", 1.0, "in [0, 1)"),
        ({"budgets": [Budget("weight_kb", -1.0)]}, "limit_kb", -1.0, "a finite number > 0 KB"),
        (
            {"budgets": [Budget("weight_kb", math.inf)]},
            "limit_kb",
            math.inf,
            "a finite number > 0 KB",
        ),
        ({"budgets": [Budget("act_max_kb", 8.0, -0.1)]}, "strength", -0.1, ">= 0"),
        ({"budgets": [Budget("weight_kb", 70.0, 0.1, 1.0)]}, "margin", 1.0, "in [0, 1)"),
    ],
)
def test_check_options_names_the_option_its_value_and_rule(options, name, value, rule):
    """One error type for every bad option, structured so that a caller with its own option
    names (a training config) can say it in those."""
    with pytest.raises(OptionError) as info:
        check_options(**options)
    assert (info.value.name, info.value.value, info.value.rule) == (name, value, rule)
    assert str(info.value).startswith(f"{name} must be {rule}, got {value!r}")
    budgets = options.get("budgets")
    assert info.value.subject == (budgets[0].size if budgets else None)
    check_options([Budget("weight_kb", 70.0, 0.1, 0.02)], quant_momentum=0.0)  # all fine
