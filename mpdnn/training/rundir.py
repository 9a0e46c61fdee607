"""The run directory: what ``python -m mpdnn.train`` leaves in ``--workdir``, defined once.

Every reader and writer of a run goes through :class:`RunDir`: the trainer writes it,
``mpdnn.report``, ``mpdnn.export``, ``init.from_workdir`` and the scripts read it. A run
directory holds:

========================  =============================================================
``config.json``           the run's config (written once its checks have passed)
``summary.json``          how the run ended (``status``) and what it delivered; see below
``report.json``           per-tensor bits and memory of the delivered model
                          (:meth:`mpdnn.optim.MemoryReport.to_json`)
``metrics.jsonl``         one JSON record per line: ``train``, ``eval``, ``authors_eval``,
                          ``summary`` (``type`` and ``step`` in each); the record of truth
``tensorboard/``          the same scalars as TensorBoard events
``checkpoints/``          the latest training states (orbax; resume reads the newest readable)
``best/``                 the selected evaluation that met every budget
``final/``                the final parameters (float-net init of other runs reads these)
``bitwidths.png``,        plots of ``report.json`` and of the budget search
``diagnostics.png``
``.lock``                 held (``flock``) by the process that trains in it
========================  =============================================================

A config with variants (``run_variants``) writes one run directory per variant below
``--workdir``, and ``table.json`` / ``table.md`` (every variant's summary) beside them.

``summary.json``'s ``status``: ``"completed"`` (the run reached its last step; whether it
delivered a model is ``delivered``), ``"stopped"`` (checkpointed on request, resumable) or
``"failed"`` (``error`` says why, e.g. a non-finite loss; the last good checkpoint is kept).
A summary without ``status`` was written by a completed run of an older mpdnn.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import ml_collections

STATUSES = ("completed", "stopped", "failed")


class RunDirError(ValueError):
    """A run directory that cannot be read as asked (the message is one line)."""


class RunBusyError(RunDirError):
    """Another process trains in this run directory."""


def _read_json(path: Path, what: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise RunDirError(f"cannot read {what} {path}: {err}") from None
    if not isinstance(value, dict):
        raise RunDirError(f"cannot read {what} {path}: not a JSON object")
    return value


def _write_json(path: Path, value: Any) -> None:
    """Written whole or not at all: a crash mid-write leaves the previous file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)


