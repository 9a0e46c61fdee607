"""mpdnn's training recipe in the trainer (SPEC §13): BatchNorm recalibration, the freeze,
the validation split and selection, the per-epoch diagnostics, the recipe's resolution."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mpdnn import optim
from mpdnn.optim.accounting import leaves_by_path
from mpdnn.training import config as cfg
from mpdnn.training.checkpoint import Checkpointer
from mpdnn.training.trainer import (
    Diagnostics,
    Recalibrator,
    build_model,
    load_data,
    make_optimizer,
    recalibration_graphdef,
    train_and_evaluate,
)
from tests.training.test_trainer import tiny_config


def _bn_input(model, x):
    """The first BatchNorm's input computed without the model: the stem conv of the float
    SmallCNN as a plain lax convolution (3×3, stride 1, padding 1, no bias)."""
    kernel = model.blocks[0].conv.kernel[...]
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


@pytest.mark.parametrize("batches", [1, 3])
def test_bn_recalibration_is_the_average_of_exact_batch_statistics(tmp_path, batches):
    config = tiny_config()
    config.quant.weights.mode = config.quant.activations.mode = "float"
    config.budget.weight_kb = None
    dataset = load_data(config)
    model = build_model(config, dataset, tmp_path)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    recal_graphdef = recalibration_graphdef(model)
    # the model itself keeps its momentum
    assert model.blocks[0].bn.momentum == pytest.approx(0.9)
    mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
    batch = NamedSharding(mesh, P("data"))
    scale, offset = dataset.pixel_scale, dataset.pixel_offset
    images = jnp.asarray(dataset.train_images)
    idx = np.arange(batches * 16).reshape(batches, 16).astype(np.int32)
    for scan in (False, True):
        recal = Recalibrator(graphdef, recal_graphdef, scale, offset, batch, scan)
        new_rest, error = recal.indexed(params, rest, jnp.asarray(idx), images)
        means, variances = [], []
        for i in range(batches):
            x = dataset.train_images[idx[i]].astype(np.float64) * scale + offset
            h = np.asarray(_bn_input(model, jnp.asarray(x, jnp.float32)), np.float64)
            means.append(h.mean(axis=(0, 1, 2)))
            variances.append(h.var(axis=(0, 1, 2)))  # biased, as BatchNorm normalises
        got = leaves_by_path(new_rest)
        np.testing.assert_allclose(got["blocks.0.bn.mean"], np.mean(means, 0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got["blocks.0.bn.var"], np.mean(variances, 0), rtol=1e-4)
        # every BatchNorm is re-estimated; nothing else in rest changes
        old = leaves_by_path(rest)
        assert set(got) == set(old)
        for path in old:
            if path.endswith((".mean", ".var")):
                assert not np.allclose(got[path], old[path])
            else:
                np.testing.assert_array_equal(got[path], old[path])
        # the statistics' error against the initial ones (mean 0, var 1), by hand
        mu, var = np.mean(means, 0), np.mean(variances, 0)
        assert float(error[0]) > 0 and float(error[1]) > 0
        first_shift = np.mean(np.abs(mu) / np.sqrt(var + 1e-5))
        assert float(error[0]) >= first_shift / len([p for p in old if p.endswith(".mean")])


def test_a_frozen_run_keeps_every_theta_from_the_freeze_and_delivers_its_final_model(tmp_path):
    config = tiny_config(epochs=4, checkpoint_every_epochs=1)
    config.budget.recipe = "mpdnn"
    config.budget.freeze_epoch = 2.0  # 4 steps an epoch: search until step 8
    config.budget.weight_kb = 0.5
    result = train_and_evaluate(config, tmp_path)
    assert result.recipe == "mpdnn"
    assert result.frozen_step is not None and result.frozen_step >= 8
    assert result.delivered == "final" and result.feasible
    assert result.final_sizes["weight_kb"] <= 0.5
    assert result.delivered_test_error == result.final_test_error
    # the two checkpoints kept (epochs 3 and 4) are after the freeze: θ equal exactly,
    # the weights moved
    dataset = load_data(config)
    model = build_model(config, dataset, tmp_path)
    accounting = optim.Accounting.from_model(model)
    tx = make_optimizer(config, accounting, cfg.budgets(config), 4)
    _, params, rest = nnx.split(model, nnx.Param, ...)
    target = {"step": jnp.int32(0), "params": params, "rest": rest, "opt_state": tx.init(params)}
    with Checkpointer(tmp_path / "checkpoints", async_save=False) as ckpt:
        assert ckpt.all_steps() == [12, 16]
        states = [ckpt.restore(target, step)[1] for step in (12, 16)]
    assert result.frozen_step < 12
    thetas = [leaves_by_path(s["params"]) for s in states]
    learned = accounting.learned_paths()
    assert learned
    for path in learned:
        np.testing.assert_array_equal(thetas[0][path], thetas[1][path])
    kernels = [p for p in thetas[0] if p.endswith(".kernel")]
    assert any(not np.array_equal(thetas[0][p], thetas[1][p]) for p in kernels)
    # the evaluations after the freeze say so, and count no bit changes
    evals = [
        json.loads(line)
        for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
        if '"eval"' in line
    ]
    after = [r for r in evals if r["step"] - r["steps"] > result.frozen_step]
    assert after and all(r["frozen_step"] == result.frozen_step for r in after)
    assert all(r["bit_changes"] == {} and r["within_budget"] == 1.0 for r in after)


def test_no_feasible_step_after_the_freeze_epoch_delivers_nothing(tmp_path):
    config = tiny_config(epochs=2)
    config.budget.recipe = "mpdnn"
    config.budget.freeze_epoch = 2.0  # the last step: no feasible step comes after it
    config.budget.weight_kb = 0.2  # far below the 4-bit start
    result = train_and_evaluate(config, tmp_path)
    assert result.frozen_step is None
    assert result.feasible is False and result.delivered is None
    assert result.delivered_test_error is None


def test_diagnostics_count_steps_within_budget_and_bit_changes():
    names = ["a.kernel", "b.kernel"]
    diag = Diagnostics(names, {"weight_kb": 1.0}, {"a.kernel": 4.0, "b.kernel": 2.0})
    diag.add(
        {
            "loss": np.zeros(3),
            "weight_kb": np.array([1.5, 1.0, 0.5]),
            "bits": np.array([[4, 2], [3, 2], [3, 3]], np.float32),
        }
    )
    diag.add(
        {
            "loss": np.zeros(1),
            "weight_kb": np.array([0.9]),
            "bits": np.array([[4, 3]], np.float32),
        }
    )
    out = diag.flush()
    assert out == {"steps": 4, "within_budget": 0.75, "bit_changes": {"a.kernel": 2, "b.kernel": 1}}
    assert diag.flush() == {"steps": 0, "within_budget": 0.0, "bit_changes": {}}
