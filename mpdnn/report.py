"""``python -m mpdnn.report``: per-layer bits and memory of a quantized network (docs/method.md §5).

Builds a model from :data:`mpdnn.models.MODELS`, quantizes it by rules and prints what
:func:`mpdnn.optim.memory` counts: one row per weight tensor (conv/linear kernel and bias) and
per activation site, in forward order, then the totals::

    python -m mpdnn.report --model resnet20 --weight_bits 2 --act_bits 4 [--json]

Rules, first match wins (:func:`mpdnn.nn.quantize_model`):

* ``--fixed REGEX=BITS`` (repeatable): weight and activation sites whose path fully matches
  REGEX get a fixed quantizer (``mode="fixed"``, b = BITS, range from init, not trained);
* ``--weight_bits W``: every other conv/linear weight gets a learned quantizer (U3, or P3
  with ``--family pow2``) initialised at W bits from the float weights (docs/method.md §4);
* ``--act_bits A``: every other activation site gets a learned quantizer started at A bits.

A kind whose flag is omitted stays float (32 bits in the accounting). Accepted bits are
the authors' boxes (docs/method.md §2): weights 2–8 (a signed grid needs a sign bit and one level),
activations 1–8, ``--fixed`` 2–8 (it applies to both kinds). P3 quantizers asked for more
than 5 bits (weights) or 6 bits (activations) start with fewer, because the qmin box clips
the start (:mod:`mpdnn.quantizers.init`); the report shows the bits the quantizers really
have and says so in a note.

Without ``--workdir`` the bits are those of the **initial** quantizers of a freshly built
float network. ``--workdir RUN`` prints instead the model a finished run of
``python -m mpdnn.train`` delivered (``RUN/report.json``: the best evaluation that met every
budget, or the final model without budgets), with its test error and budget verdicts.
Units (docs/method.md §5): 1 KB = 1024 bytes, 1 MB = 2**20 bytes; activation memory is per sample.
Bad input prints one line on stderr and exits with status 2. :func:`report` gives the same
numbers as a JSON-able dict for other tools (:func:`mpdnn.plots.plot_bitwidths`).

    python -m mpdnn.report --workdir runs/digits/learned [--json]
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flax import nnx

from mpdnn.cli import OneLineParser
from mpdnn.models import MODELS, build
from mpdnn.nn import QuantConfig, Rule, quantize_model
from mpdnn.optim import memory

#: Accepted initial/fixed bits per site kind (the authors' b boxes, docs/method.md §2).
WEIGHT_BITS = (2, 8)
ACT_BITS = (1, 8)
FIXED_BITS = (2, 8)
MB_PER_KB = 1.0 / 1024.0


def _bits_type(kind: str, bounds: tuple[int, int]):
    """argparse type: an integer number of bits within ``bounds``."""
    lo, hi = bounds

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{kind} bits must be an integer, got {text!r}"
            ) from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(
                f"{kind} bits must be in [{lo}, {hi}] (the authors' box), got {value}"
            )
        return value

    return parse


def _fixed_rule(text: str) -> tuple[str, int]:
    """argparse type for ``--fixed REGEX=BITS``."""
    pattern, sep, bits = text.rpartition("=")
    if not sep or not pattern:
        raise argparse.ArgumentTypeError(f"expected REGEX=BITS, got {text!r}")
    try:
        re.compile(pattern)
    except re.error as err:
        raise argparse.ArgumentTypeError(f"{pattern!r} is not a regex: {err}") from None
    return pattern, _bits_type("--fixed", FIXED_BITS)(bits)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model and rule flags, shared with ``scripts/plot_bitwidths.py``."""
    parser.add_argument(
        "--model", default="resnet20", help=f"one of {sorted(MODELS)} (default resnet20)"
    )
    parser.add_argument(
        "--weight_bits",
        type=_bits_type("weight", WEIGHT_BITS),
        default=None,
        help=f"learned weight quantizers starting at this many bits, {WEIGHT_BITS[0]}-"
        f"{WEIGHT_BITS[1]} (default: float)",
    )
    parser.add_argument(
        "--act_bits",
        type=_bits_type("activation", ACT_BITS),
        default=None,
        help=f"learned activation quantizers starting at this many bits, {ACT_BITS[0]}-"
        f"{ACT_BITS[1]} (default: float)",
    )
    parser.add_argument(
        "--family",
        choices=("uniform", "pow2"),
        default="uniform",
        help="quantizer family: uniform (U3) or pow2 (P3) (default uniform)",
    )
    parser.add_argument(
        "--fixed",
        type=_fixed_rule,
        action="append",
        default=[],
        metavar="REGEX=BITS",
        help="sites whose path fully matches REGEX get fixed BITS-bit quantizers (weights "
        "and activations; before the other rules; repeatable)",
    )
    parser.add_argument("--seed", type=int, default=0, help="model init seed (default 0)")


def rules_from_args(args: argparse.Namespace) -> list[Rule]:
    """The rules the flags describe, in priority order."""
    rules = [
        Rule(pattern, QuantConfig(mode="fixed", family=args.family, bits=bits))
        for pattern, bits in args.fixed
    ]
    if args.weight_bits is not None:
        config = QuantConfig(family=args.family, bits=args.weight_bits)
        rules.append(Rule(".*", config, kind="weight"))
    if args.act_bits is not None:
        config = QuantConfig(family=args.family, bits=args.act_bits)
        rules.append(Rule(".*", config, kind="activation"))
    return rules


