"""Reproduce the paper's CIFAR-10 tables (docs/method.md §9, Tables 1 and 3) with one command.

Runs the rows of :mod:`mpdnn.configs.cifar10` (``experiments/cifar10.py:row=<row>``) on the
local accelerator, each as its own ``python -m mpdnn.train`` process in ``<runs_dir>/<row>``
(log beside it, ``<row>.log``; :mod:`jobs` schedules them), then writes per row
``results/cifar10/<row>.json`` (``results/cifar10/reduced/<row>.json`` with ``--reduced``):
final, best and delivered error, weight/activation sizes with each budget's verdict,
per-layer bits, wall time, training throughput and provenance. ``results/cifar10.md`` is
rewritten from every row JSON present: the paper and ours side by side, each row labelled
full, reduced or not run.

* The float row trains first whenever a selected row starts from the float net and
  ``<runs_dir>/float`` holds no finished run.
* A row whose workdir holds a finished run is collected, not retrained (``--force``
  retrains it); an interrupted one resumes from its checkpoints.
* ``--jobs N`` runs up to N rows at once (rows that need the float net wait for it). On one
  GPU each process then gets ``0.9/N`` of its memory. Several ResNet-20 runs at once raise
  the total throughput only where one run leaves the device idle (host work between
  epochs, compilation, launch gaps; without MPS the processes' kernels take turns). The
  rule for N: run ``scripts/bench_jobs.py --jobs 1,2,4`` on the machine and take the N it
  chooses (the largest up to which each step up gained >= 5 % in total images/s), with N
  times its printed peak memory per process within 0.9 of the card.
* ``--deadline_s S`` starts no row after S seconds (for a lease with a time limit): rows
  not run are reported as such.
* A row that diverges (non-finite loss) or ends with no evaluation within its budgets is
  recorded with that status; the script goes on with the next row and exits 1 at the end
  if any row failed.

Commands::

    python scripts/reproduce_cifar10.py --table 3 --family uniform      # 8 rows, float first
    python scripts/reproduce_cifar10.py --rows t1_u3_w_float,t1_u3_wa_float
    python scripts/reproduce_cifar10.py --all --reduced --jobs 2         # every row, CPU
    python scripts/reproduce_cifar10.py --markdown                       # only rewrite the md
    python scripts/reproduce_cifar10.py --list      # every row: paper, command, our results

The data: the shared JPEG copy (found beside the repository, or ``--data_dir``/
``$MPDNN_CIFAR10``) or a prepared tfds data_dir.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "scripts"):  # run as a file from anywhere: this checkout's code
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import jobs  # noqa: E402

from mpdnn.cli import OneLineParser  # noqa: E402
from mpdnn.configs.cifar10 import (  # noqa: E402
    PARAMETRIZATIONS,
    ROWS,
    TABLE3,
    Row,
    listing,
    load_results,
)
from mpdnn.training.rundir import RunDir  # noqa: E402

EXPERIMENT = "experiments/cifar10.py"  # relative to REPO, where every run starts

# What docs/method.md §11 asks every table built on the shared copy to say.
DATA_CAVEAT = (
    "Ours are trained and tested on the lossy JPEG copy of CIFAR-10 in ../shared/data "
    "(quality 75; docs/method.md §11), the paper's on the original images: absolute errors are not "
    "comparable, orderings between rows are."
)


def priority(row: Row) -> tuple[int, int]:
    """The order rows run in when a table is asked for: the float net, then Table 3's uniform
    column, Table 1's uniform rows, Table 3's pow2 column, Table 1's pow2 rows."""
    order = list(ROWS)
    if row.name == "float":
        return (0, 0)
    pow2 = row.family == "pow2"
    group = {(3, False): 1, (1, False): 2, (3, True): 3, (1, True): 4}[(row.table, pow2)]
    return (group, order.index(row.name))


def select(args) -> list[Row]:
    if args.rows:
        names = [n.strip() for n in args.rows.split(",") if n.strip()]
        unknown = [n for n in names if n not in ROWS]
        if unknown:
            print(
                f"reproduce_cifar10.py: error: unknown rows {', '.join(unknown)}; see --list",
                file=sys.stderr,
            )
            raise SystemExit(2)
        return [ROWS[n] for n in dict.fromkeys(names)]
    rows = list(ROWS.values())
    if args.table != "all":
        rows = [r for r in rows if r.table == int(args.table) or r.name == "float"]
    if args.family:
        rows = [r for r in rows if r.family in (None, args.family)]
    return sorted(rows, key=priority)


# ----------------------------------------------------------------------------- running


