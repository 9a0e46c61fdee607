"""``python -m mpdnn.report``: per-layer bits and memory of a quantized network (docs/method.md §5).

    python -m mpdnn.report --config experiments/<name>.py[:arg] [--config.key=value ...] [--json]
    python -m mpdnn.report --workdir RUN [--json]

``--config`` takes a training config exactly as ``python -m mpdnn.train`` does (a file,
optionally with ``:arg``, and ``--config.<key>=value`` overrides). The report builds the
model that config trains (``model.*``, with the input shape and class count of
``data.name``), quantizes it by the config's rules (``quant.layer_rules`` first, then
``quant.weights`` and ``quant.activations``: :func:`mpdnn.training.config.rules`) and prints
what :meth:`mpdnn.optim.MemoryReport.to_json` gives: one row per weight tensor (conv/linear
kernel and bias) and per activation site, in forward order, then the totals. These are the
bits of the **initial** quantizers of a freshly initialised float network: the weights of
``init.from_workdir`` / ``init.torchvision`` are not loaded. A config with variants names
the one to report with ``--config.run_variants=NAME``. Learned quantizers that do not start
at the bits their rule asks for (P3 above 5 bits for weights, 6 for activations: the qmin box
clips the start, :mod:`mpdnn.quantizers.init`) are named in a note.

``--workdir RUN`` prints instead the model a finished run of ``python -m mpdnn.train``
delivered (``RUN/report.json``: the best evaluation that met every budget, or the final
model), with its test error and budget verdicts.

Units (docs/method.md §5): 1 KB = 1024 bytes, 1 MB = 2**20 bytes; activation memory is per
sample. Bad input prints one line on stderr and exits with status 2.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

from flax import nnx

from mpdnn.nn import Rule
from mpdnn.optim import memory

PROG = "mpdnn.report"


# ----------------------------------------------------------------------------- a config


def data_shape(config):
    """The :class:`~mpdnn.training.setup.DataShape` of ``data.name`` (input shape and class
    count), without loading the data."""
    from mpdnn.training.setup import DataShape

    d = config.data
    size = int(d.get("image_size", 224))
    shapes = {
        "cifar10": ((32, 32, 3), 10),
        "digits": ((8, 8, 1), 10),
        "synthetic": (tuple(d.get("synthetic_shape", (32, 32, 3))), d.get("synthetic_classes", 10)),
        "imagenet": ((size, size, 3), 1000),
    }
    shape, classes = shapes[d.name]  # cfg.check has rejected any other name
    if d.get("stream"):  # streamed with ImageNet preprocessing: crops of image_size
        shape = (size, size, shape[-1])
    return DataShape(tuple(int(n) for n in shape), int(classes))


def config_model(config) -> nnx.Module:
    """The model ``config`` trains, freshly initialised (``config.seed``) and quantized by
    its rules, built as the trainer builds it (:func:`mpdnn.training.setup.build_model`);
    the weights of ``init.*`` are not loaded."""
    import ml_collections

    from mpdnn.training.setup import build_model

    run = ml_collections.ConfigDict(config.to_dict())
    run.init.from_workdir = None
    if "torchvision" in run.init:
        run.init.torchvision = None
    return build_model(run, data_shape(run), Path("."))


def _single_run(config):
    """The one run of ``config`` (a config with variants must name one)."""
    from mpdnn.training import config as cfg

    runs = cfg.variants(config)
    if len(runs) > 1:
        raise cfg.ConfigError(
            f"the config has variants {', '.join(runs)}: name the one to report with "
            "--config.run_variants=NAME"
        )
    (run,) = runs.values()
    cfg.check(run)
    return run


def describe_rule(rule: Rule) -> str:
    """One human line for a rule, for reports and plot titles."""
    q = rule.config
    kinds = {"weight": "weights", "activation": "activations", None: "all sites"}[rule.kind]
    if q.mode == "float":
        how = "float"
    elif q.mode == "learned":
        spec = q.spec(rule.kind or "weight", signed=rule.kind != "activation")
        how = f"{q.family} {spec.parametrization} learned, init {q.bits} b"
    else:
        how = f"{q.family} {q.mode} {q.bits} b"
    return f"{kinds} matching {rule.pattern}: {how}"


def _start_mismatches(record: dict[str, Any], rules: Sequence[Rule]) -> list[str]:
    """Learned quantizers that do not start at their rule's bits (the init boxes clip)."""
    got: dict[tuple[str, int], set[float]] = {}
    for r in record["layers"]:
        rule = next((u for u in rules if u.matches(r["path"], r["kind"])), None)
        if rule is not None and rule.config.mode == "learned" and r["bits"] != rule.config.bits:
            got.setdefault((r["kind"], rule.config.bits), set()).add(r["bits"])
    return [
        f"{kind} quantizers asked to start at {bits} b start at "
        f"{', '.join(f'{b:g}' for b in sorted(values))} b (init boxes clip the start)"
        for (kind, bits), values in sorted(got.items())
    ]


