"""``python -m mpdnn.train``: placeholder entry point until the network trainer exists.

The trainer (``mpdnn/training``, SPEC §6–8) is not built yet. Until it is, this command runs
the paper's Gaussian experiment (Uhlich et al., ICLR 2020, Fig. 3) from :mod:`mpdnn.gaussian`
at its defaults (pow2 step, one learning rate, all six parametrizations), prints a table and
writes ``gaussian_mse.json`` and ``gaussian_mse.png`` into ``--workdir``. It says so loudly,
so nobody mistakes its output for a trained network. About 10 s on a 2-core CPU.

    python -m mpdnn.train --workdir runs/gaussian --steps 2000
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from mpdnn import gaussian
from mpdnn.cli import OneLineParser
from mpdnn.provenance import provenance

BANNER = (
    "mpdnn.train: the network trainer is not built yet (SPEC §6-8).\n"
    "Running the paper's Gaussian experiment (Uhlich et al. 2020, Fig. 3) instead: "
    "E[(Q(x) - x)^2] on N(0, 1) samples, plain gradient descent, six parametrizations."
)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = OneLineParser(prog="python -m mpdnn.train", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path("runs/gaussian"),
        help="where gaussian_mse.json and gaussian_mse.png go (default runs/gaussian)",
    )
    parser.add_argument(
        "--steps",
        type=_positive_int,
        default=gaussian.DEFAULT_STEPS,
        help=f"gradient steps (default {gaussian.DEFAULT_STEPS})",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    print(BANNER, flush=True)
    lr = gaussian.DEFAULT_LEARNING_RATE
    print(
        f"steps={args.steps} lr={lr:g} samples={gaussian.DEFAULT_NUM_SAMPLES} "
        f"seed={gaussian.DEFAULT_SEED} pow2_step=True workdir={args.workdir}",
        flush=True,
    )
    start = time.perf_counter()
    results = gaussian.run_experiment(steps=args.steps, learning_rate=lr)
    summaries = gaussian.summarize_all(results)
    args.workdir.mkdir(parents=True, exist_ok=True)
    try:
        fig = gaussian.plot_curves(
            results,
            args.workdir / "gaussian_mse.png",
            title=f"Gaussian data, pow2 step, lr={lr:g} (paper Fig. 3)",
        )
    except ImportError:  # matplotlib is an optional extra ("train"); the numbers still count
        fig = "no figure (matplotlib not installed; pip install 'mpdnn[train]')"
    wall = time.perf_counter() - start
    argv_list = sys.argv[1:] if argv is None else list(argv)
    command = shlex.join(["python", "-m", "mpdnn.train", *argv_list])
    record = {
        "experiment": "gaussian_mse via mpdnn.train (trainer not built yet)",
        "provenance": provenance(command, wall_time_s=wall, seed=gaussian.DEFAULT_SEED),
        "config": {
            "steps": args.steps,
            "num_samples": gaussian.DEFAULT_NUM_SAMPLES,
            "learning_rate": lr,
            "pow2_step": True,
            "initial_bits": gaussian.DEFAULT_BITS,
        },
        "verdict": gaussian.verdict_sentence(summaries),
        "cases": {key: gaussian.record(t) for key, t in results.items()},
    }
    json_path = args.workdir / "gaussian_mse.json"
    json_path.write_text(json.dumps(record, indent=1, allow_nan=False) + "\n")

    print()
    print(gaussian.format_table(summaries))
    print("(oscillation: total climb of log-MSE over the second half, in nats; rises: steps")
    print(f" that raise the MSE by > {gaussian.RISE_THRESHOLD:.0%}; * = oscillating)")
    print()
    print(gaussian.verdict_sentence(summaries))
    print(f"wrote {json_path} and {fig} in {wall:.1f} s")


if __name__ == "__main__":
    main()
