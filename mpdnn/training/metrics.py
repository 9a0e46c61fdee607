"""Where a run's numbers go: JSON lines, TensorBoard and a progress bar (process 0 only).

``metrics.jsonl`` is the record of truth (one JSON object per line, appended and flushed,
so a crash loses nothing written); TensorBoard (event files written with ``tensorboardX``)
and the progress bar (``tqdm``) are views of it.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Mapping
from pathlib import Path
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
        self.enabled = enabled
        self._file = None
        self._tb = None
        if not enabled:
            return
        run.path.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            run.truncate_metrics(resume_step)
        self._path = run.metrics_file
        self._file = open(self._path, "a", buffering=1)  # noqa: SIM115
        if tensorboard:
            # purge_step: TensorBoard hides the events at and after it from earlier writers.
            purge = resume_step + 1 if resume_step is not None else None
            self._tb = _EventFile(run.tensorboard, purge_step=purge)

    def write(self, kind: str, step: int, values: Mapping[str, Any]) -> None:
        """Appends one record; an ``OSError`` (e.g. a full disk) names the file."""
        if not self.enabled:
            return
        record = {"type": kind, "step": int(step), "time": round(time.time(), 3), **values}
        line = json.dumps(_plain(record), allow_nan=False) + "\n"
        scalars = {
            f"{kind}/{key}": value
            for key, value in values.items()
            if isinstance(value, int | float) and not isinstance(value, bool)
        }
        try:
            with _naming(self._path):
                self._file.write(line)
            if self._tb is not None:
                self._tb.write(int(step), scalars)
        except OSError:
            # A file that failed a write may hold unwritten bytes, which Python would try
            # (and fail, with a message) to write again when it collects the file: both
            # are closed now, and the writer writes nothing more.
            self.enabled = False
            with contextlib.suppress(OSError):
                self.close()
            raise

    def close(self) -> None:
        """Closes both files (idempotent); raises the first error after trying both."""
        files, self._file, self._tb = [self._file, self._tb], None, None
        error = None
        for f in files:
            if f is None:
                continue
            try:
                f.close()
            except OSError as err:
                error = error or err
        if error is not None:
            raise error


class _EventFile:
    """A TensorBoard event file, written in the caller's thread: each :meth:`write` is on
    disk, or has raised, when it returns.

    tensorboardX's ``SummaryWriter`` writes from a thread through a bounded queue; when the
    disk fills, that thread dies and the writer's next calls block, and its exit hook
    fails again at interpreter exit. Its ``EventsWriter`` (the same file format, no thread)
    has none of that.
    """

    def __init__(self, directory: Path, *, purge_step: int | None):
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        self._directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        with _naming(directory):
            # The name holds the second it was opened in and is opened for writing: the
            # nanoseconds keep a resume within that second from overwriting the file.
            self._writer = EventsWriter(str(directory / "events"), f".{time.time_ns()}")
            if purge_step is not None:
                # What SummaryWriter(purge_step=...) writes: both events tell TensorBoard
                # to drop the steps from purge_step on that earlier files hold.
                now = time.time()
                self._writer.write_event(
                    Event(step=purge_step, wall_time=now, file_version="brain.Event:2")
                )
                self._writer.write_event(
                    Event(
                        step=purge_step,
                        wall_time=now,
                        session_log=SessionLog(status=SessionLog.START),
                    )
                )
            self._writer.flush()

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.proto.summary_pb2 import Summary

        values = [Summary.Value(tag=tag, simple_value=float(v)) for tag, v in scalars.items()]
        event = Event(step=step, wall_time=time.time(), summary=Summary(value=values))
        with _naming(self._directory):
            self._writer.write_event(event)
            self._writer.flush()

    def close(self) -> None:
        with _naming(self._directory):
            self._writer.close()


@contextlib.contextmanager
def _naming(path: Path):
    """An ``OSError`` raised inside names ``path`` (a failed ``write`` does not)."""
    try:
        yield
    except OSError as err:
        if err.filename is not None or err.errno is None:
            raise
        raise OSError(err.errno, err.strerror, str(path)) from err


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
