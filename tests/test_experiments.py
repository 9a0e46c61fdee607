"""Every experiment config builds and trains two steps (its ``:smoke`` argument)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from mpdnn.data import find_cifar10_archive
from mpdnn.training import config as cfg
from mpdnn.training.trainer import train_and_evaluate

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
# experiments/cifar10/ holds one generated file per row of the paper's tables (39); they are
# checked in tests/test_cifar10_rows.py and smoke-trained in tests/test_reproduce_cifar10.py.
CONFIGS = sorted(
    p
    for p in EXPERIMENTS.rglob("*.py")
    if "get_config" in p.read_text() and "cifar10" not in p.relative_to(EXPERIMENTS).parts
)


def load(path: Path):
    spec = importlib.util.spec_from_file_location(f"experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_there_are_configs():
    assert "digits.py" in {p.name for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(EXPERIMENTS)))
def test_smoke(path, tmp_path):
    config = load(path).get_config("smoke")
    cfg.check(config)
    for name, run in cfg.variants(config).items():
        if run.data.name == "cifar10" and run.data.dir is None and find_cifar10_archive() is None:
            # No local CIFAR-10 on this machine: same shapes, synthetic pixels.
            run.data.name = "synthetic"
        run.train.progress = False
        result = train_and_evaluate(run, tmp_path / name)
        assert result.status == "completed"
        assert result.step == min(2, result.total_steps) == 2
        assert result.final_test_error is not None and 0 <= result.final_test_error <= 1
