"""torchvision state dicts → our ResNet-18 / MobileNetV2 (:mod:`mpdnn.models.convert`).

Torch-free (run in CI): the expected torchvision keys and shapes are written out here from
the architecture tables in torchvision's naming; a random state dict in that layout is
loaded and the model's logits are compared with a plain-numpy forward pass that follows
torchvision's definitions (NCHW, OIHW, ``y = x Wᵀ + b``) directly on the state dict, so a
wrong transpose, a swapped BN field or a misplaced block cannot pass. With torchvision
installed, the same holds against torchvision's own models (random init, BN randomised).
"""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mpdnn.models import build
from mpdnn.models.convert import (
    load_torchvision,
    read_state_dict,
    to_torchvision,
    torchvision_names,
)
from mpdnn.models.mobilenet_v2 import INVERTED_RESIDUAL_SETTING
from mpdnn.nn import QuantConfig, Quantizer, Rule, quantize_model

EPS = 1e-5  # torch's and our BN epsilon
BN_FIELDS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
# Entries of torchvision 0.29's state_dict(): 20 convs + 20 BNs × 5 + fc weight and bias;
# 52 convs + 52 BNs × 5 + classifier weight and bias.
STATE_DICT_SIZES = {"resnet18": 122, "mobilenet_v2": 314}


# --------------------------------------------------------------------------------------------
# torchvision's keys and shapes, from the architecture tables.


