"""ONNX export: the QDQ graph runs in onnxruntime and agrees with the Flax model."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from flax import nnx

from mpdnn import optim
from mpdnn.export import cli
from mpdnn.export.codec import ExportError
from mpdnn.export.to_onnx import compare_onnx, export_onnx, to_onnx
from mpdnn.models import build
from mpdnn.nn import QuantConfig, Rule, quantize_model
from tests.export.cases import randomize_batch_norms, resnet20

# The ONNX integer type (and its width) the rule gives b learned bits: the smallest
# of INT2, INT4, INT8, INT16, INT32 that holds them.
WIDTHS = (2, 4, 8, 16, 32)


def width(bits: int) -> int:
    return next(w for w in WIDTHS if bits <= w)


def random_images(n: int, shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, *shape)).astype(np.float32)


def initializer_types(proto) -> dict[str, int]:
    return {t.name: t.data_type for t in proto.graph.initializer}


@pytest.mark.parametrize("family", ["uniform", "pow2"])
def test_resnet20_agrees_with_flax_and_stores_the_learned_bits(family):
    config = QuantConfig(family=family)  # learned: U3 / P3, from 4 bits
    rules = [Rule(".*", config, kind="weight"), Rule(".*", config, kind="activation")]
    model = resnet20(rules, logit_scale=family == "pow2")
    proto, sizes = to_onnx(model)
    result = compare_onnx(model, proto, random_images(64, (32, 32, 3)))
    # Exact operations on both sides; only ties of QuantizeLinear's rounding could differ.
    assert result["top1_agreement"] == 1.0
    assert result["logits_max_abs_diff"] <= 1e-5 * result["logits_max_abs"]
    assert result["logits_max_abs"] > 0
    # The codes take each tensor's bits rounded up to its type, packed.
    rows = [r for r in optim.memory(model).rows if r.kind == "weight"]
    codes = {
        t.name.rsplit("_", 1)[0].removesuffix(".codes"): len(t.raw_data)
        for t in proto.graph.initializer
        if t.name.rsplit("_", 1)[0].endswith(".codes")
    }
    expected = {f"{r.path}.{r.tensor}": math.ceil(r.numel * width(int(r.bits)) / 8) for r in rows}
    assert codes == expected
    assert sizes["accounted_weight_bytes"] == sum(r.numel * int(r.bits) for r in rows) / 8
    assert sizes["weight_initializer_bytes"] >= sum(expected.values())


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet18"])
def test_imagenet_nets_run_with_every_integer_type(name):
    """2-bit (INT2), 3-bit (INT4) and 8-bit weights, 4- and 10-bit (UINT16) activations."""
    model = build(name, rngs=nnx.Rngs(0), input_shape=(64, 64, 3), num_classes=16)
    rules = [
        Rule(r"stem", QuantConfig(mode="fixed", bits=2), kind="weight"),
        Rule(r"head", QuantConfig(bits=8), kind="weight"),
        Rule(".*", QuantConfig(bits=3), kind="weight"),
        Rule(r"(blocks|stages)\.1\..*", QuantConfig(bits=10), kind="activation"),
        Rule(".*", QuantConfig(bits=4), kind="activation"),
    ]
    quantize_model(model, rules)
    randomize_batch_norms(model)
    proto, _ = to_onnx(model)
    types = initializer_types(proto)
    assert types["stem.kernel.codes_1"] == onnx.TensorProto.INT2  # the first initializer
    assert onnx.TensorProto.INT4 in types.values() and onnx.TensorProto.INT8 in types.values()
    assert onnx.TensorProto.UINT16 in types.values()  # a 10-bit site's zero point
    result = compare_onnx(model, proto, random_images(8, (64, 64, 3)))
    assert result["top1_agreement"] == 1.0 and result["logits_max_abs"] > 0
    assert result["logits_max_abs_diff"] <= 1e-4 * result["logits_max_abs"]


def test_a_float_model_exports_as_float_initializers():
    model = resnet20([])
    proto, sizes = to_onnx(model)
    assert {t.data_type for t in proto.graph.initializer} <= {
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.INT64,
    }
    assert sizes["weight_initializer_bytes"] == sizes["accounted_weight_bytes"]  # 32 bits
    result = compare_onnx(model, proto, random_images(16, (32, 32, 3)))
    assert result["top1_agreement"] == 1.0


def test_an_operation_without_a_rule_is_one_line():
    class Sorted(nnx.Module):
        input_shape = (4,)

        def __init__(self):
            self.inner = build("small_cnn", rngs=nnx.Rngs(0))

        def __call__(self, x):
            import jax.numpy as jnp

            return jnp.sort(x, axis=-1)

    with pytest.raises(ExportError, match=r"^the ONNX export has no rule for .*'sort'"):
        to_onnx(Sorted())


def test_the_trained_run_exports_and_verifies_from_the_command_line(run, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    argv = ["--workdir", str(run), "--format", "onnx", "--out", str(out), "--verify", "32"]
    assert cli.main([*argv, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["verify"]["num_images"] == 32
    assert result["verify"]["top1_agreement"] >= 0.999
    assert result["file_bytes"] == out.stat().st_size
    onnx.checker.check_model(onnx.load(out))
    assert cli.main(argv) == 0
    assert "top-1 agreement" in capsys.readouterr().out


def test_export_onnx_writes_what_to_onnx_builds(tmp_path):
    model = resnet20([Rule(".*", QuantConfig(), kind="weight")])
    result = export_onnx(model, tmp_path / "m.onnx")
    proto, sizes = to_onnx(model)
    assert (tmp_path / "m.onnx").read_bytes() == proto.SerializeToString()
    assert {k: result[k] for k in sizes} == sizes
