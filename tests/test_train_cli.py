"""``python -m mpdnn.train``: the table, exit statuses and one-line errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mpdnn import train

REPO = Path(__file__).resolve().parents[1]


def run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mpdnn.train", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
    )


def test_smoke_prints_the_table(tmp_path):
    proc = run("--config", "experiments/digits.py:smoke", "--workdir", str(tmp_path))
    # Two steps cannot meet the budget: the run must say so with status 3, not hide it.
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "NO model of learned met every budget" in proc.stderr
    assert "*: the final model is OVER BUDGET: learned (weight_kb)" in proc.stdout
    for name in ("float", "fixed", "learned"):
        assert any(line.startswith(name) for line in proc.stdout.splitlines()), proc.stdout
        assert (tmp_path / name / "summary.json").is_file()
    table = json.loads((tmp_path / "table.json").read_text())
    assert set(table["runs"]) == {"float", "fixed", "learned"}
    assert table["runs"]["learned"]["feasible"] is False
    assert "experiments/digits.py:smoke" in (tmp_path / "table.md").read_text()
    summary = json.loads((tmp_path / "learned" / "summary.json").read_text())
    assert summary["provenance"]["command"].startswith("python -m mpdnn.train --config")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--config.model.name=resnet99"], "model.name='resnet99' is unknown"),
        (["--config.budget.weight_kb=-1"], "budget.weight_kb=-1.0 must be a finite number > 0 KB"),
        (["--config.quant.weights.family=int"], "family='int' is unknown"),
        (["--config.model.nme=x"], "no key nme"),
        (["--config", "experiments/nonexistent.py"], "No such file or directory"),
        (["--config", "experiments/digits.py:bogus"], "unknown digits config argument"),
        (["--config.train.epochs=abc"], "--config.train.epochs=abc"),
        (["stray"], "unexpected arguments 'stray'"),
        (["--config.data.name=cifar10", "--config.data.dir=/nope"], "/nope"),
    ],
)
def test_bad_input_is_one_line_and_status_2(tmp_path, capsys, monkeypatch, flags, message):
    """In-process (``main(argv)``); the exit statuses of a real process are the smoke
    test's above."""
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exit_:
        train.main(["--workdir", str(tmp_path), *flags])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("==")]
    assert len(lines) == 1, err
    assert message in lines[0]
    assert lines[0].startswith("mpdnn.train: error:")
    if not any("data.dir" in f for f in flags):  # the data is found when a run starts
        assert not list(tmp_path.iterdir())  # rejected before any work: nothing written


def test_main_runs_in_process_twice(tmp_path, capsys, monkeypatch):
    """Fresh flags per call: a second call in the same process parses its own argv."""
    monkeypatch.chdir(REPO)
    for name in ("a", "b"):
        with pytest.raises(SystemExit) as exit_:
            train.main(
                ["--config", "experiments/digits.py:smoke", "--workdir", str(tmp_path / name)]
            )
        assert exit_.value.code == 3  # two steps cannot meet the budget (the smoke test)
        assert (tmp_path / name / "table.json").is_file()
    table = json.loads((tmp_path / "b" / "table.json").read_text())
    assert table["provenance"]["command"].endswith(f"--workdir {tmp_path / 'b'}")


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("def get_config(:\n", "SyntaxError: invalid syntax (bad.py, line 1)"),
        ("x = 1\x00\n", "SyntaxError: source code string cannot contain null bytes"),
        ("x = 1\n", "the config file defines no get_config(arg=None)"),
        ("def get_config():\n    raise RuntimeError('boom')\n", "RuntimeError: boom"),
    ],
)
def test_a_config_file_that_fails_to_load_is_one_line(tmp_path, capsys, source, message):
    config = tmp_path / "bad.py"
    config.write_text(source)
    with pytest.raises(SystemExit) as exit_:
        train.main(["--config", str(config), "--workdir", str(tmp_path / "w")])
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_a_workdir_that_cannot_be_written_is_one_line(tmp_path, capsys, monkeypatch, where):
    monkeypatch.chdir(REPO)
    blocker = tmp_path / "file"
    blocker.write_text("")
    workdir = blocker if where == "a file" else blocker / "run"
    with pytest.raises(SystemExit) as exit_:
        train.main(["--config", "experiments/digits.py:smoke", "--workdir", str(workdir)])
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"--workdir {workdir}: cannot write there" in lines[0], lines


@pytest.mark.parametrize(
    ("flag", "budgets"),
    [  # for every variant (float's 55.8 KB fits 60), or for the one variant
        ("--config.budget.weight_kb=60.0", {"float": 60.0, "learned": 60.0}),
        ("--config.variants.learned.budget.weight_kb=5.0", {"float": None, "learned": 5.0}),
    ],
)
def test_the_command_line_wins_over_a_variants_own_setting(
    tmp_path, capsys, monkeypatch, flag, budgets
):
    """digits' ``learned`` variant sets its own 3.75 KB budget; a command-line budget is the
    one it trains under."""
    monkeypatch.chdir(REPO)
    argv = ["--config", "experiments/digits.py:smoke", "--config.run_variants=float,learned"]
    try:
        train.main([*argv, flag, "--workdir", str(tmp_path)])
    except SystemExit as exit_:
        assert exit_.code == 3, capsys.readouterr().err  # 5 KB: two steps do not get there
    for name, limit in budgets.items():
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["budgets"] == ({"weight_kb": limit} if limit else {}), name


