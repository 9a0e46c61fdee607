"""A finished training run → its delivered model (the input of ``python -m mpdnn.export``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flax import nnx

from mpdnn.export.codec import ExportError


def load_run(workdir: str | Path) -> tuple[nnx.Module, dict[str, Any]]:
    """The delivered model of a finished training run and a description of the run
    (:func:`mpdnn.training.setup.load_run_model`: rebuilt from ``config.json``, restored from
    ``best/`` or ``final/``, whichever the run delivered)."""
    from mpdnn.training.rundir import RunDirError
    from mpdnn.training.setup import load_run_model

    try:
        loaded = load_run_model(workdir)
    except RunDirError as err:
        raise ExportError(str(err)) from None
    config, summary = loaded.config, loaded.summary
    run = {
        "workdir": str(workdir),
        "name": summary.get("name"),
        "model": config.model.name,
        "dataset": config.data.name,
        "delivered": summary.get("delivered"),
        "checkpoint": loaded.checkpoint.name,
        "step": loaded.step,
        "test_error": summary.get("delivered_test_error"),
        "budgets": summary.get("budgets"),
        "delivered_sizes": summary.get("delivered_sizes"),
        "compute_dtype": config.model.get("compute_dtype") or "float32",
    }
    return loaded.model, run
