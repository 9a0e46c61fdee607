"""budget_chain(flat=True): the elementwise stages on one vector per group give the leafwise
chain's numbers bit for bit (CPU), in fewer kernels."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mpdnn import models, nn
from mpdnn.optim import Accounting, Budget, budget_chain
from mpdnn.optim.accounting import leaves_by_path
from mpdnn.optim.flat import clip_flat, flat_update
from tests.optim.cases import CROSSED, float_count, random_like, with_values

LR = float_count(optax.piecewise_constant_schedule(0.03, {2: 0.1}))

OPTIONS = {
    "paper": {},
    "no_clip": {"clip": False},
    "mpdnn": {
        "quant_learning_rate_scale": 0.3,
        "quant_momentum": 0.0,
        "quant_update": "log",
        "freeze_step": 2,
    },
    "linear_own": {"quant_learning_rate_scale": 2.0, "quant_momentum": 0.5},
    "lagrangian": {"method": "lagrangian", "initial_multiplier": 0.5},
    "no_decay": {"weight_decay": 0.0},
}


def _run(tx, params, steps=4):
    """Params after each of ``steps`` updates, a different gradient each step (so momentum,
    the learning-rate drop at update 2 and the freeze all matter)."""
    state, p, out = tx.init(params), params, []
    update = jax.jit(tx.update)
    for step in range(steps):
        u, state = update(random_like(params, seed=step, scale=0.05), state, p)
        p = optax.apply_updates(p, u)
        out.append(p)
    return out


def _assert_same(a_run, b_run):
    for a, b in zip(a_run, b_run, strict=True):
        jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize("name", OPTIONS)
def test_flat_update_is_the_leafwise_update_bit_for_bit(resnet, name):
    acc, params = resnet
    budgets = [Budget("weight_kb", 100.0), Budget("act_max_kb", 7.0)]
    options = OPTIONS[name]
    leafwise = _run(budget_chain(acc, budgets, LR, **options), params)
    flat = _run(budget_chain(acc, budgets, LR, flat=True, **options), params)
    _assert_same(flat, leafwise)


def test_flat_update_with_vector_sizes_is_the_default_update(resnet):
    """optim.flat_update's pair: the flat stages and the vectorized accounting, against the
    leafwise chain on the scalar accounting."""
    acc, params = resnet
    model = models.build("resnet20", rngs=nnx.Rngs(0))
    nn.quantize_model(
        model,
        [nn.Rule(".*", nn.QuantConfig(bits=4), kind=k) for k in ("weight", "activation")],
    )
    vector = Accounting.from_model(model, vectorized=True)
    budgets = [Budget("weight_kb", 100.0), Budget("act_max_kb", 7.0)]
    for options in (OPTIONS["paper"], OPTIONS["mpdnn"]):
        leafwise = _run(budget_chain(acc, budgets, LR, **options), params)
        flat = _run(budget_chain(vector, budgets, LR, flat=True, **options), params)
        _assert_same(flat, leafwise)


@pytest.mark.parametrize("budgets", [[], [Budget("weight_kb", 1.0), Budget("act_max_kb", 1.0)]])
def test_flat_update_on_every_kind_of_quantizer(tiny, budgets):
    """U3 and P3 (clipped, by d and by qmin), U1 (not clipped), from crossed θ outside their
    boxes (the projection after the flat stages still sees leaves)."""
    acc, params, _ = tiny
    params = with_values(params, CROSSED)
    for options in ({}, OPTIONS["mpdnn"]):
        leafwise = _run(budget_chain(acc, budgets, LR, **options), params)
        flat = _run(budget_chain(acc, budgets, LR, flat=True, **options), params)
        _assert_same(flat, leafwise)


def _fusions(tx, params) -> int:
    def step(grads, state, p):
        u, state = tx.update(grads, state, p)
        return optax.apply_updates(p, u), state

    text = jax.jit(step).lower(params, tx.init(params), params).compile().as_text()
    entry = text[text.index("\nENTRY") :]
    return len(re.findall(r"= [^=]*\bfusion\(", entry))


def test_flat_update_compiles_to_fewer_kernels(resnet):
    """The point of the flag: ResNet-20's 139 leaves no longer cost a kernel per stage
    each (about two per leaf leafwise, one with the flat stages: only the split back and the
    apply remain), and a budget's terms do not undo it (scripts/count_kernels.py --parts
    gives the whole counts)."""
    acc, params = resnet
    n_leaves = len(jax.tree.leaves(params))
    leafwise = _fusions(budget_chain(acc, [], 0.03), params)
    flat = _fusions(budget_chain(acc, [], 0.03, flat=True), params)
    assert leafwise >= 2 * n_leaves and flat < 1.1 * n_leaves, (leafwise, flat, n_leaves)
    budgets = [Budget("weight_kb", 100.0), Budget("act_max_kb", 7.0)]
    leafwise = _fusions(budget_chain(acc, budgets, 0.03), params)
    flat = _fusions(budget_chain(acc, budgets, 0.03, flat=True), params)
    assert flat < leafwise - 0.25 * n_leaves, (flat, leafwise)


def test_flat_update_state_and_errors(tiny):
    acc, params, _ = tiny
    tx = budget_chain(acc, [], 0.1, flat=True)
    state, projection = tx.init(params)  # the flat block, then the (leafwise) projection
    assert projection == optax.EmptyState() and sorted(state) == ["quant", "rest"]
    learned = set(acc.learned_paths())
    n_quant = sum(v.size for p, v in leaves_by_path(params).items() if p in learned)
    assert state["quant"][1][1].trace.shape == (n_quant,)  # one momentum vector for all θ
    with pytest.raises(ValueError, match="no transform for the groups"):
        flat_update({"rest": optax.sgd(0.1)}, lambda path: path.split(".")[0]).init(params)
    mixed = {"a": jnp.zeros(2, jnp.float32), "b": jnp.zeros(2, jnp.bfloat16)}
    with pytest.raises(ValueError, match="one dtype per group"):
        flat_update({"x": optax.sgd(0.1)}, lambda path: "x").init(mixed)
    with pytest.raises(ValueError, match="clip_bound"):
        flat_update({"x": clip_flat()}, lambda path: "x").update(
            {"a": jnp.ones(2)}, {"x": optax.EmptyState()}, {"a": jnp.ones(2)}
        )