def config_report(config) -> dict[str, Any]:
    """The report of the model ``config`` trains, at its initial quantizers: the JSON of
    :meth:`~mpdnn.optim.MemoryReport.to_json` with ``config`` (its name), ``dataset``,
    ``rules`` (one line each), ``seed``, ``trained`` (False) and ``notes``.

    Raises :class:`mpdnn.training.config.ConfigError` (one line) for a bad config.
    """
    from mpdnn.training import config as cfg

    run = _single_run(config)
    rules = cfg.rules(run)
    record = memory(config_model(run)).to_json(run.model.name)
    record["config"] = run.name
    record["dataset"] = run.data.name
    record["rules"] = [describe_rule(r) for r in rules] + ["every other site: float"]
    record["seed"] = int(run.seed)
    record["trained"] = False
    record["notes"] = _start_mismatches(record, rules)
    return record


# ----------------------------------------------------------------------------- a finished run


def trained_report(workdir: Path) -> dict[str, Any]:
    """The delivered model's report of a finished run, with its summary as ``run``."""
    from mpdnn.training.rundir import RunDir

    run = RunDir(workdir)
    record = run.read_report()
    if record is None:
        _usage_error(
            f"no report.json in {workdir}: not a finished run of python -m mpdnn.train (a "
            "running one logs its evaluations in metrics.jsonl)"
        )
    record["run"] = run.read_summary() or {}
    return record


def _run_header(workdir: Path, run: dict[str, Any]) -> list[str]:
    line = f"{workdir}: {run.get('name', '?')}, delivered model: {run.get('delivered') or 'none'}"
    if run.get("delivered_test_error") is not None:
        line += f", test error {run['delivered_test_error']:.4f}"
    if run.get("final_test_error") is not None:
        line += f" (final epoch {run['final_test_error']:.4f})"
    lines = [line]
    for name, v in (run.get("verdicts") or {}).items():
        delivered = v["delivered_kb"]
        lines.append(
            f"budget {name} <= {v['limit_kb']:g} KB: "
            + ("NOT MET by any evaluation" if delivered is None else f"met at {delivered:.3f} KB")
        )
    return lines


# ----------------------------------------------------------------------------- output


