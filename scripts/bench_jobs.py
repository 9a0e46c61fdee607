"""Runs side by side on one device: total training throughput of N processes at once.

The measure behind ``scripts/reproduce_cifar10.py --jobs N``. For each N of ``--jobs`` this
starts N ``scripts/bench_train.py`` processes at once (one case each, the same settings),
with the memory share ``reproduce_cifar10.py`` gives its rows (``jobs.memory_env``:
``XLA_PYTHON_CLIENT_MEM_FRACTION = 0.9 / N`` for N > 1), waits for all, and reads from each
its timed calls (compilation dropped) and its peak device memory. The total throughput is
every process's timed images over the wall-clock window from the first timed call of any
process to the last: processes that overlap only partly are not credited as if they had
overlapped fully.

Prints per N: the total images/s, its ratio to the smallest N, and the largest peak memory
of one process (where the device reports it), then the rule's choice
(:func:`choose_jobs`): the largest N up to which each step up raised the total by at least
``--gain`` (default 5 %). N processes must also fit: N × peak ≤ 0.9 × the device's memory
(processes that do not fit fail out of memory, and the script says which N).

    python scripts/bench_jobs.py [--jobs 1,2,4] [--case u3_wa] [--steps 1170]
        [--steps_per_call 390] [--warmup 1] [--json PATH]
    python scripts/bench_jobs.py --jobs 1,2 --steps 6 --steps_per_call 2 --warmup 1  # CPU check

On one GPU without MPS, processes share it by time slicing: kernels of two processes do
not run at once, so N > 1 gains only where one process leaves the GPU idle (host work
between calls, launch gaps, compilation). Measure before choosing N.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))

import jobs  # noqa: E402

from mpdnn.cli import OneLineParser  # noqa: E402
from mpdnn.provenance import provenance  # noqa: E402


def total_throughput(runs: list[dict], batch: int) -> dict:
    """Total images/s of processes' timed windows (``bench_train.py`` results) over the
    union of their windows."""
    start = min(r["window"][0] for r in runs)
    end = max(r["window"][1] for r in runs)
    images = sum(r["steps_timed"] * batch for r in runs)
    peaks = [r["peak_bytes"] for r in runs if r.get("peak_bytes") is not None]
    return {
        "images_per_s": images / (end - start),
        "seconds": round(end - start, 3),
        "per_process_images_per_s": [round(r["images_per_s"], 1) for r in runs],
        "peak_bytes_max": max(peaks) if peaks else None,
    }


def choose_jobs(totals: dict[int, dict], gain: float) -> int:
    """The largest N (of those measured, in increasing order) up to which every step up
    raised the total throughput by at least ``gain`` (a fraction); the smallest N if none.
    N processes that do not fit the device fail (out of memory) before this is asked."""
    ns = sorted(totals)
    chosen = ns[0]
    for previous, n in zip(ns, ns[1:], strict=False):
        if totals[n]["images_per_s"] < (1 + gain) * totals[previous]["images_per_s"]:
            break
        chosen = n
    return chosen


def run_side_by_side(n: int, args, tmp: Path) -> list[dict]:
    """Start ``n`` ``bench_train.py`` processes at once, with the memory share
    ``reproduce_cifar10.py --jobs n`` gives its rows (:func:`jobs.memory_env`); their
    results. A failure stops the others and names the failed process's last log line."""
    env = {**jobs.memory_env(n), **os.environ}
    procs = []
    for i in range(n):
        out = tmp / f"n{n}_{i}.json"
        cmd = [
            sys.executable,
            str(SCRIPTS / "bench_train.py"),
            *("--cases", args.case, "--steps", str(args.steps)),
            *("--steps_per_call", str(args.steps_per_call), "--warmup", str(args.warmup)),
            *("--batch", str(args.batch), "--json", str(out)),
            *(["--flat_update"] if args.flat_update else []),
        ]
        with out.with_suffix(".log").open("w") as log:  # the child holds its own copy
            procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=log), out))
    try:
        for proc, out in procs:
            if proc.wait() != 0:
                log = out.with_suffix(".log").read_text().strip().splitlines()
                raise SystemExit(f"bench_train.py failed with N={n}: {log[-1] if log else '?'}")
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return [json.loads(out.read_text())["results"][args.case] for _, out in procs]


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="scripts/bench_jobs.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", default="1,2,4", help="process counts to measure")
    parser.add_argument("--case", default="u3_wa", choices=("float", "u3_w", "u3_wa"))
    parser.add_argument("--steps", type=int, default=1170)
    parser.add_argument("--steps_per_call", type=int, default=390)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--gain", type=float, default=0.05, help="least gain to raise N")
    parser.add_argument("--flat_update", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    try:
        counts = sorted({int(n) for n in args.jobs.split(",") if n})
    except ValueError:
        parser.error(f"--jobs must be a comma-separated list of integers, got {args.jobs!r}")
    if not counts or counts[0] < 1:
        parser.error(f"--jobs must be integers >= 1, got {args.jobs!r}")
    start = time.perf_counter()
    totals: dict[int, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in counts:
            totals[n] = total_throughput(run_side_by_side(n, args, Path(tmp)), args.batch)
            ratio = totals[n]["images_per_s"] / totals[counts[0]]["images_per_s"]
            totals[n]["ratio_to_first"] = ratio
            peak = totals[n]["peak_bytes_max"]
            peak_text = f", peak {peak / 2**30:.2f} GiB per process" if peak else ""
            print(
                f"N={n}: {totals[n]['images_per_s']:>10.1f} images/s in all "
                f"({ratio:.2f}x N={counts[0]}){peak_text}",
                flush=True,
            )
    chosen = choose_jobs(totals, args.gain)
    print(f"choose --jobs {chosen} (the largest N gaining >= {args.gain:.0%} over the one before)")
    if args.json:
        command = shlex.join(["python", "scripts/bench_jobs.py", *(argv or sys.argv[1:])])
        record = {
            "benchmark": "total training throughput of N processes on one device",
            "case": args.case,
            "batch": args.batch,
            "totals": {str(n): t for n, t in totals.items()},
            "chosen_jobs": chosen,
            "provenance": provenance(command, wall_time_s=time.perf_counter() - start),
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
