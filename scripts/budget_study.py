"""The budget study: learned mixed precision against uniform precision at equal memory.

Runs every arm of :mod:`mpdnn.configs.budget_study` for every seed (each as its own
``python -m mpdnn.train`` process in ``<runs_dir>/seed<s>/<arm>``, log beside it), the
float net of a seed first, then writes ``results/budget_study.json`` and
``results/budget_study.md``: per arm the final model's test error (BatchNorm recalibrated)
as mean ± sd over seeds, whether every seed's final model is within every budget, its
sizes and per-layer bits, the validation-selected and the authors'-selection numbers
(labelled), the chattering diagnostics and the wall time; then each learned recipe against
each baseline: the difference, twice its standard error ``2·√(s₁²/n + s₂²/n)`` and the
verdict.

* ``--jobs N`` runs N processes at once, each pinned to its own core with one XLA thread
  (on this 2-core CPU two single-threaded runs do 1.9× the images of one two-threaded run).
* A run whose workdir holds a finished run is collected, not retrained; an interrupted one
  resumes from its checkpoints. SIGTERM / Ctrl-C make every running run checkpoint and stop.
* ``--smoke``: every arm on a few steps of 300 images (the tests).

    python scripts/budget_study.py                     # 3 seeds × 11 runs, about an hour
    python scripts/budget_study.py --seeds 0 --arms fixed_w2,mpdnn_w
    python scripts/budget_study.py --markdown          # only rewrite the tables
"""

from __future__ import annotations

import json
import math
import os
import platform
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
from mpdnn.configs import budget_study as study  # noqa: E402
from mpdnn.optim import within_limits  # noqa: E402
from mpdnn.training.rundir import RunDir  # noqa: E402

EXPERIMENT = REPO / "experiments" / "budget_study.py"

#: (recipe arm, baseline arm) pairs the study decides, per budget setting.
COMPARISONS = {
    "weight budget": ("mpdnn_w", "paper_w", ["fixed_w2", "tqt_w2", "heuristic_w"]),
    "weight + act-max budget": (
        "mpdnn_w_amax",
        "paper_w_amax",
        ["fixed_w2a4", "tqt_w2a4", "heuristic_w2a4"],
    ),
}

DATA_CAVEAT = (
    "CIFAR-10 is the lossy JPEG copy of ../shared/data (quality 75; docs/method.md §11): errors "
    "compare arms with each other, not with the paper's absolute numbers."
)


# The statuses of jobs.run_all, as this study reports them: a run without a model within
# every budget completed (being over budget is a result here, not a failure).
STATUSES = {
    "infeasible": "completed (no model within every budget)",
    jobs.FINISHED_BEFORE: "completed (finished before)",
}


def job(arm: str, seed: int, args) -> jobs.Job:
    """One ``python -m mpdnn.train`` process of the study; an arm starts from its seed's
    float net."""
    runs = args.runs_dir / f"seed{seed}"
    spec = f"{arm},seed={seed}" + (",smoke" if args.smoke else "")
    command = [
        sys.executable,
        "-m",
        "mpdnn.train",
        f"--config={EXPERIMENT}:{spec}",
        f"--workdir={runs / arm}",
        "--config.train.progress=false",
        *(f"--config.{s}" for s in args.set),
    ]
    return jobs.Job(
        name=f"seed{seed}/{arm}",
        command=command,
        workdir=runs / arm,
        log=runs / f"{arm}.log",
        after=None if arm == "float" else runs / "float",
    )


