"""``python -m mpdnn.train``: train an experiment config (docs/method.md §6–8).

    python -m mpdnn.train [--config experiments/<name>.py[:arg]] [--workdir DIR]
                          [--config.key=value ...]
                          [--distributed [--coordinator_address HOST:PORT
                                          --num_processes N --process_id I]]

With no flags it runs the default experiment (:mod:`mpdnn.configs.digits`: float vs fixed
2-bit vs learned mixed precision under one weight budget on scikit-learn's digits, about a
minute on a laptop CPU) and prints one table. ``--workdir`` defaults to ``runs/<name>``; a
workdir that holds checkpoints is resumed from its latest readable one. A config with
``variants`` trains each in ``<workdir>/<variant>`` and prints them side by side.

Several hosts: start the same command once per host (one process per host, which drives
all of that host's devices) with ``--distributed``; it calls ``jax.distributed.initialize``
before anything else. The mesh then spans every device of every host, ``train.batch_size``
is the global batch (a multiple of the total device count), every host holds the whole
dataset (streamed ImageNet: each decodes its share of every batch), and only process 0
writes logs, reports and tables. ``--workdir`` must be one directory that every host sees
(a shared file system): all processes write the checkpoints together. A SIGTERM to any
process checkpoints and stops them all after the same step. On SLURM, Open MPI
(``mpirun``), Kubernetes (JobSet/Indexed Job) or Cloud TPU, ``--distributed`` alone finds
the coordinator, process count and index in the job's environment. Anywhere else give
them, the same address on every host::

    # on host 0 (it runs the coordinator service on the given port), then on host 1:
    python -m mpdnn.train --distributed --coordinator_address=10.0.0.1:1234 \\
        --num_processes=2 --process_id=0 --workdir /shared/runs/digits
    python -m mpdnn.train --distributed --coordinator_address=10.0.0.1:1234 \\
        --num_processes=2 --process_id=1 --workdir /shared/runs/digits

The coordinator address may instead come from ``$JAX_COORDINATOR_ADDRESS`` (and a host's
devices from ``$JAX_LOCAL_DEVICE_IDS``); the port must be reachable from every host. The
processes wait up to 5 minutes for each other to start. On CPU hosts the cross-process
collectives are JAX's default ``gloo`` (``jax_cpu_collectives_implementation``);
``tests/training/test_multihost.py`` runs two processes on one machine this way.

Exit status: 0 done; 1 training failed (e.g. a non-finite loss: the last good checkpoint is
kept); 2 bad input (one line on stderr); 3 a run with budgets ended with no evaluation that
met them all (no deliverable model); 143 stopped by SIGTERM, 130 by Ctrl-C (SIGINT), after
checkpointing: rerun the same command to resume.
"""

from __future__ import annotations

import dataclasses
import re
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from absl import app, flags

from mpdnn.cli import define_config_flag, terminal_logging

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "digits.py"

PROG = "mpdnn.train"


@dataclasses.dataclass(frozen=True)
class Flags:
    """The parsed command line: the loaded config and the other flags' values."""

    config: Any  # an ml_collections.ConfigDict
    workdir: str | None
    distributed: bool
    coordinator_address: str | None
    num_processes: int | None
    process_id: int | None
    argv: tuple[str, ...]  # as given, without the program name


