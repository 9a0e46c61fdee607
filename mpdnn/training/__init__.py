"""Training: ``train_and_evaluate(config, workdir)``, configs, checkpoints, metrics.

Import :mod:`mpdnn.training.trainer` lazily through this package's attributes, so that
``mpdnn.training.checkpoint`` or ``mpdnn.training.config`` can be used without the rest.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ConfigError", "RunResult", "TrainingError", "train_and_evaluate"]


def __getattr__(name: str) -> Any:
    if name in ("RunResult", "TrainingError", "train_and_evaluate"):
        from mpdnn.training import trainer

        return getattr(trainer, name)
    if name == "ConfigError":
        from mpdnn.training.config import ConfigError

        return ConfigError
    raise AttributeError(f"module 'mpdnn.training' has no attribute {name!r}")
