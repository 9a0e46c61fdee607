"""Load torchvision's float ResNet-18 / MobileNetV2 weights into our models, and back.

A torchvision state dict (what ``torch.save(model.state_dict(), path)`` writes) becomes the
parameters and BN statistics of our ``resnet18`` / ``mobilenet_v2``, whose topologies are
torchvision's (docs/method.md §7)::

    model = mpdnn.models.build("resnet18", rngs=nnx.Rngs(0))
    load_torchvision(model, "resnet18.pth")  # or .safetensors / .npz: no torch needed
    quantize_model(model, rules)  # weight quantizers start from the loaded weights (docs/method.md
    §4)

Load **before** :func:`~mpdnn.nn.quantize_model`: float-net init derives each weight
quantizer's step from the layer's weights at quantization time, so a quantized model is
refused rather than given weights its quantizers were not initialised from.

Layouts: conv ``OIHW`` → ``HWIO`` (a depthwise conv's ``(C, 1, kh, kw)`` becomes
``(kh, kw, 1, C)``, the kernel of a ``feature_group_count=C`` convolution); linear
``(out, in)`` → ``(in, out)``; BN ``weight``/``bias``/``running_mean``/``running_var`` →
``scale``/``bias``/``mean``/``var`` (same eps 1e-5; torch's momentum 0.1 is flax's 0.9).
``num_batches_tracked`` is accepted and dropped: torch only reads it when ``momentum=None``.
Inputs are NHWC here, NCHW in torch; torchvision's pretrained weights expect RGB normalised
by the ImageNet mean/std, which :func:`mpdnn.data.normalize_imagenet` applies (the same
constants, times 255).

Strict: every tensor of the state dict is used exactly once, every parameter and statistic
of the model is assigned, shapes are checked, and any mismatch is one ``ValueError`` line
naming the key; nothing is assigned unless everything fits. :func:`torchvision_names` gives
the name mapping, :func:`to_torchvision` the inverse (a state dict torch loads with
``strict=True``).

Only the ``.pth`` reader imports torch, lazily. To load without torch, convert once where
torch exists::

    np.savez("resnet18.npz", **{k: v.numpy() for k, v in tv_model.state_dict().items()})
    safetensors.torch.save_file(tv_model.state_dict(), "resnet18.safetensors")
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mpdnn.models.mobilenet_v2 import MobileNetV2
from mpdnn.models.resnet_imagenet import ResNetImageNet
from mpdnn.nn import QConv, QLinear, Quantizer

StateDict = Mapping[str, np.ndarray]

#: The ``torch.load``-able suffixes; ``.npz`` and ``.safetensors`` are read without torch.
TORCH_SUFFIXES = (".pth", ".pt")


def _oihw_to_hwio(w: np.ndarray) -> np.ndarray:
    return w.transpose(2, 3, 1, 0)


def _hwio_to_oihw(w: np.ndarray) -> np.ndarray:
    return w.transpose(3, 2, 0, 1)


def _same(w: np.ndarray) -> np.ndarray:
    return w


def _transpose(w: np.ndarray) -> np.ndarray:
    return w.T


# Per layer type: (our field, torch field, torch → ours, ours → torch).
_CONV = (("kernel", "weight", _oihw_to_hwio, _hwio_to_oihw), ("bias", "bias", _same, _same))
_LINEAR = (("kernel", "weight", _transpose, _transpose), ("bias", "bias", _same, _same))
_BN = (
    ("scale", "weight", _same, _same),
    ("bias", "bias", _same, _same),
    ("mean", "running_mean", _same, _same),
    ("var", "running_var", _same, _same),
)
_BN_COUNTER = "num_batches_tracked"


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One variable of our model and the torchvision tensor it comes from."""

    path: str  # ours, dotted: "stages.1.0.downsample.kernel"
    key: str  # torchvision's: "layer2.0.downsample.0.weight"
    variable: nnx.Variable
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]


