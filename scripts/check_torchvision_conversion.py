"""Check :mod:`mpdnn.models.convert` against torchvision: same logits after conversion.

For ResNet-18 and MobileNetV2: a torchvision model with its own random init (no pretrained
weights are downloaded) and every BN's affine and running statistics randomised, so that BN
is really exercised; its state dict is saved as ``.pth`` (and ``.npz``, ``.safetensors``
where the package exists), loaded into our model built by :func:`mpdnn.models.build`, and
the eval-mode logits on a random ``(batch, 3, size, size)`` input (NCHW for torch, NHWC for
ours) compared: max abs difference and relative error (max abs difference over max
|torch logit|). The export is checked too: :func:`~mpdnn.models.convert.to_torchvision` of
our model loads into a fresh torchvision model with ``strict=True`` and gives our logits.
Exits 1 unless every max abs difference is at most ``--tolerance`` (default 1e-4).

Needs torch and torchvision (not dependencies of mpdnn); on this project's machines::

    /work/tvenv/bin/python scripts/check_torchvision_conversion.py \
        [--batch 2] [--size 224] [--out results/convert_torchvision]

writes ``<out>.json`` (numbers and provenance) and ``<out>.md`` (the table).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
import torch
import torchvision
from flax import nnx

from mpdnn.models import build
from mpdnn.models.convert import load_torchvision, to_torchvision
from mpdnn.provenance import provenance

MODELS = ("resnet18", "mobilenet_v2")


def torchvision_model(name: str, seed: int) -> torch.nn.Module:
    """torchvision's random init, with BN affine and statistics and linear biases randomised."""
    torch.manual_seed(seed)
    net = getattr(torchvision.models, name)(weights=None)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
                m.running_mean.normal_(0.0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(123)
            elif isinstance(m, torch.nn.Linear):
                m.bias.normal_(0.0, 0.2)
    return net.eval()


def our_logits(model: nnx.Module, x_nchw: np.ndarray) -> np.ndarray:
    model.eval()
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    return np.asarray(forward(state, jnp.asarray(x_nchw.transpose(0, 2, 3, 1))))


def check(name: str, *, batch: int, size: int, seed: int, workdir: Path) -> dict:
    net = torchvision_model(name, seed)
    state = net.state_dict()
    files = {"pth": workdir / f"{name}.pth", "npz": workdir / f"{name}.npz"}
    torch.save(state, files["pth"])
    np.savez(files["npz"], **{k: v.numpy() for k, v in state.items()})
    try:
        import safetensors.torch

        files["safetensors"] = workdir / f"{name}.safetensors"
        safetensors.torch.save_file(state, files["safetensors"])
    except ImportError:
        pass

    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        expected = net(x).numpy()

    row: dict = {"model": name, "input": [batch, 3, size, size], "tensors": len(state)}
    models = {}
    for fmt, path in files.items():
        model = build(name, rngs=nnx.Rngs(seed))
        start = time.perf_counter()
        load_torchvision(model, path)
        row[f"load_{fmt}_s"] = round(time.perf_counter() - start, 3)
        models[fmt] = model
    reference = jax.tree.leaves(nnx.state(models["pth"]))
    row["formats_identical"] = all(
        all(
            np.array_equal(a, b)
            for a, b in zip(reference, jax.tree.leaves(nnx.state(m)), strict=True)
        )
        for m in models.values()
    )

    got = our_logits(models["pth"], x.numpy())
    diff = np.abs(got - expected)
    row["max_abs_diff"] = float(diff.max())
    row["mean_abs_diff"] = float(diff.mean())
    row["max_abs_logit"] = float(np.abs(expected).max())
    row["relative_error"] = row["max_abs_diff"] / row["max_abs_logit"]
    row["argmax_agree"] = bool((got.argmax(-1) == expected.argmax(-1)).all())

    # Back to torch: our export loads strictly into a fresh torchvision model.
    fresh = getattr(torchvision.models, name)(weights=None)
    fresh.load_state_dict(
        {k: torch.from_numpy(v) for k, v in to_torchvision(models["pth"]).items()}, strict=True
    )
    with torch.no_grad():
        back = fresh.eval()(x).numpy()
    row["export_max_abs_diff"] = float(np.abs(back - got).max())
    return row


def markdown(record: dict) -> str:
    p = record["provenance"]
    lines = [
        "# torchvision → mpdnn conversion check",
        "",
        "torchvision models with their own random init and every BN's affine and running "
        "statistics randomised (no pretrained weights), saved as a state dict, loaded by "
        "`mpdnn.models.convert.load_torchvision`; eval-mode logits on one random "
        f"{'×'.join(map(str, record['rows'][0]['input']))} input (NCHW for torch, NHWC for "
        "ours). Relative error = max abs diff / max |torch logit|. `export` = "
        "`to_torchvision` of our model loaded into a fresh torchvision model "
        "(`strict=True`), max abs diff of its logits from ours.",
        "",
        "| model | tensors | max abs diff | relative error | max abs logit "
        "| argmax agree | export max abs diff | .pth/.npz/.safetensors identical |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in record["rows"]:
        lines.append(
            f"| {r['model']} | {r['tensors']} | {r['max_abs_diff']:.2e} "
            f"| {r['relative_error']:.2e} | {r['max_abs_logit']:.3g} | {r['argmax_agree']} "
            f"| {r['export_max_abs_diff']:.2e} | {r['formats_identical']} |"
        )
    lines += [
        "",
        f"Tolerance {record['tolerance']:g}: **{'passed' if record['passed'] else 'FAILED'}**.",
        "",
        f"torch {record['torch_version']}, torchvision {record['torchvision_version']}, "
        f"jax {p['jax_version']}, flax {record['flax_version']}; {p['machine']} "
        f"({p['device_kind']}, {p['cpus']} CPUs); {p['date_utc']}; wall time "
        f"{p['wall_time_s']} s; seed {p['seed']}; commit {p['git_commit']}"
        + (" (uncommitted changes)" if p["uncommitted"] else "")
        + ".",
        "",
        f"Command: `{p['command']}`",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--out", default="results/convert_torchvision")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [
            check(name, batch=args.batch, size=args.size, seed=args.seed, workdir=Path(tmp))
            for name in args.models.split(",")
        ]
    for r in rows:
        print(
            f"{r['model']}: max abs diff {r['max_abs_diff']:.3e}, relative "
            f"{r['relative_error']:.3e}, export {r['export_max_abs_diff']:.3e}"
        )
    passed = all(
        r["max_abs_diff"] <= args.tolerance
        and r["export_max_abs_diff"] <= args.tolerance
        and r["argmax_agree"]
        and r["formats_identical"]
        for r in rows
    )
    command = shlex.join(["python", *(sys.argv if argv is None else [__file__, *argv])])
    record = {
        "rows": rows,
        "tolerance": args.tolerance,
        "passed": passed,
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "flax_version": flax.__version__,
        "provenance": provenance(command, wall_time_s=time.perf_counter() - start, seed=args.seed),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(record))
    print(f"{'passed' if passed else 'FAILED'}; wrote {out}.json and {out}.md")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
