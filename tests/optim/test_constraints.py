"""Budget transforms (docs/method.md §6): the paper's penalty, our Lagrangian, feasibility.

Expected gradients come from docs/method.md §3 and §5 in closed form (sizes are step functions with
straight-through gradients, so finite differences would mean nothing).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mpdnn.optim import (
    Budget,
    BudgetState,
    budget_lagrangian,
    budget_penalty,
    budget_values,
    feasible,
    within_limits,
)
from tests.optim.cases import (
    A4_SUM_KB,
    KB,
    TINY_A_KB,
    TINY_W_KB,
    W4_KB,
    node,
    u3_weight_size_grad,
    zeros_like,
)

# ----------------------------------------------------------------------------------------
# budget_penalty (ResNet-20: each transform compiled once, several budgets at a time)


def test_penalty_gradient_is_the_closed_form_of_spec_6(resnet):
    acc, params = resnet
    budgets = [Budget("weight_kb", 100.0, 0.1), Budget("act_sum_kb", 50.0, 0.5)]
    tx = budget_penalty(acc, budgets)
    state = tx.init(params)
    assert state.count == 0 and state.multipliers.tolist() == pytest.approx([0.1, 0.5])
    updates, state = jax.jit(tx.update)(zeros_like(params), state, params)
    g_w, g_a = W4_KB - 100.0, A4_SUM_KB - 50.0
    np.testing.assert_allclose(state.violations, [g_w, g_a], rtol=1e-6)
    assert int(state.count) == 1
    # weight θ: only the weight budget reaches them
    for site, numel in (("stages.1.0.conv1", 9 * 16 * 32), ("head", 640), ("stem", 432)):
        theta = node(params, f"{site}.kernel_quant")
        ds_dd, ds_dqmax = u3_weight_size_grad(theta, numel)
        got = node(updates, f"{site}.kernel_quant")
        np.testing.assert_allclose(got["qmax"], 2 * 0.1 * g_w * ds_dqmax, rtol=1e-5)
        np.testing.assert_allclose(got["d"], 2 * 0.1 * g_w * ds_dd, rtol=1e-5)
    # activation θ, unsigned U3: b = ceil(log2(qmax/d + 1)) → ∂S/∂qmax = numel/((r+1) d ln 2)/8192
    d, qmax = 2.0**-3, 1.875  # activation init, docs/method.md §4
    ds_dqmax = 32 * 16 * 16 / ((qmax / d + 1) * d * math.log(2)) / KB
    np.testing.assert_allclose(
        node(updates, "stages.1.2.act1.quant.qmax"), 2 * 0.5 * g_a * ds_dqmax, rtol=1e-5
    )
    # the penalty is not the loss: weights and BatchNorm get nothing
    assert not np.any(node(updates, "stages.1.0.conv1.kernel"))
    assert not np.any(node(updates, "stages.1.0.bn1.scale"))


def test_penalty_chained_with_sgd_under_masked(resnet):
    """``optax.masked`` hands the penalty a tree whose weights are MaskedNode: it needs only
    the θ. Chained with SGD, θ move by −lr·(grad + penalty gradient)."""
    acc, params = resnet
    budgets = [Budget("weight_kb", 100.0)]
    is_theta = jax.tree_util.tree_map_with_path(
        lambda p, _: "quant" in jax.tree_util.keystr(p), params
    )
    tx = optax.chain(optax.masked(budget_penalty(acc, budgets), is_theta), optax.sgd(0.1))
    grads = jax.tree.map(lambda v: jnp.full_like(v, 0.01), params)
    updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
    assert budget_values(state).violations.tolist() == pytest.approx([W4_KB - 100.0])
    g = W4_KB - 100.0
    site = "stages.2.0.conv2"
    ds_dd, ds_dqmax = u3_weight_size_grad(node(params, f"{site}.kernel_quant"), 9 * 64 * 64)
    got = node(updates, f"{site}.kernel_quant")
    np.testing.assert_allclose(got["qmax"], -0.1 * (0.01 + 2 * 0.1 * g * ds_dqmax), rtol=1e-5)
    np.testing.assert_allclose(got["d"], -0.1 * (0.01 + 2 * 0.1 * g * ds_dd), rtol=1e-5)
    np.testing.assert_allclose(node(updates, f"{site}.kernel"), -0.001, rtol=1e-6)
    # masking the θ out leaves the accounting nothing to count: a clear error
    weights_only = optax.masked(
        budget_penalty(acc, budgets), jax.tree.map(lambda m: not m, is_theta)
    )
    with pytest.raises(ValueError, match="not in params"):
        weights_only.update(grads, weights_only.init(params), params)


def test_budget_arguments_are_checked(resnet):
    acc, params = resnet
    with pytest.raises(ValueError, match="> 0 KB"):
        budget_penalty(acc, [Budget("weight_kb", 0.0)])
    with pytest.raises(ValueError, match="no budgets"):
        budget_lagrangian(acc, [])
    with pytest.raises(ValueError, match="≥ 0"):
        budget_lagrangian(acc, [Budget("weight_kb", 1.0)], initial_multiplier=-1.0)
    with pytest.raises(ValueError, match="no \\['weights'\\]"):  # at init: it counts constraints
        budget_penalty(acc, [Budget("weights", 70.0)]).init(params)
    with pytest.raises(ValueError, match="margin must be in"):
        budget_penalty(acc, [Budget("weight_kb", 70.0, 0.1, 1.0)])
    tx = budget_penalty(acc, [Budget("weight_kb", 70.0)])
    with pytest.raises(ValueError, match="params"):
        tx.update(params, tx.init(params))


def test_penalty_is_zero_while_met_and_follows_a_schedule(tiny):
    acc, params, _ = tiny
    grads = jax.tree.map(jnp.ones_like, params)
    tx = budget_penalty(acc, [Budget("weight_kb", 1.0), Budget("act_max_kb", 1.0)])
    updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
    np.testing.assert_allclose(state.violations, [TINY_W_KB - 1.0, TINY_A_KB - 1.0], rtol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, updates, grads)  # exactly unchanged

    tx = budget_penalty(
        acc, [Budget("weight_kb", 0.01, lambda count: 0.1 * (count.astype(jnp.float32) + 1))]
    )
    state = tx.init(params)
    update = jax.jit(tx.update)
    first, state = update(zeros_like(params), state, params)
    assert int(state.count) == 1 and float(state.multipliers[0]) == pytest.approx(0.1)
    second, state = update(zeros_like(params), state, params)
    assert int(state.count) == 2 and float(state.multipliers[0]) == pytest.approx(0.2)
    q1, q2 = node(first, "fc1.kernel_quant.qmax"), node(second, "fc1.kernel_quant.qmax")
    assert float(q1) > 0
    np.testing.assert_allclose(q2, 2 * q1, rtol=1e-6)


# ----------------------------------------------------------------------------------------
# budget_lagrangian and budget_values


def test_lagrangian_dual_ascent_and_update_direction(resnet):
    """λ_j ← max(0, λ_j + η g_j): up while violated, down while met, clamped at 0; the
    update adds Σ_j λ_j ∇g_j with the λ_j *before* the ascent."""
    acc, params = resnet
    budgets = [
        Budget("weight_kb", 100.0),  # g = +31.03
        Budget("act_sum_kb", 100.0),  # g = −8: 0.5 → 0.42
        Budget("act_max_kb", 7.0),  # g = +1
        Budget("act_sum_kb", 150.0),  # g = −58: 0.5 − 0.58 → clamped to 0
    ]
    tx = budget_lagrangian(acc, budgets, dual_learning_rate=0.01, initial_multiplier=0.5)
    state = tx.init(params)
    assert state.multipliers.tolist() == pytest.approx([0.5] * 4)
    update = jax.jit(tx.update)
    first, state = update(zeros_like(params), state, params)
    g = np.array([W4_KB - 100.0, A4_SUM_KB - 100.0, 8.0 - 7.0, A4_SUM_KB - 150.0])
    np.testing.assert_allclose(state.violations, g, rtol=1e-6)
    lam1 = np.maximum(0.5 + 0.01 * g, 0.0)
    assert lam1[1] < 0.5 and lam1[3] == 0.0 and lam1[0] > 0.5
    np.testing.assert_allclose(state.multipliers, lam1, rtol=1e-6)
    second, state = update(zeros_like(params), state, params)
    np.testing.assert_allclose(state.multipliers, np.maximum(lam1 + 0.01 * g, 0), rtol=1e-6)
    assert int(state.count) == 2
    # a weight θ feels only the weight budget: 0.5·∂S_w first, then λ_w(1)·∂S_w
    site = "stages.2.1.conv2.kernel_quant"
    ds_dd, ds_dqmax = u3_weight_size_grad(node(params, site), 9 * 64 * 64)
    np.testing.assert_allclose(node(first, site)["qmax"], 0.5 * ds_dqmax, rtol=1e-5)
    np.testing.assert_allclose(node(second, site)["qmax"], lam1[0] * ds_dqmax, rtol=1e-5)
    np.testing.assert_allclose(node(second, site)["d"], lam1[0] * ds_dd, rtol=1e-5)


def test_budget_values_finds_the_state_in_chains_and_optimizers(tiny):
    acc, params, model = tiny
    budgets = [Budget("weight_kb", 0.01), Budget("act_max_kb", 1.0)]
    tx = optax.chain(
        optax.add_decayed_weights(2e-4),
        optax.chain(budget_lagrangian(acc, budgets, initial_multiplier=0.5), optax.sgd(0.1)),
    )
    _, state = jax.jit(tx.update)(zeros_like(params), tx.init(params), params)
    values = budget_values(state)
    assert isinstance(values, BudgetState)
    np.testing.assert_allclose(values.violations, [TINY_W_KB - 0.01, TINY_A_KB - 1.0], rtol=1e-6)
    assert budget_values(optax.sgd(0.1).init(params)) is None
    # nnx.Optimizer wraps its state in variables: budget_values hands back arrays
    model = nnx.clone(model)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    step = nnx.jit(lambda optimizer, model, grads: optimizer.update(model, grads))
    step(optimizer, model, jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param)))
    values = budget_values(optimizer.opt_state)
    assert isinstance(values.count, jax.Array) and int(values.count) == 1
    np.testing.assert_allclose(values.multipliers[0], 0.5 + 0.01 * (TINY_W_KB - 0.01), rtol=1e-6)


# ----------------------------------------------------------------------------------------
# Ours, beyond the paper (docs/method.md §13): every activation tensor, margins.


def test_max_gradient_all_and_first_differ_exactly_as_the_formulas_say(resnet):
    """ResNet-20 at 4-bit activations: 7 tensors of 16×32×32 (8 KB), 6 of 32×16×16 (4 KB),
    6 of 64×8×8 (2 KB). Against L = 3 KB, ``"first"`` (the max, docs/method.md §6) pushes the stem's
    tensor alone with 2λ(8 − 3); ``"all"`` (Σ_t λ max(0, S_t − L)²) pushes all 13 tensors
    above L, each with 2λ(S_t − L), and none below."""
    acc, params = resnet
    lam, limit = 0.5, 3.0
    first = budget_penalty(acc, [Budget("act_max_kb", limit, lam)])
    every = budget_penalty(acc.with_tensors, [Budget("act_kb", limit, lam)])
    u_first, s_first = jax.jit(first.update)(zeros_like(params), first.init(params), params)
    u_all, s_all = jax.jit(every.update)(zeros_like(params), every.init(params), params)
    np.testing.assert_allclose(s_first.violations, [8.0 - limit], rtol=1e-6)
    expected = [8.0 - limit] * 7 + [4.0 - limit] * 6 + [2.0 - limit] * 6
    np.testing.assert_allclose(s_all.violations, expected, rtol=1e-6)
    assert s_all.multipliers.shape == (19,)

    def ds_dqmax(numel):  # unsigned U3 at the activation init (docs/method.md §3, §4), in KB
        d, qmax = 2.0**-3, 1.875
        return numel / ((qmax / d + 1) * d * math.log(2)) / KB

    sites = [q.path for q in acc.quantizers if q.kind == "activation"]
    numels = [q.numel for q in acc.quantizers if q.kind == "activation"]
    assert sites[0] == "stem_act.quant" and len(sites) == 19
    for i, (site, numel) in enumerate(zip(sites, numels, strict=True)):
        g_first = float(node(u_first, f"{site}.qmax"))
        g_all = float(node(u_all, f"{site}.qmax"))
        want_first = 2 * lam * (8.0 - limit) * ds_dqmax(numel) if i == 0 else 0.0
        want_all = 2 * lam * max(expected[i], 0.0) * ds_dqmax(numel)
        np.testing.assert_allclose(g_first, want_first, rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(g_all, want_all, rtol=1e-5, atol=1e-9)
    assert sum(float(node(u_all, f"{s}.qmax")) != 0 for s in sites) == 13


def test_a_margin_moves_the_target_not_the_limit(resnet):
    acc, params = resnet
    budget = Budget("weight_kb", 120.0, 0.1, 0.05)  # 131.03 KB at 4 bits: target 114 KB
    assert budget.target_kb == pytest.approx(114.0)
    tx = budget_penalty(acc, [budget])
    updates, state = jax.jit(tx.update)(zeros_like(params), tx.init(params), params)
    g = W4_KB - 114.0
    np.testing.assert_allclose(state.violations, [g], rtol=1e-6)
    ds_dd, ds_dqmax = u3_weight_size_grad(node(params, "head.kernel_quant"), 640)
    np.testing.assert_allclose(
        node(updates, "head.kernel_quant")["qmax"], 2 * 0.1 * g * ds_dqmax, rtol=1e-5
    )
    # met at the limit but not at the target: the penalty still pulls, feasibility holds
    met = Budget("weight_kb", 132.0, 0.1, 0.05)
    tx = budget_penalty(acc, [met])
    _, state = jax.jit(tx.update)(zeros_like(params), tx.init(params), params)
    assert float(state.violations[0]) == pytest.approx(W4_KB - 0.95 * 132.0, rel=1e-6)
    assert W4_KB - 0.95 * 132.0 > 0
    assert bool(feasible(acc, [met], params)) and not bool(feasible(acc, [budget], params))


# ----------------------------------------------------------------------------------------
# within_limits: the host-side verdict


def test_within_limits_judges_every_limit_at_the_limit():
    sizes = {"weight_kb": 70.0, "act_max_kb": 8.0, "act_sum_kb": 500.0}
    assert within_limits(sizes, {"weight_kb": 70.0, "act_max_kb": 8.0})  # at the limit: met
    assert not within_limits(sizes, {"weight_kb": 70.0, "act_max_kb": 7.99})
    assert not within_limits(sizes, {"weight_kb": np.nextafter(70.0, 0.0)})
    assert within_limits(sizes, {"weight_kb": 71.0})  # act_sum_kb has no limit: not judged
    assert within_limits(sizes, {})  # no budget
    # sizes as the trainer fetches them: numpy and jax scalars
    assert within_limits({"weight_kb": np.float32(70.0)}, {"weight_kb": 70.0})
    assert not within_limits({"weight_kb": jnp.float32(70.5)}, {"weight_kb": np.float64(70.0)})
    assert not within_limits({"weight_kb": float("nan")}, {"weight_kb": 70.0})
    with pytest.raises(ValueError, match=r"no \['act_max_kb'\]"):
        within_limits({"weight_kb": 1.0}, {"weight_kb": 2.0, "act_max_kb": 8.0})


def test_within_limits_agrees_with_feasible_whatever_the_margin(tiny):
    """The host verdict on the sizes equals the jitted one on the params, at the limit and one
    float below it; a margin moves neither."""
    acc, params, _ = tiny
    host = {k: float(v) for k, v in jax.device_get(acc(params)).items()}
    assert host["weight_kb"] == pytest.approx(TINY_W_KB) and host["act_max_kb"] == TINY_A_KB
    for name in ("weight_kb", "act_max_kb"):
        at = np.float32(host[name])
        below = np.nextafter(at, np.float32(0.0))
        for limit, met in ((at, True), (below, False)):
            limits = {name: float(limit), "act_sum_kb": 1.0}
            assert within_limits(host, limits) is met
            for margin in (0.0, 0.5):
                budgets = [Budget(n, lim, 0.1, margin) for n, lim in limits.items()]
                assert bool(jax.jit(lambda p, b=budgets: feasible(acc, b, p))(params)) is met
