"""Does the quick start still print what ``results/digits.{md,json}`` say it prints?

    python -m mpdnn.train --workdir /tmp/digits && \
        python scripts/check_default_experiment.py /tmp/digits

Compares the ``table.json`` a run of the default experiment wrote with the committed
``results/digits.json``, run by run: the delivered and final test errors, the delivered
model's sizes, its verdict and its per-layer weight bits. ``.ci/run`` calls it after the
main job, so a change that moves the default experiment's numbers fails CI until the
results are regenerated (the command is in ``results/digits.md``).

Nondeterminism: a given machine computes the same numbers on every rerun, but the test
errors move a little from one machine to another: commit 1651c8a with the same package
versions (JAX 0.10.2) gave fixed 2-bit 96.67 % on one 2-core CI machine and 97.78 % on another
(4 of 360 test images; XLA compiles for the host CPU), with the same sizes, bits and verdicts.
So a test error may differ by up to ``ERROR_SPREAD`` (6 test images) on any machine; under
the JAX version the results were made with, the delivered sizes, the verdicts and the
per-layer bits must match exactly; under another one (whose kernels may round differently)
a size may move by 1 % and bits may differ, and the script says that it compared loosely.
Exit status: 0 same, 1 different (each difference on a line), 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "results" / "digits.json"
ONE_IMAGE = 1 / 360  # digits' test split
# How far a test error may move between machines (module docstring): 4 images were seen.
ERROR_SPREAD = 6 * ONE_IMAGE


def differences(got: dict[str, Any], want: dict[str, Any], *, exact: bool = True) -> list[str]:
    """What differs between two ``table.json`` records of the default experiment."""
    out = []
    runs_got, runs_want = got.get("runs", {}), want.get("runs", {})
    if set(runs_got) != set(runs_want):
        return [f"runs {sorted(runs_got)} != {sorted(runs_want)}"]
    for name, w in runs_want.items():
        g = runs_got[name]
        for key in ("delivered_test_error", "final_test_error"):
            a, b = g.get(key), w.get(key)
            if a is None or b is None:
                same = a is b
            else:
                same = abs(a - b) <= ERROR_SPREAD + 1e-9
            if not same:
                out.append(f"{name}.{key}: {a} (committed {b})")
        for size, b in (w.get("delivered_sizes") or {}).items():
            a = (g.get("delivered_sizes") or {}).get(size)
            same = a == b if exact else a is not None and math.isclose(a, b, rel_tol=0.01)
            if not same:
                out.append(f"{name}.delivered_sizes.{size}: {a} (committed {b})")
        for key in ("feasible", "delivered") + (("weight_bits",) if exact else ()):
            if g.get(key) != w.get(key):
                out.append(f"{name}.{key}: {g.get(key)} (committed {w.get(key)})")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path, help="where python -m mpdnn.train wrote table.json")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the committed record")
    args = parser.parse_args(argv)
    try:
        got = json.loads((args.workdir / "table.json").read_text())
        want = json.loads(args.results.read_text())
    except (OSError, ValueError) as err:
        print(f"check_default_experiment.py: error: {err}", file=sys.stderr)
        return 2
    made_with = want["provenance"].get("jax_version")
    exact = got["provenance"].get("jax_version") == made_with
    found = differences(got, want, exact=exact)
    how = (
        "sizes, verdicts and bits exactly, test errors within 6 test images"
        if exact
        else f"loosely (JAX {got['provenance'].get('jax_version')}, made with {made_with})"
    )
    if found:
        print(f"the default experiment no longer prints {args.results} (compared {how}):")
        print("\n".join(f"  {line}" for line in found))
        print("regenerate results/digits.{md,json} with the command in results/digits.md")
        return 1
    print(f"the default experiment matches {args.results.relative_to(REPO)} ({how})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
