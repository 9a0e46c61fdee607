"""The ``mpdnn`` command: one --help listing the subcommands, each with its module's flags."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mpdnn.__main__ import SUBCOMMANDS, main

REPO = Path(__file__).resolve().parents[1]


def test_help_lists_every_subcommand(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert set(SUBCOMMANDS) == {"train", "report", "export", "reproduce"}
    assert all(f"  {name}  " in out for name in SUBCOMMANDS), out


def test_no_or_an_unknown_subcommand_is_status_2(capsys):
    assert main([]) == 2
    assert main(["trian"]) == 2
    assert capsys.readouterr().err.strip() == (
        "mpdnn: error: unknown subcommand 'trian' (see mpdnn --help)"
    )


def test_subcommands_take_their_modules_flags(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["export", "--workdir", str(tmp_path / "missing")])
    assert exit_.value.code == 2
    assert "python -m mpdnn.export: error:" in capsys.readouterr().err
    assert main(["reproduce", "--rows", "no_such_row"]) == 2


def test_the_console_script_runs():
    """Installed (pip install -e .), ``mpdnn`` is on PATH beside this Python."""
    script = shutil.which("mpdnn", path=str(Path(sys.executable).parent))
    command = [script] if script else [sys.executable, "-m", "mpdnn"]
    proc = subprocess.run([*command, "--help"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0 and "subcommands:" in proc.stdout, proc.stderr
    proc = subprocess.run([*command, "train", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--config" in proc.stdout, proc.stderr[-2000:]
