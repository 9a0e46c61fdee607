"""The trainer end to end on CPU: resume exactness, bad input, budgets, non-finite loss."""

from __future__ import annotations

import json
import logging

import jax
import numpy as np
import pytest
from flax import nnx

from mpdnn import optim
from mpdnn.training import config as cfg
from mpdnn.training.checkpoint import Checkpointer
from mpdnn.training.trainer import TrainingError, build_model, load_data, train_and_evaluate


def tiny_config(**train):
    """A small CNN on synthetic 8×8 data: a few steps compile and run in seconds."""
    c = cfg.base_config()
    c.name = "tiny"
    c.model.name = "small_cnn"
    c.model.widths = (8, 8)
    c.data.name = "synthetic"
    c.data.synthetic_shape = (8, 8, 1)
    c.data.synthetic_train = 64
    c.data.synthetic_test = 32
    c.data.pad = 1
    c.train.batch_size = 16  # 4 steps per epoch
    c.train.eval_batch_size = 32
    c.train.epochs = 2
    c.train.steps_per_call = 2
    c.train.progress = False
    c.optim.learning_rate = 0.05
    c.optim.decay_epochs = (1,)
    c.quant.weights.mode = "learned"
    c.quant.weights.bits = 4
    c.quant.activations.mode = "learned"
    c.quant.activations.bits = 4
    c.budget.weight_kb = 0.5
    for key, value in train.items():
        setattr(c.train, key, value)
    return c


def restore_state(workdir, config):
    """The latest checkpointed train state of a run, restored by structure."""
    dataset = load_data(config)
    model = build_model(config, dataset, workdir)
    _, params, rest = nnx.split(model, nnx.Param, ...)
    with Checkpointer(workdir / "final", async_save=False) as ckpt:
        step, state, _ = ckpt.restore({"params": params, "rest": rest})
    return step, state


def test_kill_and_resume_gives_the_uninterrupted_parameters(tmp_path):
    config = tiny_config()
    whole = train_and_evaluate(config, tmp_path / "whole")
    assert whole.status == "completed" and whole.step == 8

    stopped = train_and_evaluate(config, tmp_path / "split", should_stop=lambda step: step >= 3)
    # Stops at the first call boundary at or after step 3 (2 steps per call).
    assert stopped.status == "stopped" and stopped.step == 4
    assert not (tmp_path / "split" / "final").exists()
    # What a kill -9 after the step-4 checkpoint leaves: records of steps the resumed run
    # trains again, and a line cut short.
    with open(tmp_path / "split" / "metrics.jsonl", "a") as f:
        f.write('{"type": "train", "step": 6, "time": 0, "loss": 1.0}\n')
        f.write('{"type": "eval", "step": 6, "time": 0, "test_error": 0.5}\n{"type": "tr')
    resumed = train_and_evaluate(config, tmp_path / "split")
    assert resumed.status == "completed" and resumed.step == 8

    _, a = restore_state(tmp_path / "whole", config)
    _, b = restore_state(tmp_path / "split", config)
    leaves_a = jax.tree.leaves(a)
    leaves_b = jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b) > 10
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert resumed.final_test_error == whole.final_test_error

    lines = [json.loads(s) for s in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in lines if r["type"] == "train"]
    assert steps == [2, 4, 6, 8]  # nothing trained twice, nothing skipped
    whole_lines = (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()
    assert [(r["type"], r["step"]) for r in lines] == [
        (r["type"], r["step"]) for r in map(json.loads, whole_lines)
    ]  # every record once, as in the uninterrupted run


def test_outputs_and_verdicts(tmp_path):
    result = train_and_evaluate(tiny_config(), tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["provenance"]["git_commit"]
    assert summary["budgets"] == {"weight_kb": 0.5}
    verdict = summary["verdicts"]["weight_kb"]
    assert verdict["final_met"] == (verdict["final_kb"] <= 0.5)
    report = json.loads((tmp_path / "report.json").read_text())
    assert [r["kind"] for r in report["layers"]].count("weight") == len(
        [r for r in result.layers if r["kind"] == "weight"]
    )
    assert (tmp_path / "bitwidths.png").stat().st_size > 1000
    evals = [
        json.loads(s)
        for s in (tmp_path / "metrics.jsonl").read_text().splitlines()
        if '"eval"' in s
    ]
    assert len(evals) == 2  # one per epoch
    assert all("blocks.0.conv.kernel" in r["bits"] for r in evals)
    for r in evals:  # per-tensor KB = numel · bits / 8192 and they add up to the total
        kernel = r["kb"]["blocks.0.conv.kernel"]
        assert kernel == pytest.approx(3 * 3 * 1 * 8 * r["bits"]["blocks.0.conv.kernel"] / 8192)
        weights = [v for k, v in r["kb"].items() if k.endswith(("kernel", "bias"))]
        assert sum(weights) == pytest.approx(r["weight_kb"], rel=1e-5)
    # The feasibility flag agrees with the sizes and the budget it was judged against.
    for r in evals:
        assert r["feasible"] == (r["weight_kb"] <= 0.5)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("model.name", "resnet99", "model.name='resnet99' is unknown"),
        ("data.name", "mnist", "data.name='mnist' is unknown"),
        ("quant.weights.parametrization", "b_x", "parametrization='b_x' is unknown"),
        ("quant.weights.d_range", (1.0, 0.1), "d_range is inverted"),
        ("budget.weight_kb", 0.0, "must be a finite number > 0 KB"),
        ("budget.weight_kb", 0.01, "weight_kb ≤ 0.01 KB cannot be met"),
        ("data.dir", "/nonexistent/cifar.tar.gz", "/nonexistent/cifar.tar.gz"),
    ],
)
def test_bad_input_is_one_line(tmp_path, key, value, message):
    config = tiny_config()
    if key == "data.dir":
        config.data.name = "cifar10"
    section, name = key.rsplit(".", 1)
    node = config
    for part in section.split("."):
        node = getattr(node, part)
    setattr(node, name, value)
    with pytest.raises(ValueError) as err:
        train_and_evaluate(config, tmp_path)
    text = str(err.value)
    assert message in text
    assert "\n" not in text