def parse_flags(argv: Sequence[str]) -> Flags:
    """``argv`` (without the program name) parsed by absl's flags into a fresh
    ``FlagValues``, so that repeated calls in one process (the tests) do not collide. Bad
    input (an unknown flag, a bad ``--config.key=value``, a config that fails to load) is
    one line on stderr and exit status 2."""
    full = [PROG, *argv]
    values = flags.FlagValues()
    try:
        config = define_config_flag(
            values,
            full,
            default=str(DEFAULT_CONFIG),
            help_string="experiment config file, optionally with ':arg' (default: the digits "
            "experiment)",
        )
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        _usage_error(f"bad --config override: no key {_key(err)}")
    workdir = flags.DEFINE_string(
        "workdir", None, "output directory (default runs/<config name>)", flag_values=values
    )
    distributed = flags.DEFINE_bool(
        "distributed",
        False,
        "call jax.distributed.initialize() first, one process per host; it finds the "
        "coordinator from the cluster environment (Cloud TPU, SLURM, Open MPI, Kubernetes) "
        "unless --coordinator_address, --num_processes and --process_id give them",
        flag_values=values,
    )
    coordinator = flags.DEFINE_string(
        "coordinator_address",
        None,
        "with --distributed: HOST:PORT of process 0, where it runs the coordinator service "
        "(the same on every host; default $JAX_COORDINATOR_ADDRESS or the cluster's)",
        flag_values=values,
    )
    num_processes = flags.DEFINE_integer(
        "num_processes",
        None,
        "with --distributed: how many processes (hosts) take part",
        lower_bound=1,
        flag_values=values,
    )
    process_id = flags.DEFINE_integer(
        "process_id",
        None,
        "with --distributed: this process's index, 0 to num_processes-1; 0 runs the "
        "coordinator and writes the outputs",
        lower_bound=0,
        flag_values=values,
    )
    helps = ("-h", "--help", "-help", "--helpshort", "--helpfull")
    if any(a in helps for a in argv):
        _print_help(values, config, [PROG, *(a for a in argv if a not in helps)])
    try:
        rest = values(full)
    except flags.Error as err:
        _usage_error(_one_line(err))
    except Exception as err:  # the config file's own code failed (syntax, get_config, ...)
        _usage_error(f"cannot load the config: {_describe(err)}")
    if len(rest) > 1:
        _usage_error(f"unexpected arguments {' '.join(rest[1:])!r}")
    try:
        loaded = config.value
        loaded.to_dict()  # ml_collections loads lazily: fail here, not mid-run
    except Exception as err:  # a missing file, no get_config, an error inside it
        _usage_error(f"cannot load the config: {_describe(err)}")
    return Flags(
        config=loaded,
        workdir=workdir.value,
        distributed=distributed.value,
        coordinator_address=coordinator.value,
        num_processes=num_processes.value,
        process_id=process_id.value,
        argv=tuple(argv),
    )


def _print_help(values, config, argv: list[str]) -> NoReturn:
    """The usage, the flags, and every config key with its value and meaning (of the config
    ``--config`` names, else the default experiment's); exit 0."""
    from mpdnn.training import config as cfg

    print(__doc__)
    print(values.get_help())
    try:
        values(argv)
        shown, loaded = config.value, True
    except Exception:  # a config that does not load: show the schema's own defaults
        shown, loaded = cfg.base_config(), False
    what = "the schema's defaults" if not loaded else f"{shown.name}'s values"
    print(f"\nConfig keys (--config.<key>=value), with {what}:")
    print(cfg.describe(shown))
    sys.exit(0)


def _describe(err: BaseException) -> str:
    """One line for an error raised while loading a config file: a syntax error with its
    file and line, anything else as ``Type: message`` (ml_collections' wrapping removed)."""
    if isinstance(err, SyntaxError):
        where = f" ({Path(err.filename).name}, line {err.lineno})" if err.filename else ""
        return f"SyntaxError: {err.msg}{where}"
    text = _one_line(err)
    if isinstance(err, AttributeError) and "get_config" in text:
        return "the config file defines no get_config(arg=None)"
    if isinstance(err, (OSError, ValueError, KeyError)) or text.startswith(type(err).__name__):
        return text
    return f"{type(err).__name__}: {text}"


def _check_workdir(path: Path) -> None:
    """A workdir that cannot be made or written (a file, under a file, read-only) is bad
    input: one line now, not a traceback at the first checkpoint."""
    import tempfile

    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as err:
        _usage_error(f"--workdir {path}: cannot write there: {err.strerror or err}")


