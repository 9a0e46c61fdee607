"""Host images/s of the streamed input pipeline (:class:`mpdnn.data.ImageNetBatches`).

Times whole epochs of training batches (random-resized crop + flip, normalised float32) on
two synthetic record sets, both built here from a fixed seed so every run sees the same
bytes:

* ``rgb32``: uint8 32×32×3 arrays cropped to 24×24, the synthetic RGB records the streamed
  tests use (``data.stream = True``; no JPEG decode, so this measures per-example overhead);
* ``jpeg``: 256×320 JPEG bytes (quality 90, smooth random images) cropped to 224×224, the
  work of one ImageNet training example (decode, crop, resize, flip).

Each case runs one untimed epoch, then ``--repeats`` timed ones; reported per case: the
median epoch time and host images/s (records / median). ``--worker-processes`` adds cases
that decode in that many worker processes (``worker_processes``, when the installed
ImageNetBatches has it). The last lines are one ``images/s`` per case.

    python scripts/bench_input.py [--workers 2] [--worker-processes 2] [--repeats 3]
        [--json PATH]
"""

from __future__ import annotations

import argparse
import inspect
import io
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from mpdnn.data import ImageNetBatches
from mpdnn.provenance import provenance


def smooth_images(n: int, height: int, width: int, seed: int) -> np.ndarray:
    """Random images upsampled from an 8×10 grid: JPEG sizes like a photograph's, not noise's."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (n, 8, 10, 3), dtype=np.uint8)
    return np.stack(
        [np.asarray(Image.fromarray(c).resize((width, height), Image.BILINEAR)) for c in coarse]
    )


def jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def record_sets(num_rgb: int, num_jpeg: int) -> dict[str, tuple[list[dict], int, int]]:
    """name → (records, crop size, global batch)."""
    rgb = np.random.default_rng(0).integers(0, 256, (num_rgb, 32, 32, 3), dtype=np.uint8)
    photos = smooth_images(num_jpeg, 256, 320, seed=1)
    return {
        "rgb32": ([{"image": x, "label": i % 10} for i, x in enumerate(rgb)], 24, 128),
        "jpeg": ([{"image": jpeg(x), "label": i % 10} for i, x in enumerate(photos)], 224, 32),
    }


def time_epochs(records, size, batch, repeats, **kwargs) -> list[float]:
    times = []
    for epoch in range(repeats + 1):
        batches = ImageNetBatches(records, batch, size=size, epoch=epoch, train=True, **kwargs)
        start = time.perf_counter()
        count = sum(len(labels) for _, labels in batches)
        elapsed = time.perf_counter() - start
        assert count == len(batches) * batch, (count, len(batches), batch)
        if epoch:  # the first epoch warms up (imports, worker start-up)
            times.append(elapsed)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="decoding threads")
    parser.add_argument(
        "--worker-processes", type=int, default=2, help="also time this many processes; 0: not"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rgb", type=int, default=4096, help="records of the rgb32 case")
    parser.add_argument("--jpeg", type=int, default=512, help="records of the jpeg case")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    has_processes = "worker_processes" in inspect.signature(ImageNetBatches).parameters
    variants = {"threads": {}}
    if args.worker_processes and has_processes:
        variants["processes"] = {"worker_processes": args.worker_processes}
    elif args.worker_processes:
        print("this ImageNetBatches has no worker_processes: threads only")

    wall = time.perf_counter()
    cases = []
    for name, (records, size, batch) in record_sets(args.rgb, args.jpeg).items():
        for variant, extra in variants.items():
            times = time_epochs(
                records, size, batch, args.repeats, num_workers=args.workers, **extra
            )
            median = statistics.median(times)
            case = {
                "records": name,
                "variant": variant,
                "num_workers": args.workers,
                **extra,
                "examples_per_epoch": len(records) // batch * batch,
                "global_batch": batch,
                "crop": size,
                "epoch_s": [round(t, 4) for t in times],
                "images_per_s": round(len(records) // batch * batch / median, 1),
            }
            cases.append(case)
            print(f"{name:6s} {variant:9s} {case['images_per_s']:10.1f} images/s", flush=True)
    command = "python scripts/bench_input.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    record = {
        "cases": cases,
        "provenance": provenance(command, wall_time_s=time.perf_counter() - wall),
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
