"""Two processes train like one: ``jax.distributed`` on localhost, one CPU device per
process, cross-process collectives over gloo (JAX's CPU default).

Three processes of ``multihost_worker.py`` start at once: two form a distributed job through
``python -m mpdnn.train --distributed --coordinator_address=127.0.0.1:PORT --num_processes=2
--process_id=I`` (the documented launch), one trains the same config alone as the reference.
In the job only process 1 is asked to stop (as by a SIGTERM reaching one host first): both
must stop after the same step, and the trainer run again resumes from the checkpoint the two
wrote together. The job must end with the reference's parameters (read back from ``final/``
as a float-net init would), with each output written once, by process 0.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().with_name("multihost_worker.py")
#: About 40 s on 2 idle CPU cores; a hung collective or coordinator fails the test here.
TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_all(jobs: dict[str, list[str]], logs: Path, **env_vars: str) -> None:
    """Runs the workers at once; fails (after killing the others) as soon as one fails, since
    its partner would wait for it in a collective until the deadline."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", **env_vars)
    env.pop("XLA_FLAGS", None)  # one CPU device per process, whatever the caller set
    procs = {}
    for name, args in jobs.items():
        with open(logs / f"{name}.log", "w") as log:
            procs[name] = subprocess.Popen(
                [sys.executable, str(WORKER), *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO,
            )
    deadline = time.monotonic() + TIMEOUT_S
    failure = None
    try:
        while failure is None and any(p.poll() is None for p in procs.values()):
            failed = [n for n, p in procs.items() if p.poll() not in (None, 0)]
            if failed:
                failure = f"{', '.join(failed)} failed"
            elif time.monotonic() > deadline:
                failure = f"not done after {TIMEOUT_S} s (hung?)"
            else:
                time.sleep(0.2)
        failed = [n for n, p in procs.items() if p.poll() not in (None, 0)]
        if failure is None and failed:
            failure = f"{', '.join(failed)} failed"
    finally:
        # SIGKILL: the workers (mpdnn.train) take SIGTERM as "checkpoint and stop".
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    if failure is not None:
        tails = "\n".join(
            f"--- {name} (exit {p.returncode}):\n"
            + "\n".join((logs / f"{name}.log").read_text().splitlines()[-25:])
            for name, p in procs.items()
        )
        pytest.fail(f"{failure}\n{tails}")


def _records(workdir: Path, kind: str) -> list[dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


def test_two_processes_stop_resume_and_train_like_one(tmp_path):
    multi, single = tmp_path / "multi", tmp_path / "single"
    address = f"127.0.0.1:{_free_port()}"
    coordinator = ["--coordinator", address, "--num-processes", "2"]
    _run_all(
        {
            "process0": [str(multi), *coordinator, "--process-id", "0"],
            "process1": [str(multi), *coordinator, "--process-id", "1"],
            "single": [str(single)],
        },
        tmp_path,
        # Listen on loopback only (JAX's default, [::]:PORT, needs IPv6 and every interface).
        JAX_COORDINATOR_BIND_ADDRESS=address,
    )

    for process in (0, 1):
        result = json.loads((multi / f"result-{process}.json").read_text())
        assert result["process_count"] == 2 and result["device_count"] == 2
        # Both stopped (the CLI's status 143) though only process 1 was asked to, then
        # resumed from the checkpoint they wrote together and finished.
        assert result["status"] == 143
        assert result["resumed"] == {"status": "completed", "step": 3}
    log = (tmp_path / "process0.log").read_text()
    assert "stopping at step 1" in log and "from step 1" in log

    # Outputs: written by process 0 alone (process 1 appending would duplicate records).
    workdir = multi / "workdir"
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == 3
    # The delivered model: the best evaluation, saved at step 3 by both processes and
    # restored by both at the end.
    assert summary["delivered"] == "best_feasible" and summary["best_feasible_step"] == 3
    assert len(summary["provenance"]["devices"]) == 2
    assert [r["step"] for r in _records(workdir, "train")] == [1, 2, 3]
    assert [r["step"] for r in _records(workdir, "eval")] == [1, 2, 3]

    # Step for step the same training as one uninterrupted process with the same global batch.
    losses = [r["loss"] for r in _records(workdir, "train")]
    reference = [r["loss"] for r in _records(single / "workdir", "train")]
    np.testing.assert_allclose(losses, reference, rtol=1e-6)
    assert len(set(reference)) == 3  # three real steps, not a constant
    reference_summary = json.loads((single / "workdir" / "summary.json").read_text())
    assert summary["final_test_error"] == reference_summary["final_test_error"]

    got, want = np.load(multi / "params.npz"), np.load(single / "params.npz")
    assert sorted(got) == sorted(want)
    assert len(want) >= 20
    assert any(k.endswith("['qmax'].value") for k in want)  # quantizer θ included
    assert any(k.endswith("['d'].value") for k in want)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=0, atol=1e-6, err_msg=key)


def test_process_flags_without_distributed_are_one_line_and_status_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mpdnn.train", "--workdir", str(tmp_path)]
        + ["--num_processes=2", "--process_id=1"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "mpdnn.train: error: --num_processes, --process_id: only with --distributed (see --help)"
    ]
    assert not any(tmp_path.iterdir())  # nothing started
