"""A finished training run → its delivered model (the input of ``python -m mpdnn.export``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

from flax import nnx

from mpdnn.export.codec import ExportError


class _Shapes(NamedTuple):
    """What ``trainer.build_model`` reads of a dataset."""

    image_shape: tuple[int, ...]
    num_classes: int


def _data_shapes(config) -> _Shapes:
    """Input shape and class count of the run's dataset, from its config (report.json's
    ``input_shape``, where the run wrote one, takes precedence over the shape)."""
    d = config.data
    size = int(d.get("image_size", 224))
    shapes = {
        "cifar10": ((32, 32, 3), 10),
        "digits": ((8, 8, 1), 10),
        "synthetic": (tuple(d.get("synthetic_shape", (32, 32, 3))), d.get("synthetic_classes", 10)),
        "imagenet": ((size, size, 3), 1000),
    }
    if d.name not in shapes:
        raise ExportError(f"unknown dataset {d.name!r} in config.json")
    shape, classes = shapes[d.name]
    if d.get("stream"):  # streamed with ImageNet preprocessing: crops of image_size
        shape = (size, size, shape[-1])
    return _Shapes(tuple(int(n) for n in shape), int(classes))


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ExportError(f"cannot read {what} {path}: {err}") from None


def load_run(workdir: str | Path) -> tuple[nnx.Module, dict[str, Any]]:
    """The delivered model of a finished training run and a description of the run.

    Rebuilds the model from ``config.json`` (``init.from_workdir`` cleared: the restored
    checkpoint holds every parameter) and restores ``best/`` when ``summary.json`` says the
    delivered model is the best feasible evaluation, else ``final/``.
    """
    import ml_collections

    from mpdnn.training import config as cfg
    from mpdnn.training.checkpoint import Checkpointer, CheckpointError
    from mpdnn.training.trainer import build_model

    workdir = Path(workdir)
    if not workdir.is_dir():
        raise ExportError(f"no run directory {workdir}")
    if not (workdir / "config.json").is_file():
        raise ExportError(
            f"no config.json in {workdir}: not a run of python -m mpdnn.train (a config with "
            "variants writes one run per variant: pass RUN/<variant>)"
        )
    if not (workdir / "summary.json").is_file():
        raise ExportError(
            f"{workdir} is not a finished run (no summary.json): let it finish, or resume it "
            "with the same python -m mpdnn.train command"
        )
    summary = _read_json(workdir / "summary.json", "run summary")
    config = ml_collections.ConfigDict(_read_json(workdir / "config.json", "run config"))
    delivered = summary.get("delivered")
    if delivered is None:
        raise ExportError(
            f"{workdir} delivered no model: no evaluation met every budget "
            f"{summary.get('budgets')} (docs/method.md §6); there is nothing feasible to export"
        )
    directory = workdir / ("best" if delivered == "best_feasible" else "final")
    if not directory.is_dir():
        raise ExportError(f"{workdir} is not a finished run: no {directory.name}/ checkpoint")
    data = config.data.name
    try:
        shapes = _data_shapes(config)
    except ExportError as err:
        raise ExportError(f"{workdir}: {err}") from None
    report_path = workdir / "report.json"
    if report_path.is_file():
        shape = _read_json(report_path, "run report").get("input_shape")
        shapes = shapes._replace(image_shape=tuple(shape or shapes.image_shape))
    # The checkpoint holds every parameter: nothing is loaded from elsewhere.
    config.init.from_workdir = None
    if "torchvision" in config.init:
        config.init.torchvision = None
    try:
        model = build_model(config, shapes, workdir)
    except cfg.ConfigError as err:
        raise ExportError(f"{workdir}/config.json: {err}") from None
    _, params, rest = nnx.split(model, nnx.Param, ...)
    with Checkpointer(directory, max_to_keep=1, async_save=False) as ckpt:
        try:
            restored = ckpt.restore({"params": params, "rest": rest})
        except CheckpointError as err:
            raise ExportError(f"{directory}: {err}") from None
    if restored is None:
        raise ExportError(f"{directory} holds no checkpoint: {workdir} is not a finished run")
    step, state, metadata = restored
    nnx.update(model, state["params"], state["rest"])
    model.eval()
    run = {
        "workdir": str(workdir),
        "name": summary.get("name"),
        "model": config.model.name,
        "dataset": data,
        "delivered": delivered,
        "checkpoint": directory.name,
        "step": int(step),
        "test_error": summary.get("delivered_test_error"),
        "budgets": summary.get("budgets"),
        "delivered_sizes": summary.get("delivered_sizes"),
        "compute_dtype": config.model.get("compute_dtype") or "float32",
    }
    return model, run
