r"""Export a trained mixed-precision network as bit-packed integers (docs/method.md §3, §5, §12).

    python -m mpdnn.export --workdir RUN [--format mpq|onnx] [--out FILE] [--verify N] [--json]

writes the model that a finished run of ``python -m mpdnn.train`` delivered (``best/`` when
``summary.json`` says ``delivered == "best_feasible"``, else ``final/``) as one ``.mpq`` file
(:mod:`mpdnn.export.mpq`; docs/export.md). ``--verify N`` also runs the integer reference
forward (:mod:`mpdnn.export.reference`) on N test images of the run's dataset and compares it
with the Flax model (exit status 1 if it does not reproduce it).

``--format onnx`` writes an ONNX QDQ graph instead (:mod:`mpdnn.export.to_onnx`: integer
weight initializers, QuantizeLinear/DequantizeLinear activation sites), default
``RUN/model.onnx``; with ``--verify N`` onnxruntime runs it on N test images and the top-1
classes are compared with the Flax model's (exit status 1 below 99.9 % agreement).

Bad input (missing workdir, unfinished run, no deliverable model, a model the reference does
not support) is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from mpdnn.cli import OneLineParser, terminal_logging
from mpdnn.export.codec import ExportError
from mpdnn.export.mpq import export_model, load
from mpdnn.export.reference import _Reference, compare
from mpdnn.export.run import load_run


def _verify(workdir: Path, model: nnx.Module, out: Path, count: int) -> dict[str, Any]:
    """:func:`compare` on the first ``count`` test images of the run's own dataset."""
    exported = load(out)
    _Reference(exported, fused_multiply_add=True)  # an unsupported model: say so first
    x, data = _test_images(workdir, count)
    return {**compare(model, exported, x), "data": data}


def _test_images(workdir: Path, count: int) -> tuple[np.ndarray, str]:
    from mpdnn.data import normalize
    from mpdnn.training.rundir import RunDir
    from mpdnn.training.trainer import load_data

    dataset = load_data(RunDir(workdir).read_config())
    images = dataset.test_images[:count]
    x = np.asarray(normalize(images, dataset.pixel_scale, dataset.pixel_offset), np.float32)
    return x, dataset.description


def _export_onnx(args: argparse.Namespace, model: nnx.Module, run: dict, out: Path) -> int:
    from mpdnn.export.to_onnx import compare_onnx, export_onnx

    result = {**export_onnx(model, out, meta={"mpdnn_run": json.dumps(run)}), "run": run}
    if args.verify:
        images, data = _test_images(args.workdir, args.verify)
        result["verify"] = {**compare_onnx(model, out, images), "data": data}
    if args.json:
        print(json.dumps(result, allow_nan=False))
    else:
        print(
            f"{result['path']}: {result['file_bytes']} bytes; weight initializers "
            f"{result['weight_initializer_bytes']} bytes, accounted weight memory "
            f"(docs/method.md §5) {result['accounted_weight_bytes']:g} bytes"
        )
        if "verify" in result:
            v = result["verify"]
            print(
                f"onnxruntime on {v['num_images']} test images ({v['data']}): top-1 agreement "
                f"{v['top1_agreement']:.4f}, logits bit-equal on {v['logits_equal']}, max "
                f"|diff| {v['logits_max_abs_diff']:.3g} (logits up to {v['logits_max_abs']:.3g})"
            )
    if "verify" in result and result["verify"]["top1_agreement"] < 0.999:
        print("error: the ONNX model does NOT agree with the Flax model", file=sys.stderr)
        return 1
    return 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = OneLineParser(prog="python -m mpdnn.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, required=True, help="a finished training run")
    parser.add_argument(
        "--format",
        choices=("mpq", "onnx"),
        default="mpq",
        help="mpq: bit-packed payload (default); onnx: a QDQ graph onnxruntime runs",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="the file to write (default RUN/model.FORMAT)"
    )
    parser.add_argument(
        "--verify",
        type=int,
        default=0,
        metavar="N",
        help="compare with the Flax model on N test images of the run's dataset: the "
        "integer reference forward (mpq, ResNet-20 only) or onnxruntime (onnx)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    args = parser.parse_args(argv)
    if args.verify < 0:
        parser.error(f"--verify must be >= 0, got {args.verify}")
    args.parser = parser
    return args


def _describe(result: dict[str, Any]) -> str:
    run = result["run"]
    lines = [
        f"{result['path']}: {result['file_bytes']} bytes = header {result['header_bytes']} "
        f"(fixed {result['fixed_header_bytes']} + table {result['table_bytes']}) + weight "
        f"payload {result['payload_bytes']} + float section {result['float_bytes']}",
        f"weight payload: {result['payload_bytes']} bytes = ceil({result['payload_bits']} "
        f"bits / 8); accounting (docs/method.md §5): weight_kb {result['weight_kb']!r} x 1024 = "
        f"{result['weight_kb'] * 1024:g} bytes for {result['num_weights']} weights",
        f"model: {run['model']} from {run['workdir']}, delivered {run['delivered']} "
        f"({run['checkpoint']}/ step {run['step']}, test error {run['test_error']})",
    ]
    if "verify" in result:
        v = result["verify"]
        lines.append(
            f"reference forward on {v['images']} test images ({v['data']}): logits bit-equal "
            f"on {v['logits_equal']}, and on {v['logits_equal_given_stem']} given the model's "
            f"own first conv; first conv max |diff| {v['stem_conv_max_abs_diff']:.3g} "
            f"({v['stem_conv_error_in_u']:.2f} u of its terms), "
            f"{v['stem_codes_differing']} first activation codes differ"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    terminal_logging()
    args = parse_args(argv)
    parser = args.parser
    out = args.out if args.out is not None else args.workdir / f"model.{args.format}"
    from mpdnn.data import DataError

    try:
        model, run = load_run(args.workdir)
        if args.format == "onnx":
            return _export_onnx(args, model, run, out)
        result = {**export_model(model, out, meta={"run": run}), "run": run}
        if args.verify:
            result["verify"] = _verify(args.workdir, model, out, args.verify)
    except (ExportError, DataError, OSError) as err:
        parser.error(str(err).splitlines()[0] if str(err) else type(err).__name__)
    if args.json:
        print(json.dumps(result, allow_nan=False))
    else:
        print(_describe(result))
    verify = result.get("verify")
    if verify and verify["logits_equal_given_stem"] != verify["images"]:
        print("error: the reference forward does NOT reproduce the model", file=sys.stderr)
        return 1
    return 0
