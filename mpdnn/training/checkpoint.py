"""Checkpoints of the training state: a small, crash-tolerant wrapper over orbax.

One :class:`Checkpointer` per work directory. Each step is one orbax step directory holding two
items: ``state`` (any pytree of arrays, saved with ``StandardSave``) and ``metadata`` (a small
JSON dict)::

    <directory>/<step>/_CHECKPOINT_METADATA        orbax's step record
    <directory>/<step>/state/_METADATA             tree structure and per-leaf types
    <directory>/<step>/state/_sharding             the saved shardings
    <directory>/<step>/state/manifest.ocdbt        OCDBT root of the array store
    <directory>/<step>/state/d/<hash>              OCDBT b-tree nodes (small arrays inline)
    <directory>/<step>/state/ocdbt.process_<i>/    each process's array data (``d/<hash>``)
    <directory>/<step>/metadata/metadata           the JSON metadata

A save is written to ``<step>.orbax-checkpoint-tmp*`` and renamed into place when complete, so a
crash mid-save leaves a directory orbax never lists. A finished checkpoint that cannot be read
later (truncated or deleted files) is skipped by :meth:`Checkpointer.restore`, which falls back
to the next older step with a warning (orbax does not).

A save that the disk has no room for (by the newest checkpoint's size, or before the first,
its arrays' bytes and a margin) is refused with a one-line :class:`CheckpointError` before
orbax writes anything, so the checkpoints already written stay whole and the run ends at
once rather than one save later.

Logging goes through ``absl.logging``, as orbax's does. The commands show WARNING and above,
one line per record without its traceback (:func:`mpdnn.cli.terminal_logging`), which keeps
orbax's INFO lines (dozens per save) off the terminal. A failed read, or a disk that someone
else fills during a save, leaves a few such lines of orbax's beside the command's own.
"""

from __future__ import annotations

import json
import operator
import os
import re
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from mpdnn.training.placement import any_process

PyTree = Any