def _resnet_layers(model: ResNetImageNet) -> Iterator[tuple[str, str]]:
    """(our module path, torchvision module path) of every conv, BN and linear layer."""
    yield "stem", "conv1"
    yield "stem_bn", "bn1"
    for i, stage in enumerate(model.stages):
        for j, block in enumerate(stage):
            ours, theirs = f"stages.{i}.{j}", f"layer{i + 1}.{j}"
            for name in ("conv1", "bn1", "conv2", "bn2"):
                yield f"{ours}.{name}", f"{theirs}.{name}"
            if block.downsample is not None:
                yield f"{ours}.downsample", f"{theirs}.downsample.0"
                yield f"{ours}.downsample_bn", f"{theirs}.downsample.1"
    yield "head", "fc"


def _mobilenet_layers(model: MobileNetV2) -> Iterator[tuple[str, str]]:
    """(our module path, torchvision module path) of every conv, BN and linear layer."""
    yield "stem", "features.0.0"
    yield "stem_bn", "features.0.1"
    for i, block in enumerate(model.blocks):
        # torchvision's block.conv: [Conv2dNormActivation(expand)], Conv2dNormActivation(dw),
        # project conv, BN; its features.0 is the stem, so our block i is features.{i + 1}.
        ours, theirs = f"blocks.{i}", f"features.{i + 1}.conv"
        convs = (["expand"] if block.expand is not None else []) + ["depthwise"]
        for k, conv in enumerate(convs):
            yield f"{ours}.{conv}", f"{theirs}.{k}.0"
            yield f"{ours}.{conv}_bn", f"{theirs}.{k}.1"
        yield f"{ours}.project", f"{theirs}.{len(convs)}"
        yield f"{ours}.project_bn", f"{theirs}.{len(convs) + 1}"
    last = len(model.blocks) + 1
    yield "final_conv", f"features.{last}.0"
    yield "final_bn", f"features.{last}.1"
    yield "head", "classifier.1"


def _dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _plan(model: nnx.Module) -> tuple[list[_Entry], list[str]]:
    """Every variable of ``model`` with its torchvision key, and the BN counter keys."""
    if isinstance(model, ResNetImageNet):
        layers = _resnet_layers(model)
    elif isinstance(model, MobileNetV2):
        layers = _mobilenet_layers(model)
    else:
        raise TypeError(
            f"torchvision conversion supports ResNetImageNet (resnet18) and MobileNetV2, "
            f"not {type(model).__name__}"
        )
    modules = {_dotted(p): m for p, m in nnx.iter_modules(model)}
    quantized = [p for p, m in modules.items() if isinstance(m, Quantizer) and m.config.quantized]
    if quantized:
        raise ValueError(
            f"model is already quantized ({quantized[0]}, ...): load float weights before "
            "quantize_model, so the weight quantizers initialise from them (docs/method.md §4)"
        )
    entries, counters = [], []
    for ours, theirs in layers:
        module = modules[ours]
        if isinstance(module, QConv):
            fields = _CONV
        elif isinstance(module, QLinear):
            fields = _LINEAR
        elif isinstance(module, nnx.BatchNorm):
            fields = _BN
            counters.append(f"{theirs}.{_BN_COUNTER}")
        else:
            raise TypeError(f"{ours}: no torchvision layout for {type(module).__name__}")
        for field, torch_field, to_ours, to_torch in fields:
            variable = getattr(module, field)
            if variable is not None:
                key = f"{theirs}.{torch_field}"
                entries.append(_Entry(f"{ours}.{field}", key, variable, to_ours, to_torch))
    # Every parameter and statistic of the model must be covered, each once.
    planned = {id(e.variable) for e in entries}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Variable) and id(node) not in planned:
            raise ValueError(f"{_dotted(path)}: no torchvision tensor maps to this variable")
    return entries, counters


