"""Training runs as subprocesses, several at once: launch, poll, stop on SIGTERM, status.

Shared by ``scripts/reproduce_cifar10.py`` and ``scripts/budget_study.py``. Every job is one
``python -m mpdnn.train`` process in its own workdir, its output in a log file beside it. A
job that starts from another run's final model (``after``: that run's workdir) waits until
that run has finished, and is not run when it fails. A workdir that holds a finished run is
not trained again (unless asked); an interrupted one resumes from its checkpoints.
SIGTERM / Ctrl-C make every running job checkpoint and stop, and start no other.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a file from anywhere: import this checkout's mpdnn
    sys.path.insert(0, str(REPO))

from mpdnn.training.rundir import RunDir, RunDirError  # noqa: E402

EXIT_INFEASIBLE = 3  # mpdnn.train: a run with budgets delivered no model
EXIT_STOPPED = (143, -15)  # mpdnn.train checkpointed on SIGTERM, or SIGTERM killed it
FINISHED_BEFORE = "finished before"
MEMORY_SHARE = 0.9  # of one accelerator's memory, split between the runs on it


def memory_env(n: int) -> dict[str, str]:
    """The environment that lets ``n`` runs share one accelerator: each preallocates
    ``0.9 / n`` of its memory (JAX's own default, 0.75, for one run)."""
    return {"XLA_PYTHON_CLIENT_MEM_FRACTION": f"{MEMORY_SHARE / n:.3f}"} if n > 1 else {}


def finished(workdir: Path) -> bool:
    """Whether ``workdir`` holds a run that reached its last step."""
    try:
        return RunDir(workdir).finished()
    except RunDirError:  # an unreadable summary: not a finished run
        return False


@dataclasses.dataclass(eq=False)
class Job:
    """One training process: its command, workdir and log; ``after`` the workdir of the run
    it starts from (None: it starts from nothing)."""

    name: str
    command: list[str]
    workdir: Path
    log: Path
    after: Path | None = None
    process: subprocess.Popen | None = None
    core: int | None = None
    start: float = 0.0
    wall: float = 0.0
    returncode: int | None = None

    def launch(self, env: dict[str, str], core: int | None = None) -> None:
        self.workdir.parent.mkdir(parents=True, exist_ok=True)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.log, "a")  # noqa: SIM115 (closed in poll)
        self._handle.write(f"$ {shlex.join(self.command)}\n")
        self._handle.flush()
        self.start = time.perf_counter()
        self.process = subprocess.Popen(
            self.command, stdout=self._handle, stderr=subprocess.STDOUT, cwd=REPO, env=env
        )
        self.core = core
        if core is not None and hasattr(os, "sched_setaffinity"):
            # Pinned from here, not in the child (a preexec_fn would fork this process,
            # which may hold JAX's threads): the child is still starting Python, before XLA
            # starts the threads that inherit the affinity.
            try:
                os.sched_setaffinity(self.process.pid, {core})
            except OSError:  # it ended already, or the core is not ours
                pass

    def poll(self) -> bool:
        """Whether the process has ended (and then its exit status and wall time are set)."""
        assert self.process is not None
        code = self.process.poll()
        if code is None:
            return False
        self._handle.close()
        self.returncode, self.wall = code, time.perf_counter() - self.start
        return True

    def stop(self) -> None:
        """SIGTERM: mpdnn.train checkpoints and exits."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def status(self) -> str:
        """``completed``, ``infeasible`` (no model within every budget), ``stopped``,
        ``diverged`` (a non-finite loss) or ``failed (exit N)``, from the exit status and
        the run directory's summary."""
        if self.returncode == 0:
            return "completed"
        if self.returncode == EXIT_INFEASIBLE:
            return "infeasible"
        if self.returncode in EXIT_STOPPED:
            return "stopped"
        run = RunDir(self.workdir)
        try:
            error = run.error if run.status == "failed" else None
        except RunDirError:
            error = None
        if error and "not finite" in error:
            return "diverged"
        return f"failed (exit {self.returncode})"


def run_all(
    jobs: list[Job],
    *,
    slots: int,
    env: dict[str, str],
    pin_cores: bool = False,
    rerun_finished: bool = False,
    deadline_s: float = 0.0,
    on_end: Callable[[Job, str], None] | None = None,
) -> dict[str, str]:
    """Run ``jobs`` in order, up to ``slots`` at once; returns ``{name: status}``.

    A status is :meth:`Job.status`'s, :data:`FINISHED_BEFORE` (its workdir held a finished
    run, unless ``rerun_finished``) or ``not run (why)``. ``on_end(job, status)`` is called
    as each job ends or is found finished. ``pin_cores``: each process on a core of its own.
    ``deadline_s``: start no job after that many seconds.
    """
    start = time.perf_counter()
    pending, running, statuses, stopping = list(jobs), [], {}, []
    on_end = on_end or (lambda job, status: None)
    cores = list(range(os.cpu_count() or 1))

    def say(text: str) -> None:
        print(f"[{time.perf_counter() - start:7.0f}s] {text}", flush=True)

    def stop(signum, frame):
        if not stopping:
            print("stopping: the running jobs checkpoint and exit", flush=True)
        stopping.append(signum)
        for job in running:
            job.stop()

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while pending or running:
            for job in list(running):
                if not job.poll():
                    continue
                running.remove(job)
                statuses[job.name] = status = job.status()
                on_end(job, status)
                done = len(jobs) - len(pending) - len(running)
                say(f"{job.name}: {status} in {job.wall:.0f}s ({done}/{len(jobs)}, log {job.log})")
                if status != "completed":
                    for other in [o for o in pending if o.after == job.workdir]:
                        pending.remove(other)
                        statuses[other.name] = f"not run ({job.name} did not complete)"
            elapsed = time.perf_counter() - start
            out_of_time = bool(stopping) or bool(deadline_s and elapsed > deadline_s)
            while pending and len(running) < slots and not out_of_time:
                ready = [j for j in pending if j.after is None or finished(j.after)]
                if not ready:
                    break
                job = ready[0]
                pending.remove(job)
                if not rerun_finished and finished(job.workdir):
                    statuses[job.name] = FINISHED_BEFORE
                    on_end(job, FINISHED_BEFORE)
                    say(f"{job.name}: already finished in {job.workdir}")
                    continue
                busy = {j.core for j in running}
                core = next((c for c in cores if c not in busy), None) if pin_cores else None
                job.launch(env, core)
                running.append(job)
                say(f"{job.name}: started ({len(pending)} waiting)")
            if out_of_time and pending and not running:
                why = "stopped" if stopping else "deadline"
                for job in pending:
                    statuses[job.name] = f"not run ({why})"
                pending.clear()
            if running:
                time.sleep(1.0)
            elif pending and not out_of_time:
                # Nothing runs and nothing can start: what they start from never finished.
                for job in pending:
                    statuses[job.name] = f"not run (no finished run in {job.after})"
                pending.clear()
        return statuses
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