_STATE = "state"
_METADATA = "metadata"
_REASON_CHARS = 240
# Room for orbax's small files (metadata, manifests: about 20 a checkpoint, each taking a
# block of 4 KiB or more) beyond a checkpoint's arrays.
_SMALL_FILES = 256 * 1024


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved or restored (one-line message)."""


class Checkpointer:
    """Saves and restores ``(step, state, metadata)`` in ``directory``, keeping the newest few.

    Args:
      directory: the checkpoint directory (created if missing). Reopening a directory that
        holds checkpoints resumes it: :meth:`restore` finds them.
      max_to_keep: how many of the newest checkpoints to keep (``None``: all).
      async_save: write in a background thread. :meth:`save` still copies the arrays off
        the device before it returns, so the caller may donate or overwrite them at once.
        Call :meth:`wait` (or :meth:`close`) to make the last save durable.

    Every process of a multi-host run must make the same calls; orbax coordinates them.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int | None = 3,
        async_save: bool = True,
    ):
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be positive or None, got {max_to_keep}")
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(n=max_to_keep),
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=(_STATE, _METADATA)
        )
        # Steps that restore() skipped as unreadable before restoring an older one.
        self._unreadable: set[int] = set()
        self._closed = False

    def save(
        self,
        step: int,
        state: PyTree,
        *,
        metadata: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Starts saving ``state`` and ``metadata`` as checkpoint ``step``; returns whether it did.

        A step that already has a checkpoint is skipped (``False``). Without ``force``, orbax
        also skips a step older than the newest checkpoint; ``force=True`` saves it anyway.
        ``metadata`` must be JSON-serializable (numpy and jax scalars and arrays become
        numbers and lists); :meth:`restore` returns it as ``json.loads`` reads it back.

        The first save after a :meth:`restore` that fell back past unreadable checkpoints
        deletes them: they belong to the abandoned run, and orbax would otherwise refuse
        to save at their steps again.
        """
        step = _as_step(step)
        payload = _json_payload(metadata)
        if self._unreadable:
            self.wait()
            for bad in sorted(self._unreadable):
                if bad in self._manager.all_steps():
                    logging.warning(
                        "deleting unreadable checkpoint at step %d in %s", bad, self.directory
                    )
                    self._manager.delete(bad)
            self._unreadable.clear()
        if step in self._manager.all_steps():
            logging.debug("checkpoint at step %d in %s exists; not saving", step, self.directory)
            return False
        self._check_room(step, state)
        args = ocp.args.Composite(
            **{_STATE: ocp.args.StandardSave(state), _METADATA: ocp.args.JsonSave(payload)}
        )
        try:
            return bool(self._manager.save(step, args=args, force=force))
        except ocp.checkpoint_manager.StepAlreadyExistsError:
            logging.debug("checkpoint at step %d in %s exists; not saving", step, self.directory)
            return False
        except Exception as e:
            # A failed background save surfaces at the next save (orbax waits for it first).
            raise CheckpointError(
                f"saving checkpoint at step {step} in {self.directory} failed ({_reason(e)})"
            ) from e

    def _check_room(self, step: int, state: PyTree) -> None:
        """Raises :class:`CheckpointError` (in every process, if any one lacks the room)
        when the disk has less free space than a checkpoint takes.

        orbax meets a full disk in a dozen threads at once, each logging its traceback, and
        reports it one save late; a save that will not fit is refused before it starts, and
        the checkpoints already written stay whole. A disk filled by someone else during a
        save still fails it, later and more noisily, with the same outcome."""
        self.wait()  # a save still in flight holds space that is not free yet
        try:
            free = shutil.disk_usage(self.directory).free
        except OSError:  # a file system without the numbers: no check
            free = None
        need = self._room_needed(state)
        short = free is not None and free < need
        if any_process(short):
            kept = self._manager.latest_step()
            raise CheckpointError(
                f"no room for the checkpoint at step {step} in {self.directory}: it takes "
                f"about {_megabytes(need)} and "
                + (f"{_megabytes(free)} is free" if short else "another process lacks it")
                + (f"; the checkpoint at step {kept} is kept" if kept is not None else "")
            )

    def _room_needed(self, state: PyTree) -> int:
        """Bytes the next checkpoint takes on disk: what the newest one takes (a run saves
        the same arrays each time), or, before the first, its arrays' bytes and room for
        orbax's few dozen small files."""
        latest = self._manager.latest_step()
        if latest is not None:
            taken = _allocated(os.path.join(self.directory, str(latest)))
            if taken:
                return int(1.1 * taken)
        nbytes = sum(int(getattr(leaf, "nbytes", 0)) for leaf in jax.tree.leaves(state))
        return int(1.25 * nbytes) + _SMALL_FILES

    def wait(self) -> None:
        """Blocks until every started save is complete and durable."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            raise CheckpointError(
                f"saving a checkpoint in {self.directory} failed ({_reason(e)})"
            ) from e

    def latest_step(self) -> int | None:
        """The newest checkpoint's step (``None`` if there is none); it may be unreadable."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """The steps of all checkpoints, ascending (one still being saved included)."""
        return sorted(self._manager.all_steps())

    def restore(
        self, abstract_state: PyTree, step: int | None = None
    ) -> tuple[int, PyTree, dict] | None:
        """Restores ``(step, state, metadata)``; ``None`` if there are no checkpoints.

        Args:
          abstract_state: the target: a pytree of the saved structure whose leaves are
            ``jax.ShapeDtypeStruct`` (with ``sharding``) or concrete arrays, e.g. a freshly
            initialised state. Restored arrays take each target leaf's shape, dtype and
            sharding (a different stored dtype is cast; a different shape is an error).
          step: the step to restore; ``None``: the newest readable checkpoint. If the newest
            is unreadable this warns and falls back to the next older one, and so on.

        Raises:
          CheckpointError: ``step`` is given and missing or unreadable, or no checkpoint
            is readable.
        """
        self.wait()  # an in-flight save must not look like a missing or corrupt one
        target = jax.tree.map(_abstract_leaf, abstract_state)
        steps = sorted(self._manager.all_steps(), reverse=True)
        if step is not None:
            step = _as_step(step)
            if step not in steps:
                raise CheckpointError(
                    f"no checkpoint at step {step} in {self.directory} (steps: {sorted(steps)})"
                )
            try:
                return (step, *self._restore_step(step, target))
            except Exception as e:
                raise CheckpointError(
                    f"checkpoint at step {step} in {self.directory} is unreadable ({_reason(e)})"
                ) from e
        if not steps:
            return None
        for i, candidate in enumerate(steps):
            try:
                state, metadata = self._restore_step(candidate, target)
            except Exception as e:
                error = e
                if i + 1 < len(steps):
                    logging.warning(
                        f"checkpoint at step {candidate} in {self.directory} is unreadable "
                        f"({_reason(e)}); falling back to step {steps[i + 1]}"
                    )
                continue
            self._unreadable.update(steps[:i])
            return candidate, state, metadata
        raise CheckpointError(
            f"no readable checkpoint in {self.directory} (tried steps {steps}; "
            f"step {steps[-1]}: {_reason(error)})"
        ) from error

    def close(self) -> None:
        """Waits for pending saves and releases orbax's resources; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.wait()
        finally:
            self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _restore_step(self, step: int, target: PyTree) -> tuple[PyTree, dict]:
        """One orbax restore of ``step``."""
        args = ocp.args.Composite(
            **{_STATE: ocp.args.StandardRestore(target), _METADATA: ocp.args.JsonRestore()}
        )
        restored = self._manager.restore(step, args=args)
        metadata = restored[_METADATA]
        if not isinstance(metadata, dict):
            raise CheckpointError(f"metadata is {type(metadata).__name__}, not a JSON object")
        return restored[_STATE], metadata


def _allocated(directory: str) -> int:
    """The bytes the files under ``directory`` take on disk (0 if it is missing)."""
    total = 0
    for root, _, files in os.walk(directory):
        for name in files:
            try:
                st = os.stat(os.path.join(root, name))
            except OSError:
                continue
            total += max(st.st_size, 512 * getattr(st, "st_blocks", 0))
    return total


def _megabytes(nbytes: int) -> str:
    return f"{nbytes / 1e6:.2f} MB"


def _as_step(step: int) -> int:
    """``step`` as a non-negative Python int (numpy and 0-d jax integers too)."""
    value = operator.index(step)
    if value < 0:
        raise ValueError(f"step must be non-negative, got {value}")
    return value


def _abstract_leaf(leaf: Any) -> Any:
    """A concrete ``jax.Array`` becomes its ``ShapeDtypeStruct`` with the same sharding."""
    if isinstance(leaf, jax.Array):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    return leaf


def _json_payload(metadata: Mapping[str, Any] | None) -> dict:
    """``metadata`` as it will read back from JSON; raises now rather than in the writer."""
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a mapping, got {type(metadata).__name__}")
    try:
        return json.loads(json.dumps(dict(metadata), default=_json_default))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint metadata is not JSON-serializable ({e})") from e


def _json_default(value: Any) -> Any:
    """Numpy and jax scalars and arrays as JSON numbers and lists."""
    if isinstance(value, np.generic | np.ndarray | jax.Array):
        return np.asarray(value).tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-serializable")


def _reason(error: BaseException) -> str:
    """``error`` as one short line: its type and the first line of its message. A long line
    keeps its start and its end; when the message carries an operating-system error
    (``errno``, or tensorstore's ``os_error_code='28'``) whose text the shortened line lost,
    the text is appended (e.g. "[No space left on device]")."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    if len(text) <= _REASON_CHARS:
        return text
    tail = _REASON_CHARS // 2
    short = text[: _REASON_CHARS - tail - 5] + " ... " + text[-tail:]
    code = getattr(error, "errno", None)
    if not isinstance(code, int):
        found = re.search(r"os_error_code='?(\d+)", str(error))
        code = int(found.group(1)) if found else None
    if code is not None:
        meaning = os.strerror(code)
        if meaning not in short:
            short += f" [{meaning}]"
    return short
