"""Every experiment config builds and trains two steps (its ``:smoke`` argument)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from mpdnn.data import find_cifar10_archive
from mpdnn.training import config as cfg
from mpdnn.training.trainer import train_and_evaluate

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
CONFIGS = sorted(p for p in EXPERIMENTS.rglob("*.py") if "get_config" in p.read_text())
# The argument that makes each config a two-step run. The table configs take a row: one
# each here (tests/test_cifar10_rows.py and tests/test_imagenet_configs.py build every row;
# smoke-training all 55 would compile 55 networks, CI minutes rather than seconds).
SMOKE = {
    "cifar10.py": "row=t1_p3_wa_random,protocol=smoke",
    "imagenet.py": "row=resnet18_tqt_w4a4,protocol=smoke",
}


def load(path: Path):
    spec = importlib.util.spec_from_file_location(f"experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_there_are_configs():
    assert {"digits.py", *SMOKE} <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(EXPERIMENTS)))
def test_smoke(path, tmp_path):
    config = load(path).get_config(SMOKE.get(path.name, "smoke"))
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