def run_all(runs: list[jobs.Job], args) -> dict[str, str]:
    """Train ``runs``, up to ``--jobs`` at once, each pinned to a core of its own with one
    XLA thread (on this 2-core CPU two single-threaded runs do 1.9x the images of one
    two-threaded run)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "")
        + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    ).strip()
    statuses = jobs.run_all(runs, slots=args.jobs, env=env, pin_cores=args.jobs > 1)
    return {name: STATUSES.get(status, status) for name, status in statuses.items()}


# ----------------------------------------------------------------------------- results


def study_budgets(arm: str) -> dict[str, float]:
    """The budgets an arm is judged against: the weight budget, and the act-max budget for
    the arms with quantized activations (baselines included: equal memory)."""
    if arm == "float":
        return {}
    out = {"weight_kb": study.WEIGHT_BUDGET_KB}
    if arm in study.AMAX_ARMS:
        out["act_max_kb"] = study.ACT_MAX_BUDGET_KB
    return out


def seed_result(arm: str, workdir: Path) -> dict[str, Any] | None:
    """What one finished run contributes: final-model error and sizes, bits, selections."""
    try:
        summary = RunDir(workdir).read_summary()
    except ValueError:
        return None
    if summary is None:
        return None
    evals = RunDir(workdir).metrics("eval")
    last = evals[-1] if evals else {}
    sizes = summary["final_sizes"]
    within_steps = [r["within_budget"] * r["steps"] for r in evals if "within_budget" in r]
    steps = [r["steps"] for r in evals if "within_budget" in r]
    changes = sum(sum(r.get("bit_changes", {}).values()) for r in evals)
    weight_bits = {
        k.removesuffix(".kernel"): v
        for k, v in last.get("bits", {}).items()
        if k.endswith(".kernel")
    }
    act_bits = {k: v for k, v in last.get("bits", {}).items() if k.endswith(".act")}
    return {
        "final_test_error": summary["final_test_error"],
        "feasible": within_limits(sizes, study_budgets(arm)),
        "weight_kb": sizes["weight_kb"],
        "act_max_kb": sizes["act_max_kb"],
        "weight_bits": weight_bits,
        "act_bits": act_bits,
        "validation_selected_test_error": summary.get("best_feasible_test_error"),
        "authors_test_error": summary.get("authors_test_error"),
        "frozen_epoch": (
            None
            if summary.get("frozen_step") is None
            else summary["frozen_step"] / summary["steps_per_epoch"]
        ),
        "within_budget_fraction": sum(within_steps) / sum(steps) if steps else None,
        "bit_changes": changes,
        "wall_time_s": summary.get("wall_time_s"),
        "provenance": summary.get("provenance"),
    }


def mean_sd(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, sd


def collect(args, seeds: list[int], arms: list[str]) -> dict[str, Any]:
    results = []
    for arm in ["float", *arms]:
        per_seed = {s: seed_result(arm, args.runs_dir / f"seed{s}" / arm) for s in seeds}
        done = {s: r for s, r in per_seed.items() if r is not None}
        if not done:
            results.append({"name": arm, "seeds": [], "errors": [], "missing": seeds})
            continue
        errors = [100 * r["final_test_error"] for r in done.values()]
        mean, sd = mean_sd(errors)
        arm_out = {
            "name": arm,
            "seeds": list(done),
            "errors": [round(e, 3) for e in errors],
            "mean": round(mean, 3),
            "sd": round(sd, 3),
            "feasible": [r["feasible"] for r in done.values()],
            "weight_kb": [round(r["weight_kb"], 4) for r in done.values()],
            "act_max_kb": [round(r["act_max_kb"], 4) for r in done.values()],
            "budgets": study_budgets(arm),
            "weight_bits": [r["weight_bits"] for r in done.values()],
            "act_bits": [r["act_bits"] for r in done.values()],
            "validation_selected_errors": [
                None
                if r["validation_selected_test_error"] is None
                else round(100 * r["validation_selected_test_error"], 3)
                for r in done.values()
            ],
            "authors_selection_errors": [
                None if r["authors_test_error"] is None else round(100 * r["authors_test_error"], 3)
                for r in done.values()
            ],
            "frozen_epoch": [r["frozen_epoch"] for r in done.values()],
            "within_budget_fraction": [r["within_budget_fraction"] for r in done.values()],
            "bit_changes": [r["bit_changes"] for r in done.values()],
            "wall_time_s": [round(r["wall_time_s"] or 0.0, 1) for r in done.values()],
        }
        if len(done) < len(seeds):
            arm_out["missing"] = [s for s in seeds if s not in done]
        results.append(arm_out)
    return {"arms": results, "comparisons": compare(results)}


def compare(arms: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each recipe against each baseline of its budget setting: Δ = baseline − recipe (a
    positive Δ: the recipe is better), 2·SE = 2·√(s₁²/n₁ + s₂²/n₂), and whether the recipe
    wins by more than that with every seed's final model within every budget."""
    by_name = {a["name"]: a for a in arms if a.get("errors")}
    out = []
    for setting, (ours, paper, baselines) in COMPARISONS.items():
        for recipe in (ours, paper):
            a = by_name.get(recipe)
            if a is None:
                continue
            for base in baselines + ([paper] if recipe == ours else []):
                b = by_name.get(base)
                if b is None:
                    continue
                delta = b["mean"] - a["mean"]
                se = math.sqrt(a["sd"] ** 2 / len(a["errors"]) + b["sd"] ** 2 / len(b["errors"]))
                out.append(
                    {
                        "setting": setting,
                        "recipe": recipe,
                        "baseline": base,
                        "delta": round(delta, 3),
                        "two_se": round(2 * se, 3),
                        "recipe_feasible": all(a["feasible"]),
                        "wins": bool(delta > 2 * se and all(a["feasible"])),
                    }
                )
    return out


