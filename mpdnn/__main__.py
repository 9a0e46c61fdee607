"""``mpdnn`` (and ``python -m mpdnn``): one command for training, reports, export and the
paper's CIFAR-10 tables.

    mpdnn train     [flags]   python -m mpdnn.train     (mpdnn train --help)
    mpdnn report    [flags]   python -m mpdnn.report
    mpdnn export    [flags]   python -m mpdnn.export
    mpdnn reproduce [flags]   python scripts/reproduce_cifar10.py (a clone of the repository)

Each subcommand takes exactly the flags of the module it names; those modules keep working.
"""

from __future__ import annotations

import runpy
import sys
from collections.abc import Sequence
from pathlib import Path

SUBCOMMANDS = {
    "train": "train a config (its variants), evaluate, report and write the table",
    "report": "a run's (or a config's) per-layer bits and memory",
    "export": "write a finished run's model as .mpq or ONNX",
    "reproduce": "train rows of the paper's CIFAR-10 tables and rewrite their results",
}
_REPRODUCE = Path(__file__).resolve().parents[1] / "scripts" / "reproduce_cifar10.py"


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: mpdnn {train,report,export,reproduce} [flags]", "", "subcommands:"]
    lines += [f"  {name:<{width}}  {what}" for name, what in SUBCOMMANDS.items()]
    lines += ["", "mpdnn SUBCOMMAND --help lists a subcommand's flags."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"mpdnn: error: unknown subcommand {name!r} (see mpdnn --help)", file=sys.stderr)
        return 2
    if name == "train":
        from mpdnn import train

        sys.argv = ["mpdnn train", *rest]
        train.run()  # absl's app: exits itself
        return 0
    if name == "report":
        from mpdnn import report

        report.main(rest)
        return 0
    if name == "export":
        from mpdnn.export.cli import main as export_main

        return export_main(rest)
    if not _REPRODUCE.is_file():
        print(
            f"mpdnn: error: reproduce runs {_REPRODUCE.name} from a clone of the repository "
            "(pip install -e .); this install has no scripts/",
            file=sys.stderr,
        )
        return 2
    sys.argv = [str(_REPRODUCE), *rest]
    try:
        runpy.run_path(str(_REPRODUCE), run_name="__main__")
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    return 0


def run() -> None:
    """The ``mpdnn`` console script."""
    sys.exit(main())


if __name__ == "__main__":
    run()
