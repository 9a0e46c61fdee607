"""Provenance of a reported number: command, commit, machine, date, wall time (STYLE.md)."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path

import jax

# Code whose uncommitted changes would make a result irreproducible from its commit.
_CODE_DIRS = (":/mpdnn", ":/experiments", ":/scripts")


def _git(*args: str) -> str:
    """Run a read-only git command in this checkout; raises if git or the repo is missing."""
    return subprocess.run(
        ["git", *args],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent,
        timeout=10,
    ).stdout


def provenance(command: str, *, wall_time_s: float | None = None, seed: int | None = None) -> dict:
    """Where a result came from: command, git commit, machine, date, jax version (STYLE.md).

    ``uncommitted`` lists the code files (under ``mpdnn/``, ``experiments/``, ``scripts/``)
    that differ from the commit, so a result produced by uncommitted code says so.
    """
    try:
        commit = _git("rev-parse", "HEAD").strip()
        status = _git("status", "--porcelain", "--untracked-files=all", "--", *_CODE_DIRS)
        # Porcelain lines are "XY path"; X may be a space, so never strip the line's start.
        uncommitted = [line[3:] for line in status.splitlines() if line.strip()]
    except (OSError, subprocess.SubprocessError):
        # A copy of the tree without .git (e.g. on a lent accelerator): the launcher may say
        # which commit it copied.
        commit = os.environ.get("MPDNN_GIT_COMMIT", "unknown (git unavailable)")
        uncommitted = []
    record = {
        "command": command,
        "git_commit": commit,
        "uncommitted": uncommitted,
        "machine": f"{platform.platform()}; {platform.processor() or platform.machine()}",
        "cpus": os.cpu_count(),
        "devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "jax_version": jax.__version__,
    }
    if wall_time_s is not None:
        record["wall_time_s"] = round(wall_time_s, 2)
    if seed is not None:
        record["seed"] = seed
    return record