def test_budget_below_minimum_prints_the_minimum(tmp_path):
    config = tiny_config()
    dataset = load_data(config)
    model = build_model(config, dataset, tmp_path)
    # Independent count: every learned weight site at b_min = 2 bits (docs/method.md §2 weight box).
    numel = sum(
        int(np.prod(x.shape))
        for path, x in nnx.iter_graph(model)
        if isinstance(x, nnx.Param)
        and path[-1] in ("kernel", "bias")
        and "bn" not in [str(p) for p in path]
    )
    expected_kb = numel * 2 / 8192
    assert optim.Accounting.from_model(model).min_sizes()["weight_kb"] == pytest.approx(expected_kb)
    config.budget.weight_kb = expected_kb * 0.9
    with pytest.raises(cfg.ConfigError, match=f"weight_kb = {expected_kb:.4f} KB"):
        train_and_evaluate(config, tmp_path)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    config = tiny_config(checkpoint_every_epochs=1)
    config.train.epochs = 3
    stopped = train_and_evaluate(config, tmp_path, should_stop=lambda step: step >= 4)
    assert stopped.step == 4
    # Resume with a learning rate that overflows the parameters at once (a change the
    # workdir's config allows only when asked to).
    config.optim.learning_rate = float("inf")
    config.train.resume_changes = "optim.learning_rate"
    with pytest.raises(TrainingError) as err:
        train_and_evaluate(config, tmp_path)
    text = str(err.value)
    assert "\n" not in text
    assert "not finite at step 6" in text  # step 5 runs at the good parameters
    assert "checkpoint (step 4)" in text
    with Checkpointer(tmp_path / "checkpoints", async_save=False) as ckpt:
        assert ckpt.latest_step() == 4


def test_corrupt_latest_checkpoint_falls_back(tmp_path, caplog):
    config = tiny_config(checkpoint_every_epochs=1)
    config.train.epochs = 3
    stopped = train_and_evaluate(config, tmp_path, should_stop=lambda step: step >= 8)
    assert stopped.step == 8
    with Checkpointer(tmp_path / "checkpoints", async_save=False) as ckpt:
        assert ckpt.all_steps() == [4, 8]
    # Destroy the array data of the latest checkpoint.
    latest = tmp_path / "checkpoints" / "8"
    for f in latest.rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
            f.write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="absl"):
        result = train_and_evaluate(config, tmp_path)
    assert result.status == "completed" and result.step == 12
    warnings = " ".join(r.getMessage() for r in caplog.records)
    assert "step 8" in warnings and "falling back to step 4" in warnings