def _key(err: BaseException) -> str:
    """The key a bad override names, from ml_collections' error (KeyError's str() is a
    repr, with quotes and escaped newlines)."""
    text = str(err.args[0]) if err.args else str(err)
    for junk in ("\\n", "\\", "'", '"'):
        text = text.replace(junk, " ")
    return " ".join(text.split())


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def format_table(results: dict) -> str:
    """One row per run: the delivered model's accuracy, weight and activation KB against the
    budgets, verdict and per-layer weight bits, and the final epoch's accuracy beside it."""
    width = max([10, *(len(name or r.name) for name, r in results.items())])
    header = (
        f"{'run':<{width}} {'test acc':>8} {'weight KB':>10} {'budget':>8} {'act max KB':>10}  "
        f"{'verdict':<18} {'final acc':>9}  weight bits per layer"
    )
    lines = [header, "-" * len(header)]
    over = []  # runs whose final model is over a budget (delivered or not)
    for name, r in results.items():
        budget = r.budgets.get("weight_kb")
        acc = None if r.delivered_test_error is None else 1 - r.delivered_test_error
        final = None if r.final_test_error is None else 1 - r.final_test_error
        if r.feasible is None:
            verdict = "no budget"
        elif r.feasible and r.delivered == "final":  # θ frozen within budget
            verdict = f"meets (froze {r.frozen_step / r.steps_per_epoch:.1f})"
        elif r.feasible:
            verdict = f"meets (ep {r.best_feasible_step / r.steps_per_epoch:.0f})"
        else:
            verdict = "OVER BUDGET"
        final_over = [k for k, v in r.verdicts.items() if not v.get("final_met", True)]
        if final_over:
            over.append(f"{name or r.name} ({', '.join(final_over)})")
        bits = "/".join(
            f"{row['bits']:.0f}"
            for row in r.layers
            if row["kind"] == "weight" and row["tensor"] == "kernel"
        )
        lines.append(
            f"{name or r.name:<{width}} {_fmt(acc, '.4f'):>8} "
            f"{r.delivered_sizes['weight_kb']:>10.3f} {_fmt(budget, '.2f'):>8} "
            f"{r.delivered_sizes['act_max_kb']:>10.2f}  {verdict:<18} {_fmt(final, '.4f'):>9}"
            f"{'*' if final_over else ' '} {bits}"
        )
    lines.append(
        "test acc, sizes, bits: the delivered model (with budgets: the final model when its "
        "quantizers froze within them at epoch 'froze', else the best evaluation that met "
        "them all, at epoch 'ep'); final acc: the last epoch"
    )
    if over:
        lines.append(f"*: the final model is OVER BUDGET: {'; '.join(over)}")
    return "\n".join(lines)