def describe_rules(args: argparse.Namespace) -> list[str]:
    """One human line per rule, for reports and plot titles."""
    name = "U3" if args.family == "uniform" else "P3"
    out = [f"{p}: fixed {b} b ({args.family})" for p, b in args.fixed]
    for kind, bits in (("weights", args.weight_bits), ("activations", args.act_bits)):
        out.append(f"other {kind}: " + (f"{name} learned, init {bits} b" if bits else "float"))
    return out


def report(model: nnx.Module, *, name: str | None = None) -> dict[str, Any]:
    """Per-tensor bits and memory of ``model`` and the docs/method.md §5 totals, as plain JSON
    values.

    Keys: ``model`` (``name`` or the class name), ``input_shape``, ``num_weights``,
    ``num_activations``, ``num_activation_tensors``, ``weight_kb``, ``weight_mb``,
    ``act_max_kb``, ``act_sum_kb``, ``units`` and ``layers``: one dict per counted tensor in
    forward order with ``index``, ``path``, ``kind`` (``weight``/``activation``), ``tensor``
    (``kernel``/``bias``/``act``), ``shape``, ``numel``, ``quantizer``, ``bits``, ``kb``.
    Every number is a plain ``int`` or ``float`` (``json.dumps`` takes the dict as is).
    """
    mem = memory(model)
    rows = mem.rows  # forward order: the model records it when built
    layers = [
        {
            "index": i,
            "path": r.path,
            "kind": r.kind,
            "tensor": r.tensor,
            "shape": [int(n) for n in r.shape],
            "numel": int(r.numel),
            "quantizer": r.quantizer,
            "bits": float(r.bits),
            "kb": float(r.kb),
        }
        for i, r in enumerate(rows)
    ]
    totals = mem.totals()
    input_shape = getattr(model, "input_shape", None)
    return {
        "model": name or type(model).__name__,
        "input_shape": None if input_shape is None else [int(n) for n in input_shape],
        "num_weights": int(totals["num_weights"]),
        "num_activations": int(totals["num_activations"]),
        "num_activation_tensors": sum(r.kind == "activation" for r in rows),
        "weight_kb": totals["weight_kb"],
        "weight_mb": totals["weight_kb"] * MB_PER_KB,
        "act_max_kb": totals["act_max_kb"],
        "act_sum_kb": totals["act_sum_kb"],
        "units": "1 KB = 1024 bytes, 1 MB = 2**20 bytes; activations per sample",
        "layers": layers,
    }


def build_report(args: argparse.Namespace) -> dict[str, Any]:
    """Build and quantize the model the flags describe and :func:`report` it."""
    model = build(args.model, rngs=nnx.Rngs(args.seed))
    quantize_model(model, rules_from_args(args))
    record = report(model, name=args.model)
    record["rules"] = describe_rules(args)
    record["seed"] = args.seed
    record["trained"] = False
    record["notes"] = _start_mismatches(record, args)
    return record


def _start_mismatches(record: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """Learned quantizers that do not start at the asked bits (P3 above 5-6 bits)."""
    asked = {"weight": args.weight_bits, "activation": args.act_bits}
    notes = []
    for kind, bits in asked.items():
        learned = [
            r for r in record["layers"] if r["kind"] == kind and "fixed" not in r["quantizer"]
        ]
        got = sorted({r["bits"] for r in learned if r["quantizer"] != "float"})
        if bits is not None and got and got != [float(bits)]:
            notes.append(
                f"{kind} quantizers asked to start at {bits} b start at "
                f"{', '.join(f'{b:g}' for b in got)} b (init boxes clip the start)"
            )
    return notes


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


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = OneLineParser(prog="python -m mpdnn.report", description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="a finished training run: report the model it delivered (instead of a fresh one)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    args = parser.parse_args(argv)
    if args.workdir is not None:
        if args.weight_bits is not None or args.act_bits is not None or args.fixed:
            parser.error("--workdir reports a trained run; the bit flags describe a fresh model")
        if not (args.workdir / "report.json").is_file():
            parser.error(
                f"no report.json in {args.workdir}: not a finished run of python -m "
                "mpdnn.train (a running one logs its evaluations in metrics.jsonl)"
            )
        return args
    check_model(parser, args.model)
    return args


def trained_report(workdir: Path) -> dict[str, Any]:
    """The delivered model's report of a finished run, with its summary as ``run``."""
    record = json.loads((workdir / "report.json").read_text())
    summary_path = workdir / "summary.json"
    record["run"] = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
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


def check_model(parser: argparse.ArgumentParser, name: str) -> None:
    """One-line error for a model name not in :data:`mpdnn.models.MODELS`."""
    if name not in MODELS:
        parser.error(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.workdir is not None:
        record = trained_report(args.workdir)
        if args.json:
            print(json.dumps(record, allow_nan=False))
            return
        print("\n".join(_run_header(args.workdir, record["run"])))
        print()
        print(format_table(record))
        return
    record = build_report(args)
    if args.json:
        print(json.dumps(record, allow_nan=False))
        return
    print(f"{args.model}, input {record['input_shape']}: " + "; ".join(record["rules"]))
    print("(initial quantizers of an untrained float network; --workdir RUN reports a trained one)")
    for note in record["notes"]:
        print(f"note: {note}")
    print()
    print(format_table(record))


if __name__ == "__main__":
    main()
