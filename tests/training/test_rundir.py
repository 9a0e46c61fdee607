"""The run-directory format (mpdnn.training.rundir): one reader and writer of every file."""

import json

import ml_collections
import pytest

from mpdnn.training.rundir import RunBusyError, RunDir, RunDirError


def test_config_round_trip_and_missing(tmp_path):
    run = RunDir(tmp_path / "run")
    with pytest.raises(RunDirError, match="no run directory"):
        run.read_config()
    run.path.mkdir()
    with pytest.raises(RunDirError, match="no config.json"):
        run.read_config()
    run.write_config(ml_collections.ConfigDict({"name": "x", "train": {"epochs": 3}}))
    assert run.read_config().train.epochs == 3
    run.config_file.write_text("{not json")
    with pytest.raises(RunDirError, match="cannot read run config"):
        run.read_config()


def test_status_of_each_end(tmp_path):
    run = RunDir(tmp_path)
    assert run.status is None and not run.finished() and run.error is None
    run.write_failure(12, "loss is not finite at step 12", name="x")
    assert run.status == "failed" and run.error.startswith("loss is not finite")
    assert not run.finished()
    run.write_summary({"status": "stopped", "step": 40})
    assert run.status == "stopped" and not run.finished()
    run.write_summary({"status": "completed", "step": 80, "delivered": "final"})
    assert run.finished() and run.error is None
    # A summary of an older mpdnn (no status) was only ever written at the end.
    run.summary_file.write_text(json.dumps({"delivered": None}))
    assert run.status == "completed"
    with pytest.raises(ValueError, match="status"):
        run.write_summary({"step": 1})


def test_delivered_checkpoint(tmp_path):
    run = RunDir(tmp_path)
    run.write_config(ml_collections.ConfigDict({"name": "x"}))
    with pytest.raises(RunDirError, match="not a finished run .no summary.json"):
        run.delivered_checkpoint()
    run.write_summary({"status": "stopped"})
    with pytest.raises(RunDirError, match="status 'stopped'"):
        run.delivered_checkpoint()
    run.write_summary({"status": "completed", "delivered": None, "budgets": {"weight_kb": 1}})
    with pytest.raises(RunDirError, match="delivered no model"):
        run.delivered_checkpoint()
    run.write_summary({"status": "completed", "delivered": "best_feasible"})
    with pytest.raises(RunDirError, match="no best/"):
        run.delivered_checkpoint()
    run.best.mkdir()
    assert run.delivered_checkpoint() == tmp_path / "best"
    run.write_summary({"status": "completed", "delivered": "final"})
    run.final.mkdir()
    assert run.delivered_checkpoint() == tmp_path / "final"


def test_metrics_by_kind_skip_a_torn_last_line(tmp_path):
    run = RunDir(tmp_path)
    lines = [
        {"type": "train", "step": 1},
        {"type": "eval", "step": 1},
        {"type": "train", "step": 2},
    ]
    run.metrics_file.write_text("\n".join(json.dumps(r) for r in lines) + '\n{"type": "tr')
    assert [r["step"] for r in run.metrics("train")] == [1, 2]
    assert len(run.metrics()) == 3
    assert RunDir(tmp_path / "none").metrics() == []


def test_lock_is_exclusive(tmp_path):
    run = RunDir(tmp_path / "run")
    with run.lock():
        with pytest.raises(RunBusyError, match="another run is using"):
            with RunDir(tmp_path / "run").lock():
                pass
    with run.lock():  # released
        pass
