"""metrics.jsonl and the TensorBoard events: what a reader finds, after a resume and a full disk."""

from __future__ import annotations

import errno
import gc
import json
import os
import struct
import sys
from pathlib import Path

import pytest
from tensorboardX.proto.event_pb2 import Event

from mpdnn.training.metrics import MetricsWriter
from mpdnn.training.rundir import RunDir


def read_events(path: Path) -> list[Event]:
    """The events of one file, read as TFRecords (length, its CRC, data, its CRC)."""
    data, events, at = path.read_bytes(), [], 0
    while at < len(data):
        (length,) = struct.unpack_from("<Q", data, at)
        at += 12  # the length and its CRC
        events.append(Event.FromString(data[at : at + length]))
        at += length + 4
    return events


def scalars(events: list[Event]) -> list[tuple[int, str, float]]:
    return [(e.step, v.tag, v.simple_value) for e in events for v in e.summary.value]


def test_a_resume_purges_the_steps_after_it_from_both_views(tmp_path):
    run = RunDir(tmp_path)
    writer = MetricsWriter(run)
    for step in (1, 2, 3):
        writer.write("train", step, {"loss": float(step), "note": "text is not a scalar"})
    writer.close()
    writer = MetricsWriter(run, resume_step=2)  # the run resumes from its step-2 checkpoint
    writer.write("train", 3, {"loss": 30.0})
    writer.close()

    records = [json.loads(line) for line in run.metrics_file.read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    first, second = (read_events(p) for p in sorted(run.tensorboard.iterdir()))
    assert scalars(first) == [(s, "train/loss", float(s)) for s in (1, 2, 3)]
    # What TensorBoard drops the older file's steps >= 3 on: a START session log at step 3.
    starts = [e.step for e in second if e.HasField("session_log")]
    assert starts == [3] and second[0].file_version == "brain.Event:2"
    assert scalars(second) == [(3, "train/loss", 30.0)]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_full_disk_names_the_file_and_leaves_nothing_unwritten(tmp_path, monkeypatch):
    run = RunDir(tmp_path)
    run.metrics_file.symlink_to("/dev/full")  # every write: ENOSPC
    writer = MetricsWriter(run, tensorboard=False)
    with pytest.raises(OSError) as error:
        writer.write("train", 1, {"loss": 1.0})
    assert error.value.errno == errno.ENOSPC and error.value.filename == str(run.metrics_file)
    writer.write("train", 2, {"loss": 1.0})  # the failed writer writes nothing more
    writer.close()
    ignored = []
    monkeypatch.setattr(sys, "unraisablehook", ignored.append)
    del writer
    gc.collect()
    assert ignored == []  # no file left with bytes that Python would try to write again
