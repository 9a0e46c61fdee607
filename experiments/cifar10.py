r"""The paper's CIFAR-10 tables (docs/method.md §9, Tables 1 and 3), one config per row.

``:row=<row>[,protocol=full|reduced|smoke]`` picks a row of :data:`mpdnn.configs.cifar10.ROWS`
(the registry says what every row trains and why) and a protocol: ``full`` is the paper's
recipe (docs/method.md §8: 160 epochs, batch 128), ``reduced`` the CPU one (orderings only),
``smoke`` two steps.

    python experiments/cifar10.py --list       # every row: paper, command, our results
    python -m mpdnn.train --config experiments/cifar10.py:row=t3_ours_w_uniform \
        --workdir runs/cifar10/t3_ours_w_uniform   # starts from runs/cifar10/float
    python scripts/reproduce_cifar10.py --rows t3_ours_w_uniform   # the float row first

Measured results, with their command, commit, machine, date and wall time, are in
``results/cifar10.md`` and ``results/cifar10/``; ``--list`` prints them beside each row.
Ours run on the lossy JPEG copy of CIFAR-10 (docs/method.md §11): compare rows with each
other, not with the paper's absolute numbers.
"""

from pathlib import Path

from mpdnn.configs.cifar10 import get_config, listing

__all__ = ["get_config"]

if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print every row and exit")
    parser.add_argument(
        "--results",
        type=Path,
        default=Path(__file__).resolve().parents[1] / "results",
        help="where the measured results are (default: this checkout's results/)",
    )
    args = parser.parse_args()
    if not args.list:
        parser.error("say --list (a row trains with: python -m mpdnn.train --config ...)")
    print(listing(args.results))