def torchvision_names(model: nnx.Module) -> dict[str, str]:
    """``{our variable path: torchvision state-dict key}`` in torchvision's order, e.g.
    ``stages.1.0.downsample.kernel`` → ``layer2.0.downsample.0.weight``; BN counters
    (``num_batches_tracked``, dropped on load) are not listed."""
    entries, _ = _plan(model)
    return {e.path: e.key for e in entries}


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A state dict from ``.npz``, ``.safetensors`` or a torch ``.pth``/``.pt`` file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    if suffix == ".safetensors":
        try:
            from safetensors.numpy import load_file
        except ImportError:
            raise ImportError(
                f"{path}: reading .safetensors needs the safetensors package "
                "(pip install safetensors)"
            ) from None
        return load_file(path)
    if suffix in TORCH_SUFFIXES:
        return _read_torch(path)
    raise ValueError(
        f"{path}: unknown state-dict format {suffix!r}; expected .npz, .safetensors, "
        f"{', '.join(TORCH_SUFFIXES)}"
    )


def _read_torch(path: Path) -> dict[str, np.ndarray]:
    """``torch.load`` (tensors only, ``weights_only``) → numpy; the one place torch appears."""
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"{path}: reading a torch file needs torch; convert it once to .npz or "
            ".safetensors where torch exists (see mpdnn.models.convert)"
        ) from None
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, Mapping) or not all(torch.is_tensor(v) for v in obj.values()):
        what = f"keys {list(obj)[:4]}" if isinstance(obj, Mapping) else type(obj).__name__
        raise ValueError(
            f"{path}: expected a state dict of tensors, as torch.save(model.state_dict(), "
            f"path) writes; got {what}"
        )
    # numpy has no bfloat16; every other float dtype converts as it is.
    return {
        k: (v.float() if v.dtype == torch.bfloat16 else v).detach().cpu().numpy()
        for k, v in obj.items()
    }


def load_torchvision(model: nnx.Module, source: str | os.PathLike | StateDict) -> None:
    """Load a torchvision state dict (a file for :func:`read_state_dict`, or a mapping of
    arrays) into ``model`` (float, built by :func:`mpdnn.models.build`), in place.

    Raises ``ValueError`` naming the key for a missing, unexpected, misshapen or non-finite
    tensor; the model is left untouched then.
    """
    entries, counters = _plan(model)
    state = read_state_dict(source) if isinstance(source, str | os.PathLike) else source
    values = []
    for e in entries:
        if e.key not in state:
            raise ValueError(f"{e.key}: missing from the state dict (needed for {e.path})")
        theirs = np.asarray(state[e.key])
        want = e.variable.get_value().shape
        expected = e.to_torch(np.empty(want, np.bool_)).shape
        if theirs.shape != expected:
            raise ValueError(
                f"{e.key}: shape {theirs.shape} does not fit {e.path} {want} "
                f"(torch shape {expected} expected)"
            )
        if not np.issubdtype(theirs.dtype, np.floating):
            raise ValueError(f"{e.key}: expected floats for {e.path}, got {theirs.dtype}")
        if not np.isfinite(theirs).all():
            raise ValueError(f"{e.key}: non-finite values (for {e.path})")
        values.append(e.to_ours(theirs))
    for key in counters:
        if key in state and np.shape(state[key]) != ():
            raise ValueError(f"{key}: a BN counter must be a scalar, got {np.shape(state[key])}")
    used = {e.key for e in entries} | set(counters)
    unexpected = [k for k in state if k not in used]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise ValueError(f"{unexpected[0]}: unexpected key in the state dict{more}")
    for e, value in zip(entries, values, strict=True):
        dtype = e.variable.get_value().dtype
        e.variable.set_value(jnp.asarray(value, dtype=dtype))


def to_torchvision(model: nnx.Module) -> dict[str, np.ndarray]:
    """The torchvision state dict of ``model`` (float): what ``load_state_dict(strict=True)``
    of the torchvision model takes after ``torch.from_numpy``; BN counters are 0."""
    entries, counters = _plan(model)
    out: dict[str, np.ndarray] = {}
    for e in entries:
        out[e.key] = np.array(e.to_torch(np.asarray(e.variable.get_value())), order="C")
        counter = e.key.rsplit(".", 1)[0] + f".{_BN_COUNTER}"
        if e.key.endswith(".running_var") and counter in counters:
            out[counter] = np.zeros((), np.int64)  # torch's order: after running_var
    return out
