"""python -m mpdnn.export: a finished run's export equals its accounting; bad input is one line.

Expected sizes come from the training run's own summary and report and from
:func:`mpdnn.optim.memory`; never from the exporter.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import pytest
from flax import nnx

from mpdnn import export as ex
from mpdnn import optim
from tests.export.cases import NUM_WEIGHTS_RESNET20


def test_export_of_a_run_equals_its_accounting(run, delivered, tmp_path, capsys):
    out = tmp_path / "model.mpq"
    assert ex.main(["--workdir", str(run), "--out", str(out), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    summary = json.loads((run / "summary.json").read_text())
    report = json.loads((run / "report.json").read_text())
    weights = [r for r in report["layers"] if r["kind"] == "weight"]
    bits = sum(r["numel"] * int(r["bits"]) for r in weights)
    assert record["run"]["checkpoint"] == "best" and record["run"]["delivered"] == "best_feasible"
    assert record["payload_bits"] == bits == summary["delivered_sizes"]["weight_kb"] * 8192
    assert record["payload_bytes"] == math.ceil(summary["delivered_sizes"]["weight_kb"] * 1024)
    assert record["num_weights"] == NUM_WEIGHTS_RESNET20
    loaded = ex.load(out)
    assert out.stat().st_size == loaded.file_bytes == record["file_bytes"]
    assert (
        record["header_bytes"] + record["payload_bytes"] + record["float_bytes"]
        == loaded.file_bytes
    )
    assert [w.bits for w in loaded.weights.values()] == [int(r["bits"]) for r in weights]
    assert [a.bits for a in loaded.activations.values()] == [
        int(r["bits"]) for r in report["layers"] if r["kind"] == "activation"
    ]
    memory = optim.memory(delivered)
    assert record["payload_bytes"] == math.ceil(float(memory.weight_kb) * 1024)
    # Without a budget the final model is delivered: final/ is restored.
    final = tmp_path / "final_run"
    shutil.copytree(run, final)
    (final / "summary.json").write_text(json.dumps({**summary, "delivered": "final"}))
    assert ex.load_run(final)[1]["checkpoint"] == "final"


def fake_small_cnn_run(workdir):
    """A 'finished' small_cnn run (no training: the model's initial state as final/)."""
    from mpdnn.training.checkpoint import Checkpointer
    from mpdnn.training.trainer import build_model, load_data
    from tests.training.test_trainer import tiny_config

    config = tiny_config()
    config.budget.weight_kb = None
    workdir.mkdir()
    (workdir / "config.json").write_text(config.to_json())
    data = load_data(config)
    model = build_model(config, data, workdir)
    _, params, rest = nnx.split(model, nnx.Param, ...)
    with Checkpointer(workdir / "final", max_to_keep=1, async_save=False) as ckpt:
        ckpt.save(0, {"params": params, "rest": rest}, force=True)
    summary = {"status": "completed", "delivered": "final", "budgets": {}}
    summary |= {"input_shape": list(data.image_shape), "num_classes": data.num_classes}
    (workdir / "summary.json").write_text(json.dumps(summary))
    return workdir


def expect_usage_error(capsys, argv, words):
    with pytest.raises(SystemExit) as exit_info:
        ex.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error" in err[0], err
    for word in words:
        assert word in err[0]


def test_bad_input_is_one_line_with_status_2(run, tmp_path, capsys):
    expect_usage_error(capsys, ["--workdir", str(tmp_path / "nope")], ["no run directory"])
    (tmp_path / "empty").mkdir()
    expect_usage_error(capsys, ["--workdir", str(tmp_path / "empty")], ["no config.json"])
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(run / "config.json", unfinished)
    expect_usage_error(capsys, ["--workdir", str(unfinished)], ["not a finished run"])
    summary = json.loads((run / "summary.json").read_text())
    (unfinished / "summary.json").write_text(json.dumps({**summary, "delivered": None}))
    expect_usage_error(capsys, ["--workdir", str(unfinished)], ["delivered no model", "budget"])
    cnn = fake_small_cnn_run(tmp_path / "cnn")
    expect_usage_error(
        capsys, ["--workdir", str(cnn), "--verify", "4"], ["supports ResNetCifar", "SmallCNN"]
    )
    assert (cnn / "model.mpq").is_file()  # exporting it works; only the reference refuses


def test_module_entry_point_exit_status(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mpdnn.export", "--workdir", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no run directory" in lines[0] and "Traceback" not in proc.stderr


def test_a_run_of_an_older_version_gets_its_data_shape_from_its_report(run, delivered, tmp_path):
    """Summaries written before they held ``input_shape``/``num_classes``: the shape comes
    from report.json (its input and the last kernel's outputs); without either, one line."""
    import json
    import shutil

    import numpy as np

    from mpdnn.training import setup
    from mpdnn.training.rundir import RunDir, RunDirError

    old = tmp_path / "old"
    shutil.copytree(run, old)
    summary = json.loads((old / "summary.json").read_text())
    shape = (tuple(summary.pop("input_shape")), summary.pop("num_classes"))
    (old / "summary.json").write_text(json.dumps(summary))
    assert tuple(setup.run_data_shape(RunDir(old), summary)) == shape
    loaded = setup.load_run_model(old).model
    x = np.random.default_rng(0).normal(size=(2, *shape[0])).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(delivered(x)))
    (old / "report.json").unlink()
    with pytest.raises(RunDirError, match="neither summary.json nor report.json"):
        setup.run_data_shape(RunDir(old), summary)