def job(row: Row, args, runs_dir: Path) -> jobs.Job:
    """One row's ``python -m mpdnn.train`` process (after the float row if it starts from it)."""
    arg = f"row={row.name}" + ("" if args.protocol == "full" else f",protocol={args.protocol}")
    cmd = [
        sys.executable,
        "-m",
        "mpdnn.train",
        "--config",
        f"{EXPERIMENT}:{arg}",
        "--workdir",
        str(runs_dir / row.name),
        "--config.train.progress=false",
        *(f"--config.{s}" for s in args.set),
    ]
    if args.data_dir:
        cmd.append(f"--config.data.dir={args.data_dir}")
    return jobs.Job(
        name=row.name,
        command=cmd,
        workdir=runs_dir / row.name,
        log=runs_dir / f"{row.name}.log",
        after=runs_dir / "float" if row.float_init else None,
    )


def run_rows(rows: list[Row], args, runs_dir: Path, results_dir: Path) -> dict[str, str]:
    """Train ``rows`` (up to ``--jobs`` at once, float-net rows after the float one) and
    collect each as it ends; returns ``{row: status}``."""
    env = {"PYTHONUNBUFFERED": "1", **jobs.memory_env(args.jobs), **os.environ}

    def on_end(j: jobs.Job, status: str) -> None:
        if status == jobs.FINISHED_BEFORE:  # collected again, not retrained
            collect(ROWS[j.name], j.workdir, results_dir, args, "completed", None, None)
        else:
            collect(ROWS[j.name], j.workdir, results_dir, args, status, j.wall, j.command)

    statuses = jobs.run_all(
        [job(row, args, runs_dir) for row in rows],
        slots=args.jobs,
        env=env,
        rerun_finished=args.force,
        deadline_s=args.deadline_s,
        on_end=on_end,
    )
    return {n: "completed" if s == jobs.FINISHED_BEFORE else s for n, s in statuses.items()}


# ----------------------------------------------------------------------------- results


