"""The ONNX export checked in onnxruntime (CPU): agreement with the Flax model, and sizes.

    python scripts/export_onnx_study.py --workdir RUN [--images 1000] [--size 224]
        [--out results/export_onnx.json]

Models checked:

* ``trained_run``: the model that the finished run ``RUN`` delivered, on the first
  ``--images`` test images of its own dataset;
* ``resnet20_u3``, ``resnet20_pow2``: ResNet-20 with every weight and activation quantized
  (learned U3 / P3 from 4 bits; pow2 with its logit scale), random init with random
  BatchNorm statistics, on synthetic 32×32 inputs;
* ``mobilenet_v2``, ``resnet18``: random init, U3 from 4 bits everywhere, random BatchNorm
  statistics, on synthetic ``--size``×``--size`` inputs.

Per model: ``top1_agreement`` (a fraction), ``num_images``, the logits' largest difference,
and the sizes: the ONNX file, its weight initializers (codes, scales, zero points, pow2
tables, float weights) and the accounted weight memory (docs/method.md §5), which differ
where ONNX rounds a layer's bits up to its integer type (3 bits → INT4). Writes the JSON
and a Markdown table beside it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from flax import nnx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def random_model(name: str, family: str, size: int):
    from mpdnn.models import build
    from mpdnn.nn import LogitScale, QuantConfig, Rule, quantize_model
    from tests.export.cases import randomize_batch_norms  # the export tests' statistics

    kwargs = {} if name == "resnet20" else {"input_shape": (size, size, 3)}
    model = build(name, rngs=nnx.Rngs(0), **kwargs)
    config = QuantConfig(family=family)
    quantize_model(model, [Rule(".*", config, kind=None)])
    randomize_batch_norms(model)
    if family == "pow2":
        model = LogitScale(model)
    return model


def check(model, images: np.ndarray, data: str, workdir: Path) -> dict:
    from mpdnn.export.to_onnx import compare_onnx, export_onnx

    start = time.perf_counter()
    sizes = export_onnx(model, workdir / "model.onnx")
    export_s = time.perf_counter() - start
    result = compare_onnx(model, sizes["path"], images)
    sizes.pop("path")
    return {**result, **sizes, "data": data, "export_s": round(export_s, 1)}


def markdown(record: dict) -> str:
    p = record["provenance"]
    lines = [
        "# ONNX export checked in onnxruntime (CPU)",
        "",
        f"`{p['command']}` at commit `{p['git_commit'][:10]}` on {p['machine']} "
        f"({p['cpus']} CPUs), {p['date_utc']} "
        f"(wall time {p['wall_time_s']:.0f} s); onnx {record['onnx']}, onnxruntime "
        f"{record['onnxruntime']}. Agreement: the share of images whose top-1 class "
        "onnxruntime and the jitted Flax model agree on.",
        "",
        "| model | images | top-1 agreement | logits bit-equal | max logit diff (of max) "
        "| ONNX file B | weight initializers B | accounted weights B | initializers / "
        "accounted |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in record["models"].items():
        ratio = r["weight_initializer_bytes"] / r["accounted_weight_bytes"]
        lines.append(
            f"| {name} ({r['data']}) | {r['num_images']} | {r['top1_agreement']:.4f} | "
            f"{r['logits_equal']} | {r['logits_max_abs_diff']:.3g} "
            f"({r['logits_max_abs']:.3g}) | {r['file_bytes']:,} | "
            f"{r['weight_initializer_bytes']:,} | {r['accounted_weight_bytes']:,.0f} | "
            f"{ratio:.3f} |"
        )
    trained = record["models"]["trained_run"].get("trained_with")
    if trained:
        lines += [
            "",
            f"`trained_run` was trained by `{trained['command']}` (commit "
            f"`{str(trained['git_commit'])[:10]}`, {trained['date_utc']}); its test error is "
            f"{record['models']['trained_run']['run'].get('test_error')}: a short run whose "
            "export is checked here, not a reproduction of the paper's accuracy.",
        ]
    lines += [
        "",
        "The initializers exceed the accounted memory where ONNX has no type of a layer's "
        "learned bits (3 → INT4, 5–7 → INT8) and by the per-tensor scales, zero points and "
        "pow2 lookup tables. `trained_run` is what the run delivered; the others are "
        "random-init networks with random BatchNorm statistics (an exporter check, not a "
        "trained accuracy).",
        "",
        "Where logits are not bit-equal: the first conv takes the unquantized image, so "
        "onnxruntime's and XLA's float32 sums round differently by an ulp or so; a value that "
        "lands that close to a rounding boundary of the first activation site takes the "
        "neighbouring code, and the difference travels on (docs/export.md says the same of the "
        "integer reference forward); `QuantizeLinear`'s halves-to-even is the other source. A "
        "random-init network's logits lie close together, so such a difference can flip its "
        "top-1 class (ResNet-18); the trained run's did not on any of the 1000 images.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, help="a finished training run")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--size", type=int, default=224, help="ImageNet nets' input size")
    parser.add_argument("--synthetic", type=int, default=64, help="synthetic images per net")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "export_onnx.json")
    parser.add_argument(
        "--markdown", action="store_true", help="only rewrite the .md from the existing JSON"
    )
    args = parser.parse_args(argv)
    if args.markdown:
        args.out.with_suffix(".md").write_text(markdown(json.loads(args.out.read_text())))
        return 0

    if args.workdir is None:
        parser.error("--workdir is required")
    import onnx
    import onnxruntime

    from mpdnn.export.cli import _test_images
    from mpdnn.export.run import load_run
    from mpdnn.provenance import provenance

    start = time.perf_counter()
    rng = np.random.default_rng(0)
    models = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model, run = load_run(args.workdir)
        images, data = _test_images(args.workdir, args.images)
        models["trained_run"] = {**check(model, images, data, tmp), "run": run}
        table = args.workdir / "table.json"  # how the run was trained, when it says
        if table.is_file():
            trained = json.loads(table.read_text()).get("provenance", {})
            models["trained_run"]["trained_with"] = {
                k: trained.get(k) for k in ("command", "git_commit", "date_utc", "wall_time_s")
            }
        print(f"trained_run: {models['trained_run']['top1_agreement']:.4f}", flush=True)
        for name, family, size in [
            ("resnet20_u3", "uniform", 32),
            ("resnet20_pow2", "pow2", 32),
            ("mobilenet_v2", "uniform", args.size),
            ("resnet18", "uniform", args.size),
        ]:
            model = random_model(name.removesuffix("_u3").removesuffix("_pow2"), family, size)
            x = rng.normal(size=(args.synthetic, size, size, 3)).astype(np.float32)
            models[name] = check(model, x, f"synthetic {size}×{size}", tmp)
            print(f"{name}: {models[name]['top1_agreement']:.4f}", flush=True)
    command = shlex.join(["python", "scripts/export_onnx_study.py", *(argv or sys.argv[1:])])
    record = {
        "provenance": provenance(command, wall_time_s=time.perf_counter() - start),
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "models": models,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1, allow_nan=False) + "\n")
    args.out.with_suffix(".md").write_text(markdown(record))
    print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