def _pct(values: list[float | None]) -> str:
    shown = [f"{v:.2f}" for v in values if v is not None]
    return " / ".join(shown) if shown else "–"


def markdown(data: dict[str, Any]) -> str:
    prov = data.get("provenance", {})
    lines = [
        "# Budget study: learned mixed precision vs uniform precision at equal memory",
        "",
        f"`{prov.get('command', '')}` at commit `{str(prov.get('commit', ''))[:12]}`"
        f"{' (+ uncommitted changes)' if prov.get('uncommitted') else ''}, "
        f"{prov.get('machine', '')}, {prov.get('date_utc', '')}, "
        f"wall time {prov.get('wall_time_s', 0) / 60:.1f} min"
        + (f" ({prov['note']})" if prov.get("note") else "")
        + ".",
        "",
        f"Setting (`mpdnn/configs/budget_study.py`): {study.SETTING} {DATA_CAVEAT}",
        "",
        "Every error is the **final model's** test error (%, 10,000 test images, BatchNorm "
        "recalibrated), mean ± sd over seeds. *feasible*: the final model of every seed is "
        "within every budget of its setting. *val-selected*: the model chosen on the "
        "validation split, per seed. *authors' selection*: the lowest test error among the "
        "evaluations within every budget (docs/method.md §6), per seed: chosen on the test set, so "
        "optimistic, shown only because the paper reports it. *within budget*: the fraction "
        "of training steps within every budget; *bit flips*: bit changes summed over tensors "
        "and steps. The quantized arms start from their seed's float net and train 10 "
        "epochs more than it did: compare them with each other, not with the float row.",
        "",
        "| arm | error (mean ± sd) | per seed | feasible | weight KB | act max KB | weight "
        "bits (seed 0) | act bits (seed 0) | val-selected | authors' selection | within "
        "budget | bit flips | min / run |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for a in data["arms"]:
        if not a.get("errors"):
            lines.append(f"| {a['name']} | not run | | | | | | | | | | | |")
            continue
        wb = "/".join(f"{b:.0f}" for b in a["weight_bits"][0].values()) or "32"
        ab = "/".join(f"{b:.0f}" for b in a["act_bits"][0].values()) or "32"
        within_frac = [w for w in a["within_budget_fraction"] if w is not None]
        lines.append(
            f"| {a['name']} | {a['mean']:.2f} ± {a['sd']:.2f} | {_pct(a['errors'])} | "
            + (f"{sum(a['feasible'])}/{len(a['feasible'])}" if a["budgets"] else "no budget")
            + " | "
            f"{_pct(a['weight_kb'])} | {_pct(a['act_max_kb'])} | {wb} | {ab} | "
            f"{_pct(a['validation_selected_errors'])} | {_pct(a['authors_selection_errors'])} | "
            + (" / ".join(f"{w:.2f}" for w in within_frac) if within_frac else "–")
            + f" | {' / '.join(str(c) for c in a['bit_changes'])} | "
            f"{sum(a['wall_time_s']) / len(a['wall_time_s']) / 60:.1f} |"
        )
    lines += [
        "",
        "## The verdicts",
        "",
        "Δ = baseline − recipe, in points of test error (positive: the recipe is better); it "
        "counts as a win when Δ > 2·SE = 2·√(s₁²/n + s₂²/n) and every seed's final model of "
        "the recipe is within every budget.",
        "",
        "| setting | recipe | baseline | Δ | 2·SE | recipe feasible | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in data["comparisons"]:
        verdict = (
            "**wins**" if c["wins"] else ("not shown" if c["recipe_feasible"] else "over budget")
        )
        lines.append(
            f"| {c['setting']} | {c['recipe']} | {c['baseline']} | {c['delta']:+.2f} | "
            f"{c['two_se']:.2f} | {'yes' if c['recipe_feasible'] else 'no'} | {verdict} |"
        )
    if data.get("findings"):
        lines += ["", "## What it shows", "", data["findings"]]
    return "\n".join(lines) + "\n"


def provenance_of(args, wall: float | None, statuses: dict[str, str]) -> dict[str, Any]:
    from mpdnn.provenance import provenance

    base = provenance(shlex.join(["python", "scripts/budget_study.py", *sys.argv[1:]]))
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "command": base["command"],
        "commit": base["git_commit"],
        "uncommitted": base["uncommitted"],
        "machine": f"{os.cpu_count()}-core CPU ({cpu}), {platform.system()}",
        "date_utc": base["date_utc"],
        "wall_time_s": None if wall is None else round(wall, 1),
        "jobs": args.jobs,
        "statuses": statuses,
    }


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="budget_study.py", description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(study.SEEDS))
    parser.add_argument("--arms", default="", help="comma-separated arms (default: all)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (default 2)")
    parser.add_argument("--runs_dir", type=Path, default=REPO / "runs" / "budget_study")
    parser.add_argument("--results", type=Path, default=REPO / "results" / "budget_study")
    parser.add_argument("--smoke", action="store_true", help="a few steps per run (tests)")
    parser.add_argument("--markdown", action="store_true", help="only rewrite the tables")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for every run, e.g. --set train.epochs=2",
    )
    args = parser.parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()] or list(study.ARMS)
    unknown = [a for a in arms if a not in study.ARMS]
    if unknown:
        parser.error(f"unknown arms {', '.join(unknown)}; known: {', '.join(study.ARMS)}")
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    json_path = args.results.with_suffix(".json")
    if args.markdown:
        data = json.loads(json_path.read_text())
        args.results.with_suffix(".md").write_text(markdown(data))
        return 0
    start = time.perf_counter()
    runs = [job("float", s, args) for s in args.seeds]
    runs += [job(arm, s, args) for s in args.seeds for arm in arms]
    statuses = run_all(runs, args)
    wall = time.perf_counter() - start
    data = {**collect(args, args.seeds, arms)}
    prov = provenance_of(args, wall, statuses)
    if json_path.is_file():  # keep what was written by hand about the last full run
        old = json.loads(json_path.read_text())
        if old.get("findings"):
            data["findings"] = old["findings"]
        if all(s == "completed (finished before)" for s in statuses.values()):
            # Nothing trained: the numbers are the earlier runs', and so is their provenance.
            prov = {**old["provenance"], "collected_again": prov}
    out = {
        "command": prov["command"],
        "commit": prov["commit"],
        "machine": prov["machine"],
        "date": prov["date_utc"],
        "provenance": prov,
        **data,
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(out, indent=1) + "\n")
    args.results.with_suffix(".md").write_text(markdown(out))
    print(f"wrote {json_path} and {args.results.with_suffix('.md')} ({wall / 60:.1f} min)")
    failed = [n for n, s in statuses.items() if not s.startswith("completed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
