"""Per-layer weight and activation bits of a network as a bar chart (paper Fig. 5 style).

From a report JSON: a run's ``report.json``, or the initial quantizers of a config's
untrained network written by ``python -m mpdnn.report --config ... --json``::

    python -m mpdnn.report --config experiments/first_last_8bit.py --json > /tmp/report.json
    python scripts/plot_bitwidths.py --report /tmp/report.json --out docs/bitwidths_resnet20.png
    python scripts/plot_bitwidths.py --report RUN/report.json --out bits.png
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from mpdnn.plots import plot_bitwidths


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="scripts/plot_bitwidths.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--report", type=Path, required=True, help="the report JSON to plot")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--title", default=None, help="first title line (default: the model)")
    args = parser.parse_args(argv)
    try:
        record = json.loads(args.report.read_text())
    except (OSError, ValueError) as err:
        parser.error(f"cannot read report {args.report}: {err}")
    if not isinstance(record, dict) or not isinstance(record.get("layers"), list):
        parser.error(f"{args.report} is not a report of python -m mpdnn.report --json")
    title = args.title if args.title is not None else record.get("model", "")
    print(f"wrote {plot_bitwidths(record, args.out, title=title)}")


if __name__ == "__main__":
    main()
