r"""Export a trained mixed-precision network as bit-packed integers (docs/method.md §3, §5, §12).

    python -m mpdnn.export --workdir RUN [--out RUN/model.mpq] [--verify N] [--json]

writes the model that a finished run of ``python -m mpdnn.train`` delivered (``best/`` when
``summary.json`` says ``delivered == "best_feasible"``, else ``final/``) as one ``.mpq`` file
(:mod:`mpdnn.export.mpq`; docs/export.md). ``--verify N`` also runs the integer reference
forward (:mod:`mpdnn.export.reference`) on N test images of the run's dataset and compares it
with the Flax model (exit status 1 if it does not reproduce it).

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

from mpdnn.cli import OneLineParser
from mpdnn.export.codec import ExportError
from mpdnn.export.mpq import export_model, load
from mpdnn.export.reference import _Reference, compare
from mpdnn.export.run import load_run


def _verify(workdir: Path, model: nnx.Module, out: Path, count: int) -> dict[str, Any]:
    """:func:`compare` on the first ``count`` test images of the run's own dataset."""
    from mpdnn.data import normalize
    from mpdnn.training.rundir import RunDir
    from mpdnn.training.trainer import load_data

    exported = load(out)
    _Reference(exported, fused_multiply_add=True)  # an unsupported model: say so first
    config = RunDir(workdir).read_config()
    dataset = load_data(config)
    images = dataset.test_images[:count]
    x = np.asarray(normalize(images, dataset.pixel_scale, dataset.pixel_offset), np.float32)
    result = compare(model, exported, x)
    result["data"] = dataset.description
    return result


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = OneLineParser(prog="python -m mpdnn.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, required=True, help="a finished training run")
    parser.add_argument(
        "--out", type=Path, default=None, help="the .mpq file to write (default RUN/model.mpq)"
    )
    parser.add_argument(
        "--verify",
        type=int,
        default=0,
        metavar="N",
        help="run the integer reference forward on N test images of the run's dataset and "
        "compare it with the Flax model (ResNet-20 only)",
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
    args = parse_args(argv)
    parser = args.parser
    out = args.out if args.out is not None else args.workdir / "model.mpq"
    from mpdnn.data import DataError

    try:
        model, run = load_run(args.workdir)
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
