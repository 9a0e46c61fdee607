"""Per-layer weight and activation bits of a network as a bar chart (paper Fig. 5 style).

Either from a model quantized by the rule flags of ``python -m mpdnn.report`` (the initial
quantizers of an untrained network, and the default title says so), or from a report JSON
written by ``python -m mpdnn.report ... --json > report.json``::

    python scripts/plot_bitwidths.py --model resnet20 --weight_bits 2 --act_bits 4 \
        --fixed 'stem.*=8' --fixed 'head=8' --out docs/bitwidths_resnet20.png
    python scripts/plot_bitwidths.py --report report.json --out bits.png

The first command made ``docs/bitwidths_resnet20.png`` (about 15 s on a 2-core CPU, most of
it building the model).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from mpdnn import report as mreport
from mpdnn.plots import plot_bitwidths


def main(argv: Sequence[str] | None = None) -> None:
    parser = mreport._OneLineParser(
        prog="scripts/plot_bitwidths.py", description=__doc__.split("\n\n")[0]
    )
    mreport.add_model_arguments(parser)
    parser.add_argument(
        "--report", type=Path, default=None, help="plot this report JSON (model flags ignored)"
    )
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--title", default=None, help="first title line (default: automatic)")
    args = parser.parse_args(argv)
    if args.report is not None:
        try:
            record = json.loads(args.report.read_text())
        except (OSError, ValueError) as err:
            parser.error(f"cannot read report {args.report}: {err}")
        if not isinstance(record, dict) or not isinstance(record.get("layers"), list):
            parser.error(f"{args.report} is not a report of python -m mpdnn.report --json")
    else:
        mreport.check_model(parser, args.model)
        record = mreport.build_report(args)
    title = args.title
    if title is None:
        state = {True: " (trained)", False: " (untrained: bits assigned by rules at init)"}
        rules = "; ".join(record.get("rules", []))
        title = f"{record.get('model', '')}{state.get(record.get('trained'), '')}"
        title += f"\n{rules}" if rules else ""
    print(f"wrote {plot_bitwidths(record, args.out, title=title)}")


if __name__ == "__main__":
    main()
