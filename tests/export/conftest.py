"""The finished training run that the CLI and reference-forward tests share (trained once)."""

from __future__ import annotations

import pytest

from mpdnn import export as ex
from tests.export.cases import run_config


@pytest.fixture(scope="package")
def run(tmp_path_factory):
    from mpdnn.training.trainer import train_and_evaluate

    workdir = tmp_path_factory.mktemp("run")
    result = train_and_evaluate(run_config(), workdir)
    assert result.delivered == "best_feasible"
    return workdir


@pytest.fixture(scope="package")
def delivered(run):
    """The run's delivered model, rebuilt from config.json and restored from best/."""
    model, info = ex.load_run(run)
    assert info["checkpoint"] == "best"
    return model