def _one_line(err: BaseException) -> str:
    """The last non-empty line of an error's text: absl and ml_collections wrap config
    loading errors in tracebacks; the line that matters comes last, without the wrapped
    exception's qualified name (``mpdnn.training.config.ConfigError: ...``)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    return re.sub(r"^[\w.]+(?:Error|Exception): ", "", lines[-1])


def _usage_error(message: str) -> NoReturn:
    print(f"mpdnn.train: error: {message} (see --help)", file=sys.stderr)
    sys.exit(2)


def overridden_keys(argv: Sequence[str]) -> list[str]:
    """The dotted config keys ``argv`` sets with ``--config.<key>=value`` (or ``<key> value``)."""
    keys = []
    for arg in argv:
        for prefix in ("--config.", "-config."):
            if arg.startswith(prefix):
                keys.append(arg[len(prefix) :].split("=", 1)[0])
    return keys


def command(argv: Sequence[str]) -> str:
    """This invocation as a user would type it (``argv`` without the program name)."""
    import shlex

    return shlex.join(["python", "-m", "mpdnn.train", *argv])


def write_table(workdir: Path, config, results: dict, table: str, command_line: str) -> None:
    """``table.md`` (the printed table with its command and provenance) and ``table.json``
    (every run's summary) in ``workdir``: what a ``results/`` entry is made from."""
    import time

    import jax

    from mpdnn.provenance import provenance
    from mpdnn.training.rundir import RunDir

    if jax.process_index() != 0:
        return
    wall = sum(r.wall_time_s for r in results.values())
    prov = provenance(command_line, wall_time_s=wall, seed=config.seed)
    runs = {}
    for name, r in results.items():
        record = dataclasses.asdict(r)
        record["weight_bits"] = {
            f"{row['path']}.{row['tensor']}": row["bits"]
            for row in record.pop("layers")
            if row["kind"] == "weight"
        }
        runs[name or config.name] = record
    record = {"experiment": config.name, "provenance": prov, "runs": runs}
    date = time.strftime("%Y-%m-%d", time.gmtime())
    RunDir(workdir).write_table(
        record,
        f"# {config.name}\n\n```\n{table}\n```\n\n"
        f"- command: `{command_line}`\n- commit: `{prov['git_commit']}`"
        f"{' (with uncommitted changes)' if prov['uncommitted'] else ''}\n"
        f"- machine: {prov['machine']}, {prov['cpus']} CPUs; devices: {prov['device_kind']}\n"
        f"- date: {date}; wall time {wall:.0f} s (all runs); seed {config.seed}\n",
    )


_STOP_SIGNALS: list[int] = []  # the signals that asked this process to stop


def _on_stop_signal(signum, frame) -> None:
    """SIGTERM and Ctrl-C alike: checkpoint after the current call and stop. A second
    Ctrl-C aborts at once (the last checkpoint stays)."""
    from mpdnn.training.trainer import STOP_REQUESTED

    if signum == signal.SIGINT and signal.SIGINT in _STOP_SIGNALS:
        raise KeyboardInterrupt
    _STOP_SIGNALS.append(signum)
    STOP_REQUESTED.set()
    if signum == signal.SIGINT:
        print(
            "\nmpdnn.train: stopping after the current step with a checkpoint "
            "(Ctrl-C again aborts)",
            file=sys.stderr,
            flush=True,
        )


def _initialize_distributed(args: Flags) -> None:
    """``jax.distributed.initialize`` with the flags' values (``None``: the cluster's)."""
    names = ("coordinator_address", "num_processes", "process_id")
    given = {name: getattr(args, name) for name in names}
    if not args.distributed:
        stray = [f"--{name}" for name in names if given[name] is not None]
        if stray:
            _usage_error(f"{', '.join(stray)}: only with --distributed")
        return
    import jax

    try:
        jax.distributed.initialize(**given)
    except (TypeError, ValueError) as err:
        _usage_error(
            f"--distributed: {_one_line(err)} (outside SLURM, Open MPI, Kubernetes and Cloud "
            "TPU give --coordinator_address, --num_processes and --process_id)"
        )


def main(argv: Sequence[str] | None = None) -> None:
    """Train the config ``argv`` names (default: ``sys.argv[1:]``); exits with the status
    the module docstring lists when it is not 0."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # absl would print every INFO line of JAX's (e.g. "Unable to initialize backend 'tpu'"),
    # and orbax's failures with a traceback from each of its threads.
    terminal_logging()
    from mpdnn.data import DataError
    from mpdnn.training import config as cfg
    from mpdnn.training.checkpoint import CheckpointError
    from mpdnn.training.trainer import STOP_REQUESTED, TrainingError, train_and_evaluate

    args = parse_flags(argv)
    config = args.config
    _initialize_distributed(args)
    workdir = Path(args.workdir or Path("runs") / config.name)
    command_line = command(argv)
    _STOP_SIGNALS.clear()
    previous = {s: signal.signal(s, _on_stop_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    results = {}
    try:
        runs = cfg.variants(config, pinned=overridden_keys(argv))
        for run in runs.values():
            cfg.check(run)
        _check_workdir(workdir)
        for name, run in runs.items():
            run_dir = workdir / name if name else workdir
            print(f"== {run.name}: {run_dir}", file=sys.stderr, flush=True)
            results[name] = result = train_and_evaluate(run, run_dir, command=command_line)
            if result.status == "stopped":
                print(f"stopped at step {result.step}; rerun the same command to resume")
                sys.exit(130 if signal.SIGINT in _STOP_SIGNALS else 143)
        table = format_table(results)
        print()
        print(table)
        write_table(workdir, config, results, table, command_line)
    except (cfg.ConfigError, DataError) as err:
        print(f"mpdnn.train: error: {err}", file=sys.stderr)
        sys.exit(2)
    except (TrainingError, CheckpointError) as err:
        print(f"mpdnn.train: training failed: {err}", file=sys.stderr)
        sys.exit(1)
    except OSError as err:  # writing the run's files (e.g. a full disk)
        print(f"mpdnn.train: training failed: {err}", file=sys.stderr)
        sys.exit(1)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if _STOP_SIGNALS:  # the stop this call's signals asked for is done
            STOP_REQUESTED.clear()
    print(f"results in {workdir} (table.md, table.json; summary.json, report.json per run)")
    infeasible = [n or config.name for n, r in results.items() if r.feasible is False]
    if infeasible:
        print(
            f"mpdnn.train: NO model of {', '.join(infeasible)} met every budget (no "
            "evaluation, or no step after budget.freeze_epoch, was within them all); no "
            "deliverable model",
            file=sys.stderr,
        )
        sys.exit(3)


def _absl_parser(argv: list[str]) -> list[str]:
    # main parses its own flags; absl's global ones stay at their defaults (marked parsed,
    # so that absl does not warn about logging before flag parsing).
    flags.FLAGS.mark_as_parsed()
    return argv


def run() -> None:
    """The console entry: absl's app (its logging set-up) around :func:`main`."""
    app.run(lambda argv: main(argv[1:]), flags_parser=_absl_parser)


if __name__ == "__main__":
    run()