class RunDir:
    """One run directory (it need not exist yet)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # Paths ------------------------------------------------------------------------------

    @property
    def config_file(self) -> Path:
        return self.path / "config.json"

    @property
    def summary_file(self) -> Path:
        return self.path / "summary.json"

    @property
    def report_file(self) -> Path:
        return self.path / "report.json"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def best(self) -> Path:
        return self.path / "best"

    @property
    def final(self) -> Path:
        return self.path / "final"

    @property
    def bitwidths_plot(self) -> Path:
        return self.path / "bitwidths.png"

    @property
    def diagnostics_plot(self) -> Path:
        return self.path / "diagnostics.png"

    @property
    def table_json(self) -> Path:
        return self.path / "table.json"

    @property
    def table_md(self) -> Path:
        return self.path / "table.md"

    # The lock ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold an exclusive ``flock`` on ``.lock`` (two runs in one directory would
        overwrite each other's checkpoints). The OS drops it when the process dies, even by
        SIGKILL, so it never goes stale. Raises :class:`RunBusyError` when it is held."""
        import fcntl

        self.path.mkdir(parents=True, exist_ok=True)
        lock_file = self.path / ".lock"
        with open(lock_file, "w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise RunBusyError(
                    f"another run is using {self.path} (it holds {lock_file}); wait for it "
                    "to finish or choose another --workdir"
                ) from None
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # config.json ------------------------------------------------------------------------

    def write_config(self, config: ml_collections.ConfigDict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.config_file.with_name("config.json.tmp")
        tmp.write_text(config.to_json(indent=1) + "\n")
        os.replace(tmp, self.config_file)

    def read_config(self) -> ml_collections.ConfigDict:
        """The run's config; :class:`RunDirError` when there is none."""
        if not self.path.is_dir():
            raise RunDirError(f"no run directory {self.path}")
        value = _read_json(self.config_file, "run config")
        if value is None:
            raise RunDirError(
                f"no config.json in {self.path}: not a run of python -m mpdnn.train (a config "
                "with variants writes one run per variant: pass RUN/<variant>)"
            )
        return ml_collections.ConfigDict(value)

    # summary.json -----------------------------------------------------------------------

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        """``summary`` must say its ``status`` (one of :data:`STATUSES`)."""
        if summary.get("status") not in STATUSES:
            raise ValueError(f"summary status must be one of {STATUSES}, got {summary!r:.80}")
        self.path.mkdir(parents=True, exist_ok=True)
        _write_json(self.summary_file, dict(summary))

    def write_failure(self, step: int, error: str, **fields: Any) -> None:
        """A ``"failed"`` summary: the run cannot go on as it is (``error`` says why)."""
        self.write_summary({"status": "failed", "step": int(step), "error": error, **fields})

    def read_summary(self) -> dict[str, Any] | None:
        """``summary.json`` (``status`` filled in for older runs), or None before any end."""
        summary = _read_json(self.summary_file, "run summary")
        if summary is not None:
            summary.setdefault("status", "completed")
        return summary

    @property
    def status(self) -> str | None:
        """``"completed"``, ``"stopped"``, ``"failed"``, or None (no end written yet)."""
        summary = self.read_summary()
        return None if summary is None else summary["status"]

    @property
    def error(self) -> str | None:
        """Why a ``"failed"`` run stopped (one line), else None."""
        summary = self.read_summary()
        return None if summary is None else summary.get("error")

    def started(self) -> bool:
        """Whether a run trained here: its config and a checkpoint or final model are on
        disk (a rerun continues it, so its config must be the same)."""
        return self.config_file.is_file() and (self.checkpoints.is_dir() or self.final.is_dir())

    def finished(self) -> bool:
        """Whether the run reached its last step (whether it delivered is in the summary)."""
        return self.status == "completed"

    def completed_summary(self) -> dict[str, Any]:
        """The summary of a completed run; :class:`RunDirError` says what is missing."""
        self.read_config()  # a directory that is no run at all says so first
        summary = self.read_summary()
        if summary is None or summary["status"] != "completed":
            how = "no summary.json" if summary is None else f"status {summary['status']!r}"
            raise RunDirError(
                f"{self.path} is not a finished run ({how}): let it finish, or resume it with "
                "the same python -m mpdnn.train command"
            )
        return summary

    def delivered_checkpoint(self) -> Path:
        """The checkpoint directory of the delivered model of a completed run."""
        summary = self.completed_summary()
        delivered = summary.get("delivered")
        if delivered is None:
            raise RunDirError(
                f"{self.path} delivered no model: no evaluation met every budget "
                f"{summary.get('budgets')} (docs/method.md §6)"
            )
        directory = self.best if delivered == "best_feasible" else self.final
        if not directory.is_dir():
            raise RunDirError(f"{self.path} is not a finished run: no {directory.name}/")
        return directory

    # report.json ------------------------------------------------------------------------

    def write_report(self, report: Mapping[str, Any]) -> None:
        _write_json(self.report_file, dict(report))

    def read_report(self) -> dict[str, Any] | None:
        return _read_json(self.report_file, "run report")

    # metrics.jsonl ----------------------------------------------------------------------

    def metrics(self, kind: str | None = None) -> list[dict[str, Any]]:
        """The records of ``metrics.jsonl`` (of ``type == kind`` if given), in order. A
        last line cut short by a crash is skipped."""
        if not self.metrics_file.is_file():
            return []
        records = []
        for line in self.metrics_file.read_text().splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if kind is None or record.get("type") == kind:
                records.append(record)
        return records

    def truncate_metrics(self, step: int) -> int:
        """Keep the records of ``metrics.jsonl`` up to ``step`` (the step a run resumes
        from: it writes the later ones again) and drop a torn last line; returns how many
        records went. Rewritten whole or not at all."""
        if not self.metrics_file.is_file():
            return 0
        kept, dropped = [], 0
        for line in self.metrics_file.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                dropped += bool(line.strip())
                continue
            if int(record.get("step", 0)) <= step:
                kept.append(line + "\n")
            else:
                dropped += 1
        if dropped:
            tmp = self.metrics_file.with_name(self.metrics_file.name + ".tmp")
            tmp.write_text("".join(kept))
            os.replace(tmp, self.metrics_file)
        return dropped

    # table.json / table.md (a directory of variants) -------------------------------------

    def write_table(self, record: Mapping[str, Any], markdown: str) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        _write_json(self.table_json, dict(record))
        self.table_md.write_text(markdown)

    def read_table(self) -> dict[str, Any] | None:
        return _read_json(self.table_json, "table")