def _bn(prefix: str, channels: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.{f}": (() if f == "num_batches_tracked" else (channels,)) for f in BN_FIELDS}


def resnet18_keys(classes: int = 1000) -> dict[str, tuple[int, ...]]:
    keys = {"conv1.weight": (64, 3, 7, 7), **_bn("bn1", 64)}
    cin = 64
    for stage, width in enumerate((64, 128, 256, 512), start=1):
        for b in range(2):
            p = f"layer{stage}.{b}"
            keys[f"{p}.conv1.weight"] = (width, cin, 3, 3)
            keys |= _bn(f"{p}.bn1", width)
            keys[f"{p}.conv2.weight"] = (width, width, 3, 3)
            keys |= _bn(f"{p}.bn2", width)
            if b == 0 and stage > 1:
                keys[f"{p}.downsample.0.weight"] = (width, cin, 1, 1)
                keys |= _bn(f"{p}.downsample.1", width)
            cin = width
    return keys | {"fc.weight": (classes, 512), "fc.bias": (classes,)}


def mobilenet_v2_blocks():
    """(features index, expansion, in, out, stride) of torchvision's inverted residuals."""
    index, cin = 1, 32
    for t, c, n, s in INVERTED_RESIDUAL_SETTING:
        for j in range(n):
            yield index, t, cin, c, s if j == 0 else 1
            index, cin = index + 1, c


def mobilenet_v2_keys(classes: int = 1000) -> dict[str, tuple[int, ...]]:
    keys = {"features.0.0.weight": (32, 3, 3, 3), **_bn("features.0.1", 32)}
    for index, t, cin, cout, _ in mobilenet_v2_blocks():
        p, hidden, k = f"features.{index}.conv", cin * t, 0
        if t != 1:
            keys[f"{p}.0.0.weight"] = (hidden, cin, 1, 1)
            keys |= _bn(f"{p}.0.1", hidden)
            k = 1
        keys[f"{p}.{k}.0.weight"] = (hidden, 1, 3, 3)
        keys |= _bn(f"{p}.{k}.1", hidden)
        keys[f"{p}.{k + 1}.weight"] = (cout, hidden, 1, 1)
        keys |= _bn(f"{p}.{k + 2}", cout)
    keys["features.18.0.weight"] = (1280, 320, 1, 1)
    keys |= _bn("features.18.1", 1280)
    return keys | {"classifier.1.weight": (classes, 1280), "classifier.1.bias": (classes,)}


KEYS = {"resnet18": resnet18_keys, "mobilenet_v2": mobilenet_v2_keys}


def random_state_dict(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    """He-scaled weights and randomised BN, so activations stay O(1) and BN is exercised."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in shapes.items():
        field = key.rsplit(".", 1)[1]
        if field == "num_batches_tracked":
            value = np.asarray(rng.integers(0, 1000), np.int64)
        elif field == "running_var":
            value = rng.uniform(0.5, 2.0, shape)
        elif field == "weight" and len(shape) == 1:  # BN scale
            value = rng.uniform(0.5, 1.5, shape)
        elif field in ("bias", "running_mean"):
            value = rng.normal(0.0, 0.2, shape)
        else:  # conv or linear weight, fan-in He scale
            value = rng.normal(0.0, math.sqrt(2.0 / math.prod(shape[1:])), shape)
        out[key] = value if field == "num_batches_tracked" else value.astype(np.float32)
    return out


# --------------------------------------------------------------------------------------------
# torchvision's forward pass, in numpy on the state dict (float64).


def conv(x: np.ndarray, w: np.ndarray, stride: int, pad: int, groups: int = 1) -> np.ndarray:
    """torch.nn.functional.conv2d: NCHW input, OIHW weight, cross-correlation."""
    n, _, h, wd = x.shape
    out_ch, in_per_group, kh, kw = w.shape
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    ho, wo = (h + 2 * pad - kh) // stride + 1, (wd + 2 * pad - kw) // stride + 1
    y = np.zeros((n, out_ch, ho, wo))
    per_group = out_ch // groups
    for g in range(groups):
        xg = x[:, g * in_per_group : (g + 1) * in_per_group]
        wg = w[g * per_group : (g + 1) * per_group]
        for i in range(kh):
            for j in range(kw):
                patch = xg[:, :, i : i + stride * ho : stride, j : j + stride * wo : stride]
                y[:, g * per_group : (g + 1) * per_group] += np.einsum(
                    "nchw,oc->nohw", patch, wg[:, :, i, j]
                )
    return y


def bn(x: np.ndarray, sd: dict, prefix: str) -> np.ndarray:
    """torch BatchNorm2d in eval mode."""

    def c(f):
        return sd[f"{prefix}.{f}"].astype(np.float64)[None, :, None, None]

    return (x - c("running_mean")) / np.sqrt(c("running_var") + EPS) * c("weight") + c("bias")


def max_pool_3x3_s2_p1(x: np.ndarray) -> np.ndarray:
    n, ch, h, w = x.shape
    x = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    windows = [x[:, :, i : i + 2 * ho : 2, j : j + 2 * wo : 2] for i in range(3) for j in range(3)]
    return np.max(windows, axis=0)


def relu(x):
    return np.maximum(x, 0.0)


def relu6(x):
    return np.clip(x, 0.0, 6.0)


def linear(x: np.ndarray, sd: dict, prefix: str) -> np.ndarray:
    return x @ sd[f"{prefix}.weight"].T.astype(np.float64) + sd[f"{prefix}.bias"]


def resnet18_reference(sd: dict, x: np.ndarray) -> np.ndarray:
    w = {k: v.astype(np.float64) for k, v in sd.items()}
    x = max_pool_3x3_s2_p1(relu(bn(conv(x, w["conv1.weight"], 2, 3), sd, "bn1")))
    for stage in range(1, 5):
        for b in range(2):
            p, stride = f"layer{stage}.{b}", 2 if (stage > 1 and b == 0) else 1
            y = relu(bn(conv(x, w[f"{p}.conv1.weight"], stride, 1), sd, f"{p}.bn1"))
            y = bn(conv(y, w[f"{p}.conv2.weight"], 1, 1), sd, f"{p}.bn2")
            if f"{p}.downsample.0.weight" in sd:
                x = bn(conv(x, w[f"{p}.downsample.0.weight"], stride, 0), sd, f"{p}.downsample.1")
            x = relu(y + x)
    return linear(x.mean(axis=(2, 3)), sd, "fc")


def mobilenet_v2_reference(sd: dict, x: np.ndarray) -> np.ndarray:
    w = {k: v.astype(np.float64) for k, v in sd.items()}
    x = relu6(bn(conv(x, w["features.0.0.weight"], 2, 1), sd, "features.0.1"))
    for index, t, cin, cout, stride in mobilenet_v2_blocks():
        p, y, k = f"features.{index}.conv", x, 0
        if t != 1:
            y = relu6(bn(conv(y, w[f"{p}.0.0.weight"], 1, 0), sd, f"{p}.0.1"))
            k = 1
        y = relu6(bn(conv(y, w[f"{p}.{k}.0.weight"], stride, 1, groups=cin * t), sd, f"{p}.{k}.1"))
        y = bn(conv(y, w[f"{p}.{k + 1}.weight"], 1, 0), sd, f"{p}.{k + 2}")
        x = x + y if (stride == 1 and cin == cout) else y
    x = relu6(bn(conv(x, w["features.18.0.weight"], 1, 0), sd, "features.18.1"))
    return linear(x.mean(axis=(2, 3)), sd, "classifier.1")


REFERENCES = {"resnet18": resnet18_reference, "mobilenet_v2": mobilenet_v2_reference}


def logits(model: nnx.Module, x_nchw: np.ndarray) -> np.ndarray:
    """Eval-mode logits of our NHWC model for an NCHW batch."""
    model.eval()
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    return np.asarray(forward(state, jnp.asarray(x_nchw.transpose(0, 2, 3, 1), jnp.float32)))


def variables(model: nnx.Module) -> list[np.ndarray]:
    return [np.asarray(v) for v in jax.tree.leaves(nnx.state(model))]


# --------------------------------------------------------------------------------------------
# Torch-free tests.


@pytest.fixture(scope="module", params=list(KEYS))
def name(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def model(name) -> nnx.Module:
    """A float model; tests that load into it restore it (or fail before assigning)."""
    return build(name, rngs=nnx.Rngs(0))


def test_names_and_shapes_are_torchvisions(name, model):
    expected = KEYS[name]()
    assert len(expected) == STATE_DICT_SIZES[name]
    exported = to_torchvision(model)
    assert list(exported) == list(expected)  # same keys, in torchvision's order
    assert {k: v.shape for k, v in exported.items()} == expected
    names = torchvision_names(model)
    assert len(set(names.values())) == len(names) == len(jax.tree.leaves(nnx.state(model)))
    counters = {k for k in expected if k.endswith("num_batches_tracked")}
    assert set(names.values()) == set(expected) - counters


def test_spot_layouts():
    """Element by element, with explicit indices rather than a transpose."""
    sd = random_state_dict(mobilenet_v2_keys(), seed=1)
    model = build("mobilenet_v2", rngs=nnx.Rngs(0))
    load_torchvision(model, sd)
    dw = sd["features.2.conv.1.0.weight"]  # block 1's depthwise, 96 channels
    assert model.blocks[1].depthwise.kernel[2, 0, 0, 95] == dw[95, 0, 2, 0]
    expand = sd["features.2.conv.0.0.weight"]  # (96, 16, 1, 1)
    assert model.blocks[1].expand.kernel[0, 0, 15, 7] == expand[7, 15, 0, 0]
    assert model.stem.kernel[1, 2, 0, 31] == sd["features.0.0.weight"][31, 0, 1, 2]
    assert model.head.kernel[1279, 3] == sd["classifier.1.weight"][3, 1279]
    assert model.final_bn.var[5] == sd["features.18.1.running_var"][5]
    assert model.final_bn.scale[5] == sd["features.18.1.weight"][5]


def test_logits_match_numpy_torchvision_reference(name, tmp_path):
    """Through an .npz on disk; 32×32 keeps the numpy reference cheap."""
    sd = random_state_dict(KEYS[name](), seed=2)
    np.savez(tmp_path / "sd.npz", **sd)
    model = build(name, rngs=nnx.Rngs(0))
    load_torchvision(model, tmp_path / "sd.npz")
    x = np.random.default_rng(3).normal(size=(2, 3, 32, 32)).astype(np.float32)
    expected = REFERENCES[name](sd, x.astype(np.float64))
    got = logits(model, x)
    scale = np.abs(expected).max()
    assert scale > 0.1  # the reference is not trivially small
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4 * scale)


def test_round_trip_through_npz(name, model, tmp_path):
    np.savez(tmp_path / "ours.npz", **to_torchvision(model))
    other = build(name, rngs=nnx.Rngs(7))
    load_torchvision(other, tmp_path / "ours.npz")
    for a, b in zip(variables(model), variables(other), strict=True):
        np.testing.assert_array_equal(a, b)


def test_reads_safetensors(name, model, tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    safetensors_numpy.save_file(to_torchvision(model), tmp_path / "ours.safetensors")
    np.testing.assert_equal(read_state_dict(tmp_path / "ours.safetensors"), to_torchvision(model))


def _drop(key):
    def edit(sd):
        del sd[key]

    return edit


def _set(key, value):
    def edit(sd):
        sd[key] = value(sd)

    return edit


BAD = {
    "missing": (_drop("layer3.1.bn2.running_var"), "layer3.1.bn2.running_var: missing"),
    "unexpected": (_set("layer5.0.conv1.weight", lambda sd: sd["conv1.weight"]), "layer5.0."),
    "fc not transposed": (_set("fc.weight", lambda sd: sd["fc.weight"].T), "fc.weight: shape"),
    "conv in HWIO": (
        _set("conv1.weight", lambda sd: sd["conv1.weight"].transpose(2, 3, 1, 0)),
        "conv1.weight: shape (7, 7, 3, 64) does not fit stem.kernel (7, 7, 3, 64)",
    ),
    "classes": (_set("fc.bias", lambda sd: sd["fc.bias"][:10]), "fc.bias: shape (10,)"),
    "nan": (
        _set("bn1.running_var", lambda sd: np.full(64, np.nan, np.float32)),
        "bn1.running_var: non-finite values",
    ),
    "integer weight": (
        _set("layer1.0.conv1.weight", lambda sd: sd["layer1.0.conv1.weight"].astype(np.int32)),
        "layer1.0.conv1.weight: expected floats",
    ),
    "counter": (
        _set("bn1.num_batches_tracked", lambda sd: np.zeros(3, np.int64)),
        "bn1.num_batches_tracked: a BN counter must be a scalar",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_state_dicts_name_the_key_and_change_nothing(case):
    edit, message = BAD[case]
    model = build("resnet18", rngs=nnx.Rngs(0))
    before = variables(model)
    sd = random_state_dict(resnet18_keys(), seed=4)
    edit(sd)
    with pytest.raises(ValueError) as err:
        load_torchvision(model, sd)
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)
    for a, b in zip(before, variables(model), strict=True):
        np.testing.assert_array_equal(a, b)


def test_counters_are_optional():
    sd = random_state_dict(resnet18_keys(), seed=5)
    sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    model = build("resnet18", rngs=nnx.Rngs(0))
    load_torchvision(model, sd)
    np.testing.assert_array_equal(
        model.stages[3][0].downsample_bn.mean, sd["layer4.0.downsample.1.running_mean"]
    )


def test_refuses_quantized_model_and_other_networks(tmp_path):
    model = build("resnet18", rngs=nnx.Rngs(0))
    quantize_model(model, [Rule(".*", QuantConfig(bits=4), kind="weight")])
    sd = random_state_dict(resnet18_keys(), seed=6)
    with pytest.raises(ValueError, match="already quantized .* before quantize_model"):
        load_torchvision(model, sd)
    with pytest.raises(TypeError, match="not ResNetCifar"):
        load_torchvision(build("resnet20", rngs=nnx.Rngs(0)), sd)
    with pytest.raises(ValueError, match="unknown state-dict format '.h5'"):
        load_torchvision(build("resnet18", rngs=nnx.Rngs(0)), tmp_path / "w.h5")


def test_float_net_init_uses_the_loaded_weights():
    """Load, then quantize: each weight quantizer starts from the loaded kernel (docs/method.md
    §4).
    """
    config = QuantConfig(bits=4)
    sd = random_state_dict(resnet18_keys(), seed=8)
    sd["fc.weight"] *= 10.0  # a max |W| no random init of ours would give
    model = build("resnet18", rngs=nnx.Rngs(0))
    load_torchvision(model, sd)
    quantize_model(model, [Rule(".*", config, kind="weight")])
    loaded = jnp.asarray(sd["fc.weight"].T)
    expected = Quantizer(config, kind="weight", init_from=loaded).theta()
    got = model.head.kernel_quant.theta()
    assert set(got) == set(expected)
    for k in expected:
        np.testing.assert_array_equal(got[k], expected[k])


def test_importing_the_library_does_not_import_torch():
    """torch is imported only inside the .pth reader (meaningful where torch is installed)."""
    code = "import sys, mpdnn.models; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --------------------------------------------------------------------------------------------
# Against torchvision itself (skipped where torch is not installed, as in CI).


@pytest.fixture(scope="module")
def torchvision():
    return pytest.importorskip("torchvision")


def torchvision_model(torchvision, name: str, seed: int):
    """The check script's torchvision model: its own random init, BN affine, statistics and
    linear biases randomised (one definition for the script and the tests)."""
    path = Path(__file__).resolve().parents[2] / "scripts" / "check_torchvision_conversion.py"
    spec = importlib.util.spec_from_file_location("check_torchvision_conversion", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script.torchvision_model(name, seed)


def test_torchvision_logits(torchvision, name, tmp_path):
    import torch

    net = torchvision_model(torchvision, name, seed=0)
    torch.save(net.state_dict(), tmp_path / "tv.pth")
    model = build(name, rngs=nnx.Rngs(0))
    load_torchvision(model, tmp_path / "tv.pth")
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = net(x).numpy()
    got = logits(model, x.numpy())
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_export_loads_into_torchvision(torchvision, name, model):
    import torch

    net = getattr(torchvision.models, name)(weights=None)
    exported = {k: torch.from_numpy(v) for k, v in to_torchvision(model).items()}
    net.load_state_dict(exported, strict=True)
    x = np.random.default_rng(9).normal(size=(2, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        expected = net.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(logits(model, x), expected, rtol=0, atol=1e-4)
