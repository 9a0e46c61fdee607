"""Where a run's numbers go: JSON lines, TensorBoard and a progress bar (process 0 only).

``metrics.jsonl`` is the record of truth (one JSON object per line, appended and flushed,
so a crash loses nothing written); TensorBoard (``tensorboardX``) and the progress
bar (``tqdm``) are views of it.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Mapping
from typing import Any

from mpdnn.training.rundir import RunDir


def _plain(value: Any) -> Any:
    """JSON-safe: numpy/jax scalars to Python, non-finite floats to strings."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsWriter:
    """Appends records to a run's ``metrics.jsonl`` and scalars to its TensorBoard events
    (:class:`~mpdnn.training.rundir.RunDir` says where).

    ``enabled=False`` (every process but 0) makes every method a no-op. ``resume_step``: the
    step a run restarts from; the records after it (written before a crash or stop, and
    about to be written again) are dropped from both, so that readers see each step once.
    """

    def __init__(
        self,
        run: RunDir,
        *,
        enabled: bool = True,
        tensorboard: bool = True,
        resume_step: int | None = None,
    ):
        from tensorboardX import SummaryWriter

        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        run.path.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            run.truncate_metrics(resume_step)
        self._file = open(run.metrics_file, "a", buffering=1)  # noqa: SIM115
        if tensorboard:
            # purge_step: TensorBoard hides the events at and after it from earlier writers.
            purge = resume_step + 1 if resume_step is not None else None
            self._tb = SummaryWriter(str(run.tensorboard), purge_step=purge)

    def write(self, kind: str, step: int, values: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"type": kind, "step": int(step), "time": round(time.time(), 3), **values}
        self._file.write(json.dumps(_plain(record), allow_nan=False) + "\n")
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)
            self._tb.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()


class Progress:
    """A ``tqdm`` progress bar over training steps, with rate and ETA."""

    def __init__(self, total: int, initial: int, *, enabled: bool, desc: str, bar: bool = True):
        """``enabled=False``: silent (processes other than 0); ``bar=False``: no bar, but
        evaluation lines (:meth:`write`) still print."""
        self.enabled = enabled
        self.show_bar = bar
        self._bar = None
        self._total = total
        self._step = initial
        if not (enabled and bar):
            return
        from tqdm import tqdm

        self._bar = tqdm(
            total=total,
            initial=initial,
            desc=desc,
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
            mininterval=1.0,
        )

    def update(self, step: int, postfix: Mapping[str, float]) -> None:
        if not (self.enabled and self.show_bar):
            return
        text = " ".join(f"{k}={v:.4g}" for k, v in postfix.items())
        self._bar.update(step - self._step)
        self._bar.set_postfix_str(text, refresh=False)
        self._step = step

    def write(self, line: str) -> None:
        """A line above the bar (an evaluation), without breaking it."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