def throughput(workdir: Path, batch: int) -> dict[str, float] | None:
    """Training images/s from ``metrics.jsonl``: summed over consecutive per-call train
    records, evaluation and checkpoint time between calls included (they are part of a
    run's cost), but without the intervals that hold a compilation or a restart (a resumed
    run): those over 10x the median interval."""
    train = RunDir(workdir).metrics("train")
    pairs = [
        (b["step"] - a["step"], b["time"] - a["time"])
        for a, b in zip(train, train[1:], strict=False)
        if b["step"] > a["step"]
    ]
    if not pairs:
        return None
    typical = sorted(dt for _, dt in pairs)[len(pairs) // 2]
    kept = [(ds, dt) for ds, dt in pairs if dt <= 10 * typical]
    steps, seconds = sum(p[0] for p in kept), sum(p[1] for p in kept)
    if seconds <= 0:
        return None
    return {"images_per_s": round(steps * batch / seconds, 1), "seconds": round(seconds, 2)}


def last_eval(workdir: Path) -> dict[str, Any] | None:
    """The last evaluation a (possibly unfinished) run logged."""
    evals = RunDir(workdir).metrics("eval")
    if not evals:
        return None
    e = evals[-1]
    keep = ("step", "epoch", "test_error", "weight_kb", "act_max_kb", "act_sum_kb", "feasible")
    return {k: e.get(k) for k in keep}


def collect(row: Row, workdir: Path, results_dir: Path, args, status, wall, command) -> None:
    """Write ``results/cifar10[/reduced]/<row>.json`` from a run's outputs."""
    run = RunDir(workdir)
    summary = run.read_summary() or {}
    config = run.read_config().to_dict() if run.config_file.is_file() else {}
    layers = (run.read_report() or {}).get("layers", [])
    batch = config.get("train", {}).get("batch_size", 128)
    record: dict[str, Any] = {
        "row": row.name,
        "table": row.table,
        "title": row.title,
        "protocol": args.protocol,
        "paper_error_percent": row.paper_error,
        "paper": row.paper_text,
        "status": status,
        "epochs": config.get("train", {}).get("epochs"),
        "train_images": None,
        **{
            k: summary.get(k)
            for k in (
                "final_test_error",
                "best_test_error",
                "best_feasible_test_error",
                "delivered",
                "delivered_test_error",
                "feasible",
                "budgets",
                "delivered_sizes",
                "final_sizes",
                "verdicts",
                "step",
                "steps_per_epoch",
            )
        },
        "bits": {
            f"{layer['path']}.{layer['tensor']}": layer["bits"]
            for layer in layers
            if layer.get("quantizer") != "float"
        },
        "throughput": throughput(workdir, batch),
        "last_eval": last_eval(workdir),
        "wall_time_s": round(wall, 1) if wall is not None else summary.get("wall_time_s"),
        "workdir": str(workdir),
        "provenance": summary.get("provenance"),
        "reproduce_command": shlex.join(["python", "scripts/reproduce_cifar10.py", *sys.argv[1:]]),
        "train_command": shlex.join(command[1:]) if command else None,
    }
    if summary.get("steps_per_epoch"):
        record["train_images"] = summary["steps_per_epoch"] * batch
    folder = results_dir / "cifar10"
    out = (folder if args.protocol == "full" else folder / args.protocol) / f"{row.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1, allow_nan=False) + "\n")


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def cell(record: dict | None) -> str:
    """One run as ``final / best`` error in %, or its status."""
    if record is None:
        return "not run"
    last = record.get("last_eval")
    if record["status"] == "stopped" and last:
        return (
            f"partial: {_pct(last['test_error'])} at epoch {last['epoch']:.0f} of "
            f"{record.get('epochs')}"
        )
    if record["status"] not in ("completed", "infeasible"):
        return record["status"]
    text = f"{_pct(record['final_test_error'])} / {_pct(record['best_test_error'])}"
    if record.get("budgets"):
        delivered = record.get("delivered_test_error")
        text += f" (delivered {_pct(delivered)})" if delivered is not None else " (NO feasible)"
    return text


def sizes_text(record: dict | None) -> str:
    if record is None or not record.get("delivered_sizes"):
        return "–"
    s = record["delivered_sizes"]
    marks = []
    verdicts = record.get("verdicts") or {}
    delivered = any(v["delivered_met"] for v in verdicts.values())
    for name, verdict in verdicts.items():
        met = verdict["delivered_met"] if delivered else verdict["final_met"]
        marks.append(f"{name} {'met' if met else 'over'}")
    if verdicts and not delivered:  # no evaluation met them all: the final model's sizes
        marks.insert(0, "final model")
    text = f"{s['weight_kb']:.1f} / {s['act_max_kb']:.1f} / {s['act_sum_kb']:.1f}"
    return text + (f" ({', '.join(marks)})" if marks else "")


def write_markdown(results_dir: Path) -> Path:
    results = load_results(results_dir)
    full, reduced = results["full"], results["reduced"]
    lines = [
        "# CIFAR-10 ResNet-20: the paper's Tables 1 and 3, reproduced",
        "",
        "Generated by `python scripts/reproduce_cifar10.py` from `results/cifar10/*.json` "
        "(full protocol, docs/method.md §8: 160 epochs) and `results/cifar10/reduced/*.json` (the "
        "reduced protocol of `mpdnn.configs.cifar10`, for orderings only). Each JSON holds "
        "the command, commit, machine, date and wall time of its run.",
        "",
        f"**Data caveat.** {DATA_CAVEAT}",
        "",
    ]
    notes = results_dir / "cifar10" / "NOTES.md"  # hand-written findings, kept on rewrite
    if notes.is_file():
        lines += [notes.read_text().strip(), ""]
    lines += [
        "Errors in %, as `final epoch / best epoch` (the authors select the best epoch on the "
        "test set, docs/method.md §8; the final epoch is the honest number). Budget rows add the "
        "*delivered* model's error: the best evaluation that met every budget. "
        "Sizes are the delivered model's `weight / act-max / act-sum` KB.",
        "",
        "## Table 1 (no budget, initial 4 bits): random init / float-net init",
        "",
        "| quantized | parametrization | paper (random / float) | ours full, random "
        "| ours full, float-net | ours reduced, random | ours reduced, float-net |",
        "|---|---|---|---|---|---|---|",
    ]
    r = ROWS["float"]
    lines.append(
        f"| none | float32 | 8.50 / 7.29 | – | {cell(full.get('float'))} | – "
        f"| {cell(reduced.get('float'))} |"
    )
    for kinds, what in (("w", "weights"), ("wa", "weights+acts")):
        for short, (_, _, column) in PARAMETRIZATIONS.items():
            rand, flt = ROWS[f"t1_{short}_{kinds}_random"], ROWS[f"t1_{short}_{kinds}_float"]
            lines.append(
                f"| {what} | {column} | {rand.paper_text.replace(' %', '')} / "
                f"{flt.paper_text.replace(' %', '')} "
                f"| {cell(full.get(rand.name))} | {cell(full.get(flt.name))} "
                f"| {cell(reduced.get(rand.name))} | {cell(reduced.get(flt.name))} |"
            )
    lines += [
        "",
        "## Table 3 (float-net init): fixed and TQT against learned mixed precision",
        "",
        "| method | bits W/A | paper sizes | family | paper | ours full | sizes full "
        "| ours reduced | sizes reduced |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for family in ("uniform", "pow2"):
        lines.append(
            f"| float | 32/32 | 1048 KB / 64 / 736 | {family} | 7.29 | {cell(full.get('float'))} "
            f"| {sizes_text(full.get('float'))} | {cell(reduced.get('float'))} "
            f"| {sizes_text(reduced.get('float'))} |"
        )
        for method, (label, bits, sizes, *_) in TABLE3.items():
            twin = ROWS.get(f"t3_{method}_{family}_mpdnn")
            for r, what in ((ROWS[f"t3_{method}_{family}"], label), (twin, f"{label}, mpdnn")):
                if r is None:
                    continue
                lines.append(
                    f"| {what} | {bits} | {sizes} | {family} "
                    f"| {r.paper_text.replace(' %', '')} "
                    f"| {cell(full.get(r.name))} | {sizes_text(full.get(r.name))} "
                    f"| {cell(reduced.get(r.name))} | {sizes_text(reduced.get(r.name))} |"
                )
    lines += [
        "",
        "## Runs",
        "",
        "| row | protocol | status | epochs | wall | machine | commit | date |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for protocol, records in (("full", full), ("reduced", reduced)):
        for name in ROWS:
            rec = records.get(name)
            if rec is None:
                continue
            prov = rec.get("provenance") or {}
            wall = rec.get("wall_time_s")
            lines.append(
                f"| {name} | {protocol} | {rec['status']} | {rec.get('epochs')} "
                f"| {'–' if wall is None else f'{wall:.0f} s'} | {prov.get('device_kind', '–')} "
                f"| {str(rec.get('code_commit') or prov.get('git_commit', '–'))[:7]} "
                f"| {prov.get('date_utc', '–')} |"
            )
    out = results_dir / "cifar10.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    return out


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(
        prog="scripts/reproduce_cifar10.py", description=__doc__.split("\n\n")[0]
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--table", choices=("1", "3", "all"), default=None)
    which.add_argument("--rows", help="comma-separated row names (see --list)")
    which.add_argument("--all", action="store_true", help="every row (same as --table all)")
    parser.add_argument("--family", choices=("uniform", "pow2"), help="only this family's rows")
    parser.add_argument("--reduced", action="store_true", help="the reduced (CPU) protocol")
    parser.add_argument("--smoke", action="store_true", help="2 steps per row (a check)")
    parser.add_argument("--jobs", type=int, default=1, help="rows run at once (default 1)")
    parser.add_argument("--runs_dir", type=Path, help="default runs/cifar10[_reduced]")
    parser.add_argument("--results_dir", type=Path, default=REPO / "results")
    parser.add_argument("--data_dir", help="CIFAR-10 source (default: found automatically)")
    parser.add_argument("--deadline_s", type=float, default=0, help="start no row after this")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for every row, e.g. train.scan=true",
    )
    parser.add_argument("--force", action="store_true", help="retrain finished rows")
    parser.add_argument("--list", action="store_true", help="print the rows and exit")
    parser.add_argument("--markdown", action="store_true", help="only rewrite results/cifar10.md")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    if args.list:
        print(listing(args.results_dir))
        return 0
    if args.markdown:
        print(write_markdown(args.results_dir))
        return 0
    if args.all:
        args.table = "all"
    if args.reduced and args.smoke:
        parser.error("--reduced and --smoke exclude each other")
    args.protocol = "reduced" if args.reduced else "smoke" if args.smoke else "full"
    if not (args.rows or args.table):
        parser.error("say which rows: --table 1|3|all, --all or --rows a,b (see --list)")
    suffix = "" if args.protocol == "full" else f"_{args.protocol}"
    runs_dir = args.runs_dir or REPO / "runs" / f"cifar10{suffix}"
    rows = select(args)
    if (
        any(r.float_init for r in rows)
        and ROWS["float"] not in rows
        and not jobs.finished(runs_dir / "float")
    ):
        rows.insert(0, ROWS["float"])
    start = time.perf_counter()
    print(
        f"{len(rows)} rows ({args.protocol} protocol) in {runs_dir}, "
        f"{args.jobs} at a time: {', '.join(r.name for r in rows)}",
        flush=True,
    )
    statuses = run_rows(rows, args, runs_dir, args.results_dir)
    md = write_markdown(args.results_dir)
    width = max(len(n) for n in statuses)
    for name, status in statuses.items():
        print(f"{name:<{width}}  {status}")
    print(f"{md} rewritten; {time.perf_counter() - start:.0f}s in all")
    return 0 if all(s == "completed" for s in statuses.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
