"""Host images/s of the streamed input pipeline (:class:`mpdnn.data.ImageNetBatches`).

Times whole epochs of training batches (random-resized crop + flip, normalised float32) on
two synthetic record sets, both built here from a fixed seed so every run sees the same
bytes:

* ``rgb32``: uint8 32×32×3 arrays cropped to 24×24, the synthetic RGB records the streamed
  tests use (``data.stream = True``; no JPEG decode, so this measures per-example overhead);
* ``jpeg``: 256×320 JPEG bytes (quality 90, smooth random images) cropped to 224×224, the
  work of one ImageNet training example (decode, crop, resize, flip).

Per record set, every pipeline runs one untimed epoch, then ``--repeats`` rounds of one
timed epoch each, the pipelines in turn within a round (so machine noise hits them alike).
Reported per pipeline: the median epoch time, host images/s (records / median), and, with
``--baseline``, the median of same-round speed ratios against it. Pipelines: ``threads``
(this checkout's :class:`~mpdnn.data.ImageNetBatches`), ``processes`` (the same with
``--worker-processes`` worker processes, when it has them), and ``baseline``: the
ImageNetBatches of another file or of an earlier commit's ``mpdnn/data/imagenet.py``
(``--baseline baa87ec:mpdnn/data/imagenet.py``, the threaded batcher grain replaced).

    python scripts/bench_input.py [--workers 2] [--worker-processes 2] [--repeats 5]
        [--baseline COMMIT:mpdnn/data/imagenet.py] [--json PATH]
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import io
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from mpdnn.data import ImageNetBatches
from mpdnn.provenance import provenance

REPO = Path(__file__).resolve().parents[1]


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


def load_baseline(where: str):
    """The ImageNetBatches class defined in the file ``where``, or in ``COMMIT:PATH`` of this
    checkout's git history."""
    path = Path(where)
    if not path.is_file() and ":" in where:
        source = subprocess.run(
            ["git", "show", where], capture_output=True, text=True, check=True, cwd=REPO
        ).stdout
        path = Path(tempfile.mkdtemp()) / "baseline_imagenet.py"
        path.write_text(source)
    spec = importlib.util.spec_from_file_location("baseline_imagenet", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ImageNetBatches


def epoch_seconds(factory, records, size, batch, epoch) -> float:
    batches = factory(records, batch, size=size, epoch=epoch, train=True)
    start = time.perf_counter()
    count = sum(len(labels) for _, labels in batches)
    elapsed = time.perf_counter() - start
    assert count == len(batches) * batch, (count, len(batches), batch)
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="decoding threads")
    parser.add_argument(
        "--worker-processes", type=int, default=2, help="also time this many processes; 0: not"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rgb", type=int, default=8192, help="records of the rgb32 case")
    parser.add_argument("--jpeg", type=int, default=1024, help="records of the jpeg case")
    parser.add_argument(
        "--baseline", help="a file, or COMMIT:PATH, defining another ImageNetBatches"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    workers = {"num_workers": args.workers}
    pipelines = {"threads": partial(ImageNetBatches, **workers)}
    if args.worker_processes:
        if "worker_processes" in inspect.signature(ImageNetBatches).parameters:
            processes = {"worker_processes": args.worker_processes}
            pipelines["processes"] = partial(ImageNetBatches, **workers, **processes)
        else:
            print("this ImageNetBatches has no worker_processes: threads only")
    if args.baseline:
        pipelines["baseline"] = partial(load_baseline(args.baseline), **workers)

    wall = time.perf_counter()
    cases = []
    for name, (records, size, batch) in record_sets(args.rgb, args.jpeg).items():
        times = {pipeline: [] for pipeline in pipelines}
        for epoch in range(args.repeats + 1):
            for pipeline, factory in pipelines.items():
                seconds = epoch_seconds(factory, records, size, batch, epoch)
                if epoch:  # the first round warms up (imports, worker start-up)
                    times[pipeline].append(seconds)
        examples = len(records) // batch * batch
        for pipeline, seconds in times.items():
            case = {
                "records": name,
                "pipeline": pipeline,
                "num_workers": args.workers,
                "examples_per_epoch": examples,
                "global_batch": batch,
                "crop": size,
                "epoch_s": [round(t, 4) for t in seconds],
                "images_per_s": round(examples / statistics.median(seconds), 1),
            }
            if pipeline == "processes":
                case["worker_processes"] = args.worker_processes
            line = f"{name:6s} {pipeline:9s} {case['images_per_s']:10.1f} images/s"
            if "baseline" in times and pipeline != "baseline":
                paired = [b / a for a, b in zip(seconds, times["baseline"], strict=True)]
                case["speed_vs_baseline_paired"] = round(statistics.median(paired), 3)
                line += f"  {case['speed_vs_baseline_paired']:.3f}x baseline (paired)"
            cases.append(case)
            print(line, flush=True)
    command = "python scripts/bench_input.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    record = {
        "cases": cases,
        "baseline": args.baseline,
        "provenance": provenance(command, wall_time_s=time.perf_counter() - wall),
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