def test_a_workdir_in_use_is_refused(tmp_path):
    import fcntl

    tmp_path.mkdir(exist_ok=True)
    with open(tmp_path / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running trainer holds it
        with pytest.raises(TrainingError, match="another run is using"):
            train_and_evaluate(tiny_config(), tmp_path)
    # Released (as when that run ends or is killed): the workdir is usable again.
    result = train_and_evaluate(tiny_config(max_steps=1, steps_per_call=1), tmp_path)
    assert result.step == 1


def test_pow2_runs_learn_a_logit_scale(tmp_path):
    from mpdnn.nn import LogitScale

    config = tiny_config(max_steps=2, steps_per_call=1)
    config.quant.weights.family = "pow2"
    config.quant.activations.family = "pow2"
    config.budget.weight_kb = None
    dataset = load_data(config)
    model = build_model(config, dataset, tmp_path)
    assert isinstance(model, LogitScale) and float(model.scale[...]) == 1.0
    x = dataset.test_images[:4].astype(np.float32) * dataset.pixel_scale + dataset.pixel_offset
    model.eval()
    model.scale[...] = 2.5
    np.testing.assert_allclose(model(x), 2.5 * model.model(x), rtol=1e-6)
    # The trainer trains it with everything else; uniform runs have none.
    train_and_evaluate(config, tmp_path / "run")
    _, state = restore_state(tmp_path / "run", config)
    assert float(state["params"]["scale"][...]) != 1.0
    config.quant.weights.family = config.quant.activations.family = "uniform"
    assert not isinstance(build_model(config, dataset, tmp_path), LogitScale)


def test_scanned_and_looped_calls_train_alike(tmp_path):
    """The accelerators' path (lax.scan over steps and test batches) against the CPU one."""
    results = {}
    for scan in (True, False):
        config = tiny_config(max_steps=4, steps_per_call=2, scan=scan)
        config.data.synthetic_test = 40
        config.train.eval_batch_size = 16  # 3 test batches, the last one padded
        results[scan] = train_and_evaluate(config, tmp_path / str(scan))
    a, b = results[True], results[False]
    assert a.final_test_error == b.final_test_error
    np.testing.assert_allclose(a.final_sizes["weight_kb"], b.final_sizes["weight_kb"], rtol=1e-6)
    _, sa = restore_state(tmp_path / "True", tiny_config())
    _, sb = restore_state(tmp_path / "False", tiny_config())
    for x, y in zip(jax.tree.leaves(sa), jax.tree.leaves(sb), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)


def test_a_run_whose_best_model_was_deleted_still_finishes(tmp_path, caplog):
    """best/ removed mid-run: the run completes (it crashed at delivery, and on every
    rerun), says the selected model is lost, and delivers the final model if it fits."""
    import shutil

    config = tiny_config(checkpoint_every_epochs=1)
    config.budget.weight_kb = 10.0  # every evaluation within it: best/ is written
    config.budget.recipe = "paper"  # delivers the best feasible evaluation (no freeze)
    stopped = train_and_evaluate(config, tmp_path, should_stop=lambda step: step >= 4)
    assert stopped.status == "stopped" and (tmp_path / "best").is_dir()
    shutil.rmtree(tmp_path / "best")
    with caplog.at_level(logging.WARNING, logger="absl"):
        result = train_and_evaluate(config, tmp_path)
    assert result.status == "completed" and result.delivered == "final" and result.feasible
    assert "the selected model (step 4) is lost" in " ".join(r.getMessage() for r in caplog.records)
    again = train_and_evaluate(config, tmp_path)  # a rerun of the finished run, too
    assert again.status == "completed" and again.delivered == "final"


def test_a_corrupt_newest_best_model_falls_back_to_the_one_before(tmp_path, caplog):
    from mpdnn.training.rundir import RunDir
    from mpdnn.training.trainer import _restore_best

    like = {"params": {"w": np.zeros(3, np.float32)}, "rest": {"b": np.zeros(2, np.float32)}}
    with Checkpointer(tmp_path / "best", max_to_keep=2, async_save=False) as best:
        for step in (4, 8):
            model = jax.tree.map(lambda x, s=step: x + s, like)
            best.save(step, model, metadata={"step": step, "test_error": 0.5 - step / 100})
    for f in (tmp_path / "best" / "8").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
            f.write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="absl"):
        record, model = _restore_best(RunDir(tmp_path), like, {"step": 8, "test_error": 0.42})
    assert record["step"] == 4 and record["test_error"] == pytest.approx(0.46)
    np.testing.assert_array_equal(model["params"]["w"], np.full(3, 4.0))
    assert "delivering the one selected before it, of step 4" in caplog.text


