"""The authors' stabilisers (docs/method.md §6): the ±d / ±qmin gradient clip and the projection
of θ into their boxes, on a tiny model with every kind of quantizer.

Expected clips and projections come from the authors' rules written out with numpy.
"""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from mpdnn.optim import clip_quantizer_gradients, project, project_quantizer_params
from tests.optim.cases import CROSSED, node, random_like, with_values


def test_clip_u3_to_raw_d_and_p3_to_raw_qmin_only(tiny):
    acc, params, _ = tiny
    params = with_values(
        params, {"fc1.kernel_quant.d": 0.05, "act.quant.qmin": 0.002, "fc2.kernel_quant.d": 0.01}
    )
    grads = random_like(params, seed=0, scale=10.0)
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


def test_stabilisers_keep_the_empty_state_checkpoints_hold(tiny):
    """Their state is ``optax.EmptyState()`` at init and after an update, so optimizer states
    saved with them restore into the same tree."""
    acc, params, _ = tiny
    for tx in (clip_quantizer_gradients(acc), project_quantizer_params(acc)):
        state = tx.init(params)
        assert state == optax.EmptyState() and type(state) is optax.EmptyState
        _, after = jax.jit(tx.update)(random_like(params, seed=2), state, params)
        assert jax.tree.structure(after) == jax.tree.structure(optax.EmptyState())


def reference_projection(d, qmax, box_d, box_qmax, m=1e-5):
    """The authors' clip_quant_vals for (d, qmax), in numpy."""
    d, qmax = np.asarray(d, np.float32), np.asarray(qmax, np.float32)
    d2, qmax2 = np.minimum(d, qmax - m), np.maximum(d + m, qmax)
    return (
        np.clip(d2, box_d[0] + m, box_d[1] - m).astype(np.float32),
        np.clip(qmax2, box_qmax[0] + m, box_qmax[1] - m).astype(np.float32),
    )


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
    grads = random_like(params, seed=1)
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
    with pytest.raises(ValueError, match="params"):
        tx.update(grads, tx.init(params))
