"""The declared minimum versions (pyproject.toml) are the ones CI installs (.ci/floors.txt)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ \[;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_every_floor_is_pinned_in_the_floors_leg_and_nothing_else():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"])
    for name, extra in project["optional-dependencies"].items():
        if name in ("train", "test", "export"):  # dev: these and ruff; tf: never installed
            declared += extra
    floors = {_name(r): r.split(">=", 1)[1] for r in declared}
    pins = {}
    for line in (REPO / ".ci" / "floors.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[_name(name)] = version
    assert pins.pop("jaxlib") == floors["jax"]  # jax's own pin
    assert pins == floors
    assert "floors.txt" in (REPO / ".ci" / "run").read_text()
