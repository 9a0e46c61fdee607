"""mpdnn's training recipe in the trainer (docs/method.md §13): BatchNorm recalibration, the freeze,
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

from mpdnn import data as mdata
from mpdnn import optim
from mpdnn.optim.accounting import leaves_by_path
from mpdnn.training import config as cfg
from mpdnn.training.checkpoint import Checkpointer
from mpdnn.training.evaluation import Diagnostics
from mpdnn.training.setup import build_model, load_data, make_optimizer
from mpdnn.training.steps import Recalibrator, recalibration_graphdef
from mpdnn.training.trainer import train_and_evaluate
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


# ----------------------------------------------------------------------------- the recipe


def test_the_paper_recipe_is_the_authors_and_options_set_in_the_config_win():
    c = tiny_config()
    c.budget.recipe = "paper"
    r = cfg.recipe(c)
    assert (r.clip_quantizer_gradients, r.freeze_epoch, r.max_gradient, r.margin) == (
        True,
        None,
        "first",
        0.0,
    )
    assert (r.quant_lr_scale, r.quant_momentum, r.quant_update, r.bn_recalibration) == (
        1.0,
        c.optim.momentum,
        "linear",
        0,
    )
    assert cfg.strength(c, "weight_kb", 0.5) == 0.1
    c.budget.max_gradient = "all"
    c.train.bn_recalibration = 3
    r = cfg.recipe(c)
    assert r.max_gradient == "all" and r.bn_recalibration == 3 and r.margin == 0.0


def test_the_mpdnn_recipe_freezes_at_the_first_decay_within_the_run():
    c = tiny_config(epochs=6)
    c.optim.decay_epochs = (9, 4, 5)  # 9 is after the run
    assert cfg.recipe(c).name == "mpdnn" and cfg.recipe(c).freeze_epoch == 4.0
    c.optim.decay_epochs = ()
    assert cfg.recipe(c).freeze_epoch == 3.0  # half the run
    c.budget.freeze_epoch = -1.0
    assert cfg.recipe(c).freeze_epoch is None
    c.budget.freeze_epoch = None
    c.budget.weight_kb = None  # no budget: nothing to search for, no freeze
    assert cfg.recipe(c).freeze_epoch is None
    # λ: the same pull on a relative violation at any size (RELATIVE_STRENGTH / L²)
    assert cfg.strength(c, "weight_kb", 8.0) == pytest.approx(cfg.RELATIVE_STRENGTH / 64)
    c.budget.strength = 0.3
    assert cfg.strength(c, "weight_kb", 8.0) == 0.3


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("budget.recipe", "fast", "budget.recipe='fast' is unknown"),
        ("budget.max_gradient", "some", "budget.max_gradient='some' is unknown"),
        ("budget.margin", 1.0, "budget.margin=1.0 must be in [0, 1)"),
        ("budget.freeze_epoch", 9.0, "budget.freeze_epoch=9 is after the last epoch (2)"),
        ("optim.quant_update", "adam", "optim.quant_update='adam' must be 'linear' or 'log'"),
        ("optim.quant_lr_scale", 0.0, "optim.quant_lr_scale=0.0 must be > 0"),
        ("optim.quant_momentum", 1.0, "optim.quant_momentum=1.0 must be in [0, 1)"),
        ("train.bn_recalibration", -1, "train.bn_recalibration=-1 must be >= 0"),
        ("train.eval_feasible_every", -2, "train.eval_feasible_every=-2 must be an integer"),
        ("data.validation_size", -5, "data.validation_size=-5 must be an integer >= 0"),
        ("data.validation_size", 64, "cannot hold out 64 validation images"),
    ],
)
def test_bad_recipe_options_are_one_line(tmp_path, key, value, message):
    config = tiny_config()
    section, name = key.split(".")
    setattr(config[section], name, value)
    with pytest.raises(ValueError) as err:
        train_and_evaluate(config, tmp_path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_layer_rules_quantize_the_named_layers_first():
    c = tiny_config()
    c.quant.weights.mode, c.quant.weights.bits = "fixed", 2
    c.quant.layer_rules = {
        "ends": {"pattern": "blocks.0.conv|head", "kind": "weight", "bits": 8},
    }
    rules = cfg.rules(c)
    assert [r.pattern for r in rules] == ["blocks.0.conv|head", ".*", ".*"]
    assert rules[0].config.bits == 8 and rules[0].config.mode == "fixed"
    model = build_model(c, load_data(c), None)
    acc = optim.Accounting.from_model(model)
    bits = {q.site: q.constants.get("b") for q in acc.quantizers if q.kind == "weight"}
    assert bits == {"blocks.0.conv": 8.0, "blocks.1.conv": 2.0, "head": 8.0}
    c.quant.layer_rules = {"x": {"kind": "weight"}}
    with pytest.raises(cfg.ConfigError, match="needs a 'pattern'"):
        cfg.rules(c)
    c.quant.layer_rules = {"x": {"pattern": "(", "kind": "weight"}}
    with pytest.raises(cfg.ConfigError, match="not a regex"):
        cfg.rules(c)


def test_validation_selection_and_the_authors_selection_are_reported_apart(tmp_path):
    config = tiny_config(epochs=3, eval_feasible_every=2)
    config.data.synthetic_train = 96
    config.data.validation_size = 32  # 64 left: 4 steps an epoch
    config.budget.recipe = "paper"
    config.budget.weight_kb = 2.0  # met from the start
    result = train_and_evaluate(config, tmp_path)
    assert result.selection == "validation"
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["type"] == "eval"]
    authors = [r for r in records if r["type"] == "authors_eval"]
    assert [r["step"] for r in evals] == [4, 8, 12]
    assert all("validation_error" in r for r in evals)
    # the authors' selection: the test set at epoch ends and at feasible steps between
    assert authors and all("test_error" in r and "validation_error" not in r for r in authors)
    tests = [r["test_error"] for r in evals + authors]
    assert result.authors_test_error == min(tests)
    # selected on the validation split; its test error measured once, at the end
    best = min(evals, key=lambda r: r["validation_error"])
    assert result.best_feasible_step == best["step"]
    assert result.best_feasible_validation_error == best["validation_error"]
    assert result.delivered == "best_feasible"
    assert result.delivered_test_error == result.best_feasible_test_error is not None
    assert result.final_validation_error == evals[-1]["validation_error"]
    assert result.final_test_error == evals[-1]["test_error"]  # BatchNorm as evaluated


def test_holdout_is_stratified_disjoint_and_fixed():
    full = mdata.load_digits()
    a = mdata.holdout(full, 300, train_size=500)
    b = mdata.holdout(full, 300)
    assert a.num_validation == 300 and a.num_train == 500 and b.num_train == full.num_train - 300
    # the same images held out whatever else is asked (one fixed seed, HOLDOUT_SEED)
    np.testing.assert_array_equal(a.validation_images, b.validation_images)
    _, counts = np.unique(full.train_labels, return_counts=True)
    _, held = np.unique(a.validation_labels, return_counts=True)
    _, kept = np.unique(a.train_labels, return_counts=True)
    # every class in proportion (largest remainder: within one image of the exact share)
    assert np.all(np.abs(held - 300 * counts / counts.sum()) < 1) and held.sum() == 300
    left = counts - held
    assert np.all(np.abs(kept - 500 * left / left.sum()) < 1) and kept.sum() == 500
    rows = {img.tobytes(): i for i, img in enumerate(full.train_images)}
    held_rows = {rows[img.tobytes()] for img in a.validation_images}
    kept_rows = {rows[img.tobytes()] for img in a.train_images}
    assert len(held_rows) == 300 and len(kept_rows) == 500 and not held_rows & kept_rows
    np.testing.assert_array_equal(a.test_images, full.test_images)
    with pytest.raises(mdata.DataError, match="cannot hold out"):
        mdata.holdout(full, full.num_train)


def test_without_a_budget_the_mpdnn_recipe_keeps_the_papers_theta_update():
    c = tiny_config()
    c.budget.weight_kb = None
    r = cfg.recipe(c)
    assert r.name == "mpdnn" and r.freeze_epoch is None
    assert (r.quant_update, r.quant_lr_scale, r.quant_momentum) == ("linear", 1.0, 0.9)
    assert r.bn_recalibration == cfg.RECIPES["mpdnn"]["bn_recalibration"]
    c.optim.quant_update = "log"  # asked for: granted
    assert cfg.recipe(c).quant_update == "log"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"method": "sgd"}, "budget.method='sgd' must be 'penalty' or 'lagrangian'"),
        ({"weight_kb": 70.0, "strength": -1.0}, "budget.strength=-1.0 must be >= 0"),
        (
            {"weight_kb": 70.0, "strengths": {"weight_kb": -2.0}},
            "budget.strengths.weight_kb=-2.0 must be >= 0",
        ),
        ({"act_sum_kb": -3.0}, "budget.act_sum_kb=-3.0 must be a finite number > 0 KB"),
        ({"weight_kb": float("inf")}, "budget.weight_kb=inf must be a finite number > 0 KB"),
        ({"weight_kb": float("nan")}, "budget.weight_kb=nan must be a finite number > 0 KB"),
    ],
)
def test_budget_options_are_judged_by_optim_under_the_config_keys(overrides, message):
    """The rules are optim.check_options'; the config check says them in its own keys."""
    config = tiny_config()
    for key, value in overrides.items():
        config.budget[key] = value
    with pytest.raises(cfg.ConfigError) as err:
        cfg.check(config)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