def test_pinned_keys_override_every_variant():
    from mpdnn.configs import digits
    from mpdnn.training import config as cfg

    config = digits.get_config()
    config.optim.learning_rate = 0.5
    runs = cfg.variants(config, pinned=["optim.learning_rate"])
    assert {n: r.optim.learning_rate for n, r in runs.items()} == dict.fromkeys(runs, 0.5)
    plain = cfg.variants(config)
    assert plain["fixed"].optim.learning_rate == 0.03 and plain["float"].optim.learning_rate == 0.5


def test_ctrl_c_checkpoints_and_stops_like_sigterm(tmp_path):
    """SIGINT (Ctrl-C): a checkpoint, exit 130 and a one-line note; the rerun resumes."""
    import signal
    import time

    args = ["--config", "experiments/digits.py", "--config.run_variants=float"]
    args += ["--config.train.progress=false", "--workdir", str(tmp_path)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "mpdnn.train", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "float" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and '"train"' in metrics.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "stopping after the current step" in err
    summary = json.loads((tmp_path / "float" / "summary.json").read_text())
    assert summary["status"] == "stopped"
    assert any((tmp_path / "float" / "checkpoints").iterdir())


def test_help_lists_every_config_key_with_its_value_and_meaning(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exit_:
        train.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--workdir" in out and "Config keys" in out
    # the default experiment's values (mpdnn/configs/digits.py) with the schema's comments
    assert "  train.epochs = 30\n" in out
    assert "  optim.decay_epochs = [20, 25]  # lr divided by 10 after these epochs" in out
    assert '  budget.method = "penalty"  # penalty | lagrangian' in out
    with pytest.raises(SystemExit):
        train.main(["--config", "experiments/cifar10.py:row=float", "--help"])
    assert "  train.epochs = 160\n" in capsys.readouterr().out


def test_a_full_disk_is_one_line_and_the_rerun_resumes(tmp_path, capsys, monkeypatch):
    """The disk fills after the first checkpoint: one line, exit 1, that checkpoint kept."""
    import collections
    import shutil

    monkeypatch.chdir(REPO)
    usage = collections.namedtuple("usage", "total used free")
    checkpoints = tmp_path / "float" / "checkpoints"
    full = {"on": True}

    def disk_usage(path):
        saved = checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())
        return usage(1 << 40, 0, 1000 if saved and full["on"] else 1 << 40)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    args = ["--config", "experiments/digits.py", "--config.run_variants=float"]
    args += ["--config.train.epochs=10", "--config.optim.decay_epochs=(6, 8)"]
    args += ["--config.train.progress=false", "--workdir", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_:
        train.main(args)
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("mpdnn.train: training failed: no room for the checkpoint at step"), err
    assert last.endswith("0.00 MB is free; the checkpoint at step 110 is kept"), last
    assert sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) == [110]

    full["on"] = False
    train.main(args)  # returns: the run completes
    assert "resuming" in capsys.readouterr().err
    assert json.loads((tmp_path / "float" / "summary.json").read_text())["status"] == "completed"


def test_a_disk_filled_during_a_save_ends_in_a_few_lines(tmp_path):
    """A real full disk (a 600 KB tmpfs, root only), filled while orbax writes: the room check
    is told there is plenty, so orbax meets the full disk itself. Its log records keep one
    line each and the command ends with its own."""
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mount)], capture_output=True
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()[:100]}")
    try:
        code = (
            "import collections, shutil, sys\n"
            "u = collections.namedtuple('u', 'total used free')\n"
            "shutil.disk_usage = lambda p: u(1 << 40, 0, 1 << 40)\n"
            "from mpdnn import train\n"
            "sys.argv[0] = 'mpdnn.train'\n"
            "train.run()\n"
        )
        args = ["--config", "experiments/digits.py", "--config.run_variants=float"]
        args += ["--config.train.progress=false", "--workdir", str(mount / "run")]
        proc = subprocess.run(
            [sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True
        )
    finally:
        subprocess.run(["umount", str(mount)], check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    # Whichever write meets the full disk first (a checkpoint's, the metrics') is named;
    # orbax's threads may still log a line after it.
    ours = [line for line in lines if line.startswith("mpdnn.train:")]
    assert len(ours) == 1 and ours[0].startswith("mpdnn.train: training failed: "), lines
    assert "No space left on device" in ours[0]
    # No log record or thread hook prints a traceback. What mpdnn cannot route: tensorstore,
    # calling back into the event loop orbax closed when its first write failed, prints a
    # traceback through asyncio's base_events.py per pending write (interleaved with the rest).
    frames = [line for line in lines if line.lstrip().startswith('File "')]
    assert all("asyncio/base_events.py" in line for line in frames), proc.stderr[-3000:]
    records = [line for line in lines if re.match(r"[EWF]\d{4} ", line)]
    assert len(records) <= 12, proc.stderr[-3000:]


def test_log_records_print_their_message_without_the_traceback():
    import logging

    from absl import logging as absl_logging

    from mpdnn.cli import terminal_logging

    terminal_logging()
    try:
        raise ValueError("RESOURCE_EXHAUSTED: No space left on device")
    except ValueError:
        record = logging.LogRecord(
            "absl", logging.ERROR, __file__, 1, "save failed in %s", ("/x",), sys.exc_info()
        )
    text = absl_logging.get_absl_handler().format(record)
    assert text.startswith("E") and text.endswith("] save failed in /x") and "\n" not in text
    assert not logging.getLogger("asyncio").isEnabledFor(logging.ERROR)
    assert absl_logging.get_verbosity() == absl_logging.WARNING
