"""mpdnn.export.mpq: one bitstream for every tensor, payload size = the accounting's memory.

Expected sizes come from docs/method.md §5's counts and from :func:`mpdnn.optim.memory`,
expected bytes from the file format's definition; never from the exporter.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import mpdnn.quantizers as mq
from mpdnn import export as ex
from mpdnn import optim
from mpdnn.export import codec
from mpdnn.nn import QuantConfig, Rule
from tests.export.cases import NUM_WEIGHTS_RESNET20, quantized_values, resnet20, round_trip


@pytest.mark.parametrize("chunk", [None, 5])
def test_one_bitstream_for_mixed_tensors(tmp_path, monkeypatch, chunk):
    """Tensors of 2..8 bits, pow2 and float32 share one stream: no per-tensor padding (and
    the packer's chunking, forced small here, changes nothing)."""
    if chunk:
        monkeypatch.setattr(codec, "_CHUNK", chunk)
    rng = np.random.default_rng(0)
    tensors, expected, total_bits = [], {}, 0
    d, spec = 0.25, mq.weight_spec("uniform")
    first = ex.encode_weight("first", np.float32([1, -1, 3]) * d, {"d": d, "qmax": 3 * d}, spec)
    tensors.append(first)
    expected["first"] = np.float32([1, -1, 3]) * d
    total_bits += 3 * 3
    for bits in range(2, 9):
        theta = {"d": d, "qmax": d * (2 ** (bits - 1) - 1)}
        w = rng.normal(0, 2, 11 + bits).astype(np.float32)  # odd sizes: unaligned offsets
        tensors.append(ex.encode_weight(f"u{bits}", w, theta, spec))
        expected[f"u{bits}"] = quantized_values(w, theta, spec)
        total_bits += w.size * bits
    p2 = mq.weight_spec("pow2")
    w = rng.normal(0, 1, 13).astype(np.float32)
    tensors.append(ex.encode_weight("p3", w, {"qmin": 2.0**-3, "qmax": 1.0}, p2))
    expected["p3"] = quantized_values(w, {"qmin": 2.0**-3, "qmax": 1.0}, p2)
    total_bits += 13 * 3
    w = rng.normal(0, 1, 5).astype(np.float32)
    tensors.append(ex.encode_weight("float", w, None, None))
    expected["float"] = w
    total_bits += 5 * 32
    sizes, loaded = round_trip(tmp_path, tensors)
    assert loaded.payload_bits == sizes["payload_bits"] == total_bits
    assert sizes["payload_bytes"] == math.ceil(total_bits / 8)
    for name, values in expected.items():
        np.testing.assert_array_equal(loaded.weights[name].values, values, err_msg=name)
    # [1, -1, 3] at 3 bits: codes 001, 111, 011, least significant bit first.
    data = (tmp_path / "t.mpq").read_bytes()
    assert data[loaded.header_bytes : loaded.header_bytes + 1] == bytes([0b11111001])
    assert len(data) == loaded.file_bytes == sizes["file_bytes"]
    assert data[:8] == b"MPDNNMPQ" and sizes["fixed_header_bytes"] == 32


def test_float_and_fixed_2bit_resnet20_payloads_are_spec_sizes(tmp_path):
    # docs/method.md §5: 268,346 weights -> 1048.2 KB at 32 bits, 65.5 KB at 2 bits.
    model = resnet20([])
    result = ex.export_model(model, tmp_path / "float.mpq")
    assert result["payload_bytes"] == NUM_WEIGHTS_RESNET20 * 4
    fixed = QuantConfig(mode="fixed", bits=2)
    model = resnet20([Rule(".*", fixed, kind="weight")])
    result = ex.export_model(model, tmp_path / "w2.mpq")
    assert result["payload_bytes"] == math.ceil(NUM_WEIGHTS_RESNET20 * 2 / 8)
    assert result["payload_bytes"] == math.ceil(float(optim.memory(model).weight_kb) * 1024)
    with pytest.raises(ex.ExportError, match="every activation quantized: stem_act is float"):
        ex.reference_forward(ex.load(tmp_path / "w2.mpq"), np.zeros((1, 32, 32, 3), np.float32))
