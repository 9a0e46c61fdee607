"""Budget transforms (docs/method.md §6): penalty, Lagrangian, the authors' clip and projection,
NNabla SGD.

Expected gradients come from docs/method.md §3 and §5 in closed form (sizes are step functions with
straight-through gradients, so finite differences would mean nothing); expected clips and
projections from the authors' rules written out with numpy.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mpdnn import models, nn
from mpdnn.optim import (
    Accounting,
    Budget,
    BudgetState,
    budget_chain,
    budget_lagrangian,
    budget_penalty,
    budget_values,
    clip_quantizer_gradients,
    feasible,
    freeze_quantizer_params,
    freeze_values,
    project,
    project_quantizer_params,
    sgd_log_space,
    sgd_nnabla,
)
from mpdnn.optim.accounting import leaves_by_path

KB = 8 * 1024
Q = nn.QuantConfig
NUM_WEIGHTS, NUM_ACTS = 268_346, 188_416  # ResNet-20, docs/method.md §5
W4_KB = NUM_WEIGHTS * 4 / KB  # every weight at 4 bits: 131.03 KB
A4_SUM_KB = NUM_ACTS * 4 / KB  # every activation at 4 bits: 92 KB


def node(tree, path: str):
    for key in path.split("."):
        tree = tree[int(key) if key.isdigit() else key]
    return tree


def zeros_like(tree):
    return jax.tree.map(jnp.zeros_like, tree)


@pytest.fixture(scope="module")
def resnet():
    """ResNet-20, U3 weights and activations learned from 4 bits (float-net init)."""
    model = models.build("resnet20", rngs=nnx.Rngs(0))
    nn.quantize_model(
        model,
        [nn.Rule(".*", Q(bits=4), kind="weight"), nn.Rule(".*", Q(bits=4), kind="activation")],
    )
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return Accounting.from_model(model), params


def u3_weight_size_grad(theta, numel: int) -> tuple[float, float]:
    """∂S/∂(d, qmax) in KB of one signed U3 weight site, from docs/method.md §2–3 by hand.

    d_s = 2^round(log2 d) (straight-through: ∂d_s/∂d = d_s/d); r = round(qmax/d_s) (STE);
    b = ceil(log2(r + 1)) + 1 (STE ceil): ∂b/∂r = 1/((r + 1) ln 2); S = numel·b/8192.
    """
    d, qmax = float(theta["d"]), float(theta["qmax"])
    d_s = 2.0 ** round(math.log2(d))
    r = qmax / d_s
    assert r == round(r)  # the init puts qmax on the grid, so round(r) = r
    db_dr = 1.0 / ((r + 1.0) * math.log(2.0))
    db_dqmax = db_dr / d_s
    db_dd = db_dr * (-qmax / d_s**2) * (d_s / d)
    return numel * db_dd / KB, numel * db_dqmax / KB


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


# ----------------------------------------------------------------------------------------
# budget_lagrangian


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


# ----------------------------------------------------------------------------------------
# The authors' stabilisers, on a small hand-made model with every kind of quantizer.


class Tiny(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.fc1 = nn.QLinear(4, 8, rngs=rngs)
        self.act = nn.ActQuant()
        self.fc2 = nn.QLinear(8, 3, rngs=rngs)
        nn.record_activation_shapes(self, (4,))

    def __call__(self, x):
        return self.fc2(self.act(self.fc1(x)))


@pytest.fixture(scope="module")
def tiny():
    model = Tiny(nnx.Rngs(0))
    nn.quantize_model(
        model,
        [
            nn.Rule("fc1", Q(bits=4), kind="weight"),  # U3
            nn.Rule("act", Q(family="pow2", bits=4), kind="activation"),  # P3
            nn.Rule("fc2", Q(parametrization="b_d", bits=4), kind="weight"),  # U1
        ],
    )
    return Accounting.from_model(model), nnx.to_pure_dict(nnx.state(model, nnx.Param)), model


def with_values(params, values: dict[str, float | np.ndarray]):
    params = jax.tree.map(lambda v: v, params)
    for path, value in values.items():
        head, name = path.rsplit(".", 1)
        node(params, head)[name] = jnp.asarray(value, jnp.float32)
    return params


TINY_W_KB = (4 * 8 + 8 + 8 * 3 + 3) * 4 / KB  # fc1 U3, fc2 U1: kernels and biases at 4 bits
TINY_A_KB = 8 * 4 / KB  # the P3 activation after fc1 at 4 bits


def test_penalty_is_zero_while_met_and_follows_a_schedule(tiny):
    acc, params, _ = tiny
    grads = jax.tree.map(jnp.ones_like, params)
    tx = budget_penalty(acc, [Budget("weight_kb", 1.0), Budget("act_max_kb", 1.0)])
    updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
    np.testing.assert_allclose(state.violations, [TINY_W_KB - 1.0, TINY_A_KB - 1.0], rtol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, updates, grads)  # exactly unchanged

    tx = budget_penalty(acc, [Budget("weight_kb", 0.01, lambda count: 0.1 * (count + 1))])
    state = tx.init(params)
    update = jax.jit(tx.update)
    first, state = update(zeros_like(params), state, params)
    assert int(state.count) == 1 and float(state.multipliers[0]) == pytest.approx(0.1)
    second, state = update(zeros_like(params), state, params)
    assert int(state.count) == 2 and float(state.multipliers[0]) == pytest.approx(0.2)
    q1, q2 = node(first, "fc1.kernel_quant.qmax"), node(second, "fc1.kernel_quant.qmax")
    assert float(q1) > 0
    np.testing.assert_allclose(q2, 2 * q1, rtol=1e-6)


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


def test_clip_u3_to_raw_d_and_p3_to_raw_qmin_only(tiny):
    acc, params, _ = tiny
    params = with_values(
        params, {"fc1.kernel_quant.d": 0.05, "act.quant.qmin": 0.002, "fc2.kernel_quant.d": 0.01}
    )
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    grads = jax.tree.unflatten(
        treedef, [10.0 * jax.random.normal(k, v.shape) for v, k in zip(leaves, keys, strict=True)]
    )
    tx = clip_quantizer_gradients(acc)
    clipped, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    for path, bound in (
        ("fc1.kernel_quant.d", 0.05),
        ("fc1.kernel_quant.qmax", 0.05),
        ("fc1.bias_quant.d", float(node(params, "fc1.bias_quant.d"))),
        ("fc1.bias_quant.qmax", float(node(params, "fc1.bias_quant.d"))),
        ("act.quant.qmin", 0.002),
        ("act.quant.qmax", 0.002),
    ):
        g = float(node(grads, path))
        assert abs(g) > bound  # the clip bites (the test can fail)
        np.testing.assert_allclose(node(clipped, path), np.clip(g, -bound, bound), rtol=1e-6)
    # U1, weights and biases untouched
    for path in ("fc2.kernel_quant.b", "fc2.kernel_quant.d", "fc1.kernel", "fc2.bias"):
        np.testing.assert_array_equal(node(clipped, path), node(grads, path))
    with pytest.raises(ValueError, match="params"):
        tx.update(grads, tx.init(params))


def reference_projection(d, qmax, box_d, box_qmax, m=1e-5):
    """The authors' clip_quant_vals for (d, qmax), in numpy."""
    d, qmax = np.asarray(d, np.float32), np.asarray(qmax, np.float32)
    d2, qmax2 = np.minimum(d, qmax - m), np.maximum(d + m, qmax)
    return (
        np.clip(d2, box_d[0] + m, box_d[1] - m).astype(np.float32),
        np.clip(qmax2, box_qmax[0] + m, box_qmax[1] - m).astype(np.float32),
    )


