"""Where a run's numbers go: JSON lines, TensorBoard and a progress bar (process 0 only).

``metrics.jsonl`` is the record of truth (one JSON object per line, appended and flushed,
so a crash loses nothing written); TensorBoard (``tensorboardX``, optional) and the
progress bar (``tqdm``, optional; a plain line per update without it) are views of it.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any


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
    """Appends records to ``<workdir>/metrics.jsonl`` and scalars to TensorBoard.

    ``enabled=False`` (every process but 0) makes every method a no-op.
    """

    def __init__(self, workdir: Path, *, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        workdir.mkdir(parents=True, exist_ok=True)
        self._file = open(workdir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                pass
            else:
                self._tb = SummaryWriter(str(workdir / "tensorboard"))

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
    """A progress bar over training steps with rate and ETA (``tqdm`` when installed)."""

    def __init__(self, total: int, initial: int, *, enabled: bool, desc: str, bar: bool = True):
        """``enabled=False``: silent (processes other than 0); ``bar=False``: no bar, but
        evaluation lines (:meth:`write`) still print."""
        self.enabled = enabled
        self.show_bar = bar
        self._bar = None
        self._total = total
        self._step = initial
        self._start = time.perf_counter()
        self._initial = initial
        self._last_print = 0.0
        if not (enabled and bar):
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
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
        if self._bar is not None:
            self._bar.update(step - self._step)
            self._bar.set_postfix_str(text, refresh=False)
        else:
            now = time.perf_counter()
            if now - self._last_print >= 10 or step == self._total:
                rate = (step - self._initial) / max(now - self._start, 1e-9)
                eta = (self._total - step) / rate if rate > 0 else float("inf")
                print(
                    f"step {step}/{self._total} {rate:.1f} step/s eta {eta:.0f}s {text}",
                    file=sys.stderr,
                    flush=True,
                )
                self._last_print = now
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