def test_a_workdir_refuses_another_config_unless_the_change_is_allowed(tmp_path, caplog):
    """A changed lr on resume was accepted silently, and a changed shape reported as an
    unreadable checkpoint; config.json was overwritten even when the rerun then failed."""
    config = tiny_config()
    stopped = train_and_evaluate(config, tmp_path, should_stop=lambda step: step >= 2)
    assert stopped.status == "stopped"
    saved = (tmp_path / "config.json").read_text()
    other = tiny_config()
    other.optim.learning_rate = 0.5
    other.model.widths = (8, 16)
    with pytest.raises(cfg.ConfigError) as err:
        train_and_evaluate(other, tmp_path)
    text = str(err.value)
    assert "\n" not in text and "another config" in text
    assert "optim.learning_rate: 0.05 -> 0.5" in text and "model.widths: [8, 8] -> [8, 16]" in text
    assert "--config.train.resume_changes=model.widths,optim.learning_rate" in text
    assert (tmp_path / "config.json").read_text() == saved  # untouched
    # Free keys, and keys the user allows, resume.
    longer = tiny_config(progress=False, resume_changes="train.epochs")
    longer.train.epochs = 3
    with caplog.at_level(logging.WARNING, logger="absl"):
        result = train_and_evaluate(longer, tmp_path)
    assert result.status == "completed" and result.step == 12
    assert "resuming" in caplog.text and "train.epochs" in caplog.text
    assert json.loads((tmp_path / "config.json").read_text())["train"]["epochs"] == 3


@pytest.mark.parametrize("recipe", ["paper", "mpdnn"])
def test_the_flat_update_trains_the_same_parameters(tmp_path, monkeypatch, recipe):
    """optim.flat_update reaches the run's optimizer and, through the whole jitted step,
    ends on the leafwise update's parameters bit for bit (CPU), resuming included (the
    optimizer state it checkpoints is its own)."""
    from mpdnn.optim import chain

    built = []
    real = chain.flat_update
    monkeypatch.setattr(chain, "flat_update", lambda *a, **k: built.append(1) or real(*a, **k))
    states = {}
    for flat in (False, True):
        config = tiny_config(max_steps=6)
        config.budget.recipe = recipe
        config.budget.act_max_kb = 0.2
        config.optim.flat_update = flat
        workdir = tmp_path / f"{recipe}_{flat}"
        if flat:  # stopped after 2 steps, then resumed
            stopped = train_and_evaluate(config, workdir, should_stop=lambda step: step >= 2)
            assert stopped.status == "stopped" and stopped.step == 2
        assert train_and_evaluate(config, workdir).step == 6
        _, states[flat] = restore_state(workdir, config)
        assert bool(built) == flat  # built by the flat run (and its resume) only
    for x, y in zip(jax.tree.leaves(states[False]), jax.tree.leaves(states[True]), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_the_flat_update_cannot_change_on_resume_even_when_allowed():
    """Its optimizer state is laid out by it: allowing the change would only move the
    failure to an unreadable checkpoint. A config saved before the key existed had it off."""
    saved = json.loads(tiny_config().to_json())
    flat = tiny_config(resume_changes="optim.flat_update")
    flat.optim.flat_update = True
    with pytest.raises(cfg.ConfigError, match=r"optim.flat_update cannot change .*False -> True"):
        cfg.check_resume(saved, flat)
    del saved["optim"]["flat_update"]  # a run from before the key
    with pytest.raises(cfg.ConfigError, match="optim.flat_update cannot change"):
        cfg.check_resume(saved, flat)
    assert cfg.check_resume(saved, tiny_config()) == []