CROSSED = {
    "fc1.kernel_quant.d": 0.5,  # U3 with d > qmax: the pair swaps, 1e-5 apart
    "fc1.kernel_quant.qmax": 0.2,
    "fc1.bias_quant.qmax": 300.0,  # above the weight qmax box (127)
    "act.quant.qmin": 1e-9,  # P3 below its box (2^-14)
    "act.quant.qmax": 1000.0,  # above its box (255)
    "fc2.kernel_quant.b": 20.0,  # U1 b above b_range (2, 8)
    "fc2.kernel_quant.d": -1.0,  # below d_range
}


def test_project_restores_order_and_boxes(tiny):
    acc, params, model = tiny
    params = with_values(params, CROSSED)
    out = jax.jit(lambda p: project(p, acc))(params)
    m = 1e-5
    d, qmax = reference_projection(0.5, 0.2, (2**-8, 1.0), (2**-8, 127.0))
    assert d == pytest.approx(0.2 - m) and qmax == pytest.approx(0.5 + m)
    np.testing.assert_allclose(node(out, "fc1.kernel_quant.d"), d, rtol=1e-7)
    np.testing.assert_allclose(node(out, "fc1.kernel_quant.qmax"), qmax, rtol=1e-7)
    np.testing.assert_allclose(node(out, "fc1.bias_quant.qmax"), 127.0 - m, rtol=1e-7)
    np.testing.assert_allclose(node(out, "act.quant.qmin"), 2.0**-14 + m, rtol=1e-6)
    np.testing.assert_allclose(node(out, "act.quant.qmax"), 255.0 - m, rtol=1e-7)
    np.testing.assert_allclose(node(out, "fc2.kernel_quant.b"), 8.0 - m, rtol=1e-7)
    np.testing.assert_allclose(node(out, "fc2.kernel_quant.d"), 2.0**-8 + m, rtol=1e-6)
    for path in ("fc1.kernel", "fc1.bias", "fc2.kernel"):
        np.testing.assert_array_equal(node(out, path), node(params, path))
    # idempotent
    jax.tree.map(np.testing.assert_array_equal, project(out, acc), out)
    # same on an nnx.State of the same values
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    projected_state = nnx.to_pure_dict(project(state, acc))
    jax.tree.map(np.testing.assert_array_equal, projected_state, out)