def format_table(record: dict[str, Any]) -> str:
    """The per-layer table and the totals, as printed by ``python -m mpdnn.report``."""
    layers = record["layers"]
    width = max([len("path"), *(len(r["path"]) for r in layers)])
    header = (
        f"{'#':>3s}  {'path':<{width}s}  {'kind':<10s}  {'tensor':<6s}  {'shape':<16s}  "
        f"{'numel':>8s}  {'quantizer':<18s}  {'bits':>4s}  {'KB':>10s}"
    )
    lines = [header, "-" * len(header)]
    for r in layers:
        shape = "x".join(str(n) for n in r["shape"])
        lines.append(
            f"{r['index']:>3d}  {r['path']:<{width}s}  {r['kind']:<10s}  {r['tensor']:<6s}  "
            f"{shape:<16s}  {r['numel']:>8d}  {r['quantizer']:<18s}  {r['bits']:>4g}  "
            f"{r['kb']:>10.4f}"
        )
    lines.append("")
    lines.append(f"num_weights       {record['num_weights']}")
    lines.append(f"weight_kb         {record['weight_kb']!r}")
    lines.append(f"weight_mb         {record['weight_mb']!r}")
    lines.append(
        f"num_activations   {record['num_activations']}  "
        f"(per sample, {record['num_activation_tensors']} tensors)"
    )
    lines.append(f"act_max_kb        {record['act_max_kb']!r}")
    lines.append(f"act_sum_kb        {record['act_sum_kb']!r}")
    lines.append(f"units             {record['units']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- flags


def _one_line(err: BaseException) -> str:
    """The last non-empty line of an error's text: absl and ml_collections wrap config
    loading errors in tracebacks; the line that matters comes last."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


def _key(err: BaseException) -> str:
    """The key a ``KeyError`` / ``AttributeError`` names (their text is a repr)."""
    text = _one_line(err)
    for junk in ("\\n", "\\", "'", '"'):
        text = text.replace(junk, " ")
    return " ".join(text.split())


def _usage_error(message: str) -> NoReturn:
    print(f"{PROG}: error: {message} (see --help)", file=sys.stderr)
    sys.exit(2)


class Flags(NamedTuple):
    config: Any  # an ml_collections.ConfigDict, or None
    workdir: Path | None
    json: bool


def parse_flags(argv: Sequence[str]) -> Flags:
    """``argv`` (without the program name) parsed by absl's flags, as ``python -m
    mpdnn.train`` parses its own, into a fresh ``FlagValues`` (so that the trainer's global
    flags and repeated calls in one process do not collide). Bad input: one line, exit 2."""
    from absl import flags

    from mpdnn.cli import define_config_flag

    argv = [PROG, *argv]
    values = flags.FlagValues()
    config = define_config_flag(
        values,
        argv,
        default=None,
        help_string="training config file, optionally with ':arg', and --config.<key>=value "
        "overrides (as python -m mpdnn.train takes them)",
    )
    workdir = flags.DEFINE_string(
        "workdir",
        None,
        "a finished training run: report the model it delivered (instead of a config's)",
        flag_values=values,
    )
    as_json = flags.DEFINE_bool("json", False, "print one JSON object instead", flag_values=values)
    if any(a in ("-h", "--help", "-help") for a in argv[1:]):
        print(__doc__)
        print(values.get_help())
        sys.exit(0)
    try:
        rest = values(argv)
        loaded = config.value
        if loaded is not None:
            loaded.to_dict()  # ml_collections loads lazily: fail here
    except flags.Error as err:
        _usage_error(_one_line(err))
    except (AttributeError, KeyError) as err:
        if any(a.startswith(("--config.", "-config.")) for a in argv):
            _usage_error(f"bad --config override: no key {_key(err)}")
        _usage_error(f"cannot load the config: {_key(err)}")
    except (OSError, TypeError, ValueError) as err:
        _usage_error(f"cannot load the config: {_one_line(err)}")
    if len(rest) > 1:
        _usage_error(f"unexpected arguments {' '.join(rest[1:])!r}")
    path = None if workdir.value is None else Path(workdir.value)
    if loaded is not None and path is not None:
        _usage_error(
            "--config describes a fresh model, --workdir a finished run's delivered one: "
            "give one of them"
        )
    if loaded is None and path is None:
        _usage_error("give --config CONFIG or --workdir RUN")
    return Flags(loaded, path, as_json.value)


def main(argv: Sequence[str] | None = None) -> None:
    from mpdnn.cli import terminal_logging

    terminal_logging()
    args = parse_flags(sys.argv[1:] if argv is None else argv)
    if args.workdir is not None:
        from mpdnn.training.rundir import RunDirError

        try:
            record = trained_report(args.workdir)
        except RunDirError as err:
            _usage_error(str(err))
        if args.json:
            print(json.dumps(record, allow_nan=False))
            return
        print("\n".join(_run_header(args.workdir, record["run"])))
        print()
        print(format_table(record))
        return
    from mpdnn.training.config import ConfigError

    try:
        record = config_report(args.config)
    except ConfigError as err:
        _usage_error(str(err))
    if args.json:
        print(json.dumps(record, allow_nan=False))
        return
    print(
        f"{record['config']}: {record['model']} on {record['dataset']}, input "
        f"{record['input_shape']}: " + "; ".join(record["rules"])
    )
    print("(initial quantizers of an untrained float network; --workdir RUN reports a trained one)")
    for note in record["notes"]:
        print(f"note: {note}")
    print()
    print(format_table(record))


if __name__ == "__main__":
    main()
