"""Check ``mq.quantize`` against the float64 reference on whatever device JAX runs on.

The pytest suite runs on CPU. This script runs the same comparison (values, dQ/dx, dQ/dθ for
every family × parametrization × signedness × with_zero × pow2_step; docs/method.md §1–2), and of
``mq.bitwidth`` including every power-of-two boundary (docs/method.md §3), on the default
JAX device, e.g. a GPU, where XLA's kernels (rounding, log2, reductions) differ, and needs
only JAX and NumPy. It ends with a line ``N passed, M failed`` and exits non-zero on failure.

    PYTHONPATH=. python scripts/check_quantizers_device.py [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
import zlib
from pathlib import Path

import jax
import numpy as np

import mpdnn.quantizers as mq
from mpdnn.provenance import provenance
from tests.quantizers.cases import (
    all_spec_kwargs,
    check_against_reference,
    check_bitwidths,
    spec_id,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=None, help="also write a json record here")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()})", flush=True)
    failures: dict[str, str] = {}
    cases = all_spec_kwargs()
    for kw in cases:
        name = spec_id(kw)
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        try:
            check_against_reference(mq.QuantSpec(**kw), rng)
        except AssertionError as err:
            failures[name] = " | ".join(str(err).strip().splitlines()[:6])
            print(f"FAIL {name}: {failures[name]}", flush=True)
    bit_errors = check_bitwidths(np.random.default_rng(7))
    if bit_errors:
        failures["bitwidth"] = " | ".join(bit_errors[:6])
        print(f"FAIL bitwidth: {len(bit_errors)} mismatches: {failures['bitwidth']}", flush=True)
    cases = [*cases, "bitwidth"]
    passed = len(cases) - len(failures)
    if args.json is not None:
        command = shlex.join(["python", *(sys.argv if argv is None else [__file__, *argv])])
        record = {
            "check": "mq.quantize vs float64 reference (tests/quantizers/reference.py)",
            "provenance": provenance(command, wall_time_s=time.perf_counter() - start),
            "device_kind": jax.devices()[0].device_kind,
            "passed": passed,
            "failed": len(failures),
            "failures": failures,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1) + "\n")
    print(f"{passed} passed, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