def test_project_per_channel(tiny):
    acc, params, _ = tiny
    d = np.array([0.5, 0.01, 2.0, 0.1, 1e-4, 0.3, 0.3, 0.05], np.float32)
    qmax = np.array([0.2, 0.5, 3.0, 200.0, 0.02, 0.3, 0.1, 0.05], np.float32)
    params = with_values(params, {"fc1.kernel_quant.d": d, "fc1.kernel_quant.qmax": qmax})
    out = project(params, acc)
    ref_d, ref_qmax = reference_projection(d, qmax, (2**-8, 1.0), (2**-8, 127.0))
    np.testing.assert_allclose(node(out, "fc1.kernel_quant.d"), ref_d, rtol=1e-7)
    np.testing.assert_allclose(node(out, "fc1.kernel_quant.qmax"), ref_qmax, rtol=1e-7)
    assert np.all(ref_d < ref_qmax)
    # scalar qmax with a per-channel d: d' = min(d, qmax − m) per channel, qmax' ≥ max d + m
    params = with_values(params, {"fc1.kernel_quant.qmax": 0.4})
    out = project(params, acc)
    np.testing.assert_allclose(node(out, "fc1.kernel_quant.qmax"), 2.0 + 1e-5, rtol=1e-7)
    np.testing.assert_allclose(
        node(out, "fc1.kernel_quant.d"),
        np.minimum(d, 0.4 - 1e-5).clip(2**-8 + 1e-5, 1 - 1e-5),
        rtol=1e-7,
    )
    assert node(out, "fc1.kernel_quant.qmax").shape == ()


def test_project_quantizer_params_in_a_chain_equals_project(tiny):
    acc, params, _ = tiny
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    grads = jax.tree.unflatten(
        treedef, [jax.random.normal(k, v.shape) for v, k in zip(leaves, keys, strict=True)]
    )
    sgd = optax.sgd(0.5, momentum=0.9)
    tx = optax.chain(sgd, project_quantizer_params(acc))
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    plain, _ = sgd.update(grads, sgd.init(params), params)
    expected = project(optax.apply_updates(params, plain), acc)
    eps = np.finfo(np.float32).eps

    def close(a, b, p):
        atol = 4 * eps * max(np.max(np.abs(p)), np.max(np.abs(b)))
        np.testing.assert_allclose(a, b, rtol=0, atol=atol)

    jax.tree.map(close, new, expected, params)
    # some θ left their boxes or crossed before the projection (the test can fail)
    before = optax.apply_updates(params, plain)
    assert float(node(before, "fc2.kernel_quant.d")) != float(node(expected, "fc2.kernel_quant.d"))
    # non-θ leaves pass through exactly
    np.testing.assert_array_equal(node(updates, "fc1.kernel"), node(plain, "fc1.kernel"))


# ----------------------------------------------------------------------------------------
# sgd_nnabla and the whole chain


def test_sgd_nnabla_keeps_the_learning_rate_inside_the_velocity():
    lr = optax.piecewise_constant_schedule(0.1, {1: 0.1})  # 0.1, then 0.01
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


# ----------------------------------------------------------------------------------------
# Ours, beyond the paper (docs/method.md §13): every activation tensor, margins, the freeze, the
# log-space update, and budget_chain's switches.


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


def test_sgd_log_space_steps_log_theta():
    """v ← m·v + lr·θ·g, θ ← θ·exp(−v), written out for two steps."""
    params = {"d": jnp.array(0.25), "qmax": jnp.array([1.5, 3.0])}
    grads = {"d": jnp.array(2.0), "qmax": jnp.array([-1.0, 0.5])}
    tx = sgd_log_space(lambda count: 0.1 / (count + 1), momentum=0.5)
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


def test_budget_chain_defaults_are_the_authors_update(resnet):
    """budget_chain() with its defaults equals the chain written out by hand (module
    docstring), update for update; the θ switches then change θ's updates only."""
    acc, params = resnet
    budgets = [Budget("weight_kb", 100.0), Budget("act_max_kb", 7.0)]
    lr = optax.piecewise_constant_schedule(0.03, {2: 0.1})
    by_hand = optax.chain(
        budget_penalty(acc, budgets),
        optax.add_decayed_weights(2e-4),
        clip_quantizer_gradients(acc),
        sgd_nnabla(lr, momentum=0.9),
        project_quantizer_params(acc),
    )
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    grads = jax.tree.unflatten(
        treedef, [0.01 * jax.random.normal(k, v.shape) for v, k in zip(leaves, keys, strict=True)]
    )

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
