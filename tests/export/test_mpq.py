"""mpdnn.export.mpq: one bitstream for every tensor, payload size = the accounting's memory.

Expected sizes come from docs/method.md §5's counts and from :func:`mpdnn.optim.memory`,
expected bytes from the file format's definition; never from the exporter.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import struct
import zlib

import numpy as np
import pytest

import mpdnn.quantizers as mq
from mpdnn import export as ex
from mpdnn import optim
from mpdnn.export import codec
from mpdnn.models import build
from mpdnn.nn import QuantConfig, Rule, quantize_model
from tests.export.cases import NUM_WEIGHTS_RESNET20, quantized_values, resnet20, round_trip

HEADER = struct.Struct("<8sIIQQII")  # docs/export.md: the version-2 fixed header (40 bytes)
HEADER_V1 = struct.Struct("<8sIIQQ")  # version 1 (32 bytes)


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
    assert data[:8] == b"MPDNNMPQ" and sizes["fixed_header_bytes"] == 40
    # The fixed header as docs/export.md lays it out, its CRC-32s of the regions they cover.
    magic, version, table_len, payload_len, float_len, table_crc, header_crc = HEADER.unpack_from(
        data
    )
    assert (magic, version, payload_len) == (b"MPDNNMPQ", 2, sizes["payload_bytes"])
    assert 40 + table_len + payload_len + float_len == len(data)
    assert table_crc == zlib.crc32(data[40 : 40 + table_len])
    assert header_crc == zlib.crc32(data[:36])


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


# ----------------------------------------------------------------------------------------
# Integrity (docs/export.md "Integrity"): every region is checked, the table's schema too.


@pytest.fixture(scope="module")
def cnn_file(tmp_path_factory):
    """A real export (SmallCNN, U3 weights and activations, BatchNorm floats): its bytes."""
    from flax import nnx

    model = build("small_cnn", rngs=nnx.Rngs(0))
    quantize_model(model, [Rule(".*", QuantConfig(), kind=None)])
    model.eval()
    path = tmp_path_factory.mktemp("cnn") / "cnn.mpq"
    ex.export_model(model, path)
    return path.read_bytes()


def split(data):
    """(table dict, payload + float bytes, table_len) of a version-2 file, by the layout."""
    table_len = HEADER.unpack_from(data)[2]
    return json.loads(data[40 : 40 + table_len]), data[40 + table_len :], table_len


def with_table(data, edit):
    """The file with its table edited by ``edit(table)``, every CRC-32 made consistent (what a
    writer that gets the table wrong would write)."""
    table, body, _ = split(data)
    edit(table)
    raw = json.dumps(table).encode()
    _, version, _, payload_len, float_len, _, _ = HEADER.unpack_from(data)
    head = HEADER.pack(b"MPDNNMPQ", version, len(raw), payload_len, float_len, zlib.crc32(raw), 0)
    return head[:36] + struct.pack("<I", zlib.crc32(head[:36])) + raw + body


def as_version_1(data, edit=None):
    """The same model as a version-1 file: 32-byte header, no CRC-32s anywhere."""
    table, body, _ = split(data)
    for entry in table["weights"] + table["floats"]:
        del entry["crc32"]
    table["format"]["version"] = 1
    if edit:
        edit(table)
    raw = json.dumps(table).encode()
    _, _, _, payload_len, float_len, _, _ = HEADER.unpack_from(data)
    return HEADER_V1.pack(b"MPDNNMPQ", 1, len(raw), payload_len, float_len) + raw + body


def load_bytes(tmp_path, data):
    path = tmp_path / "edited.mpq"
    path.write_bytes(data)
    return ex.load(path)


def refused(tmp_path, data, match):
    with pytest.raises(ex.ExportError, match=match) as err:
        load_bytes(tmp_path, data)
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)
    return str(err.value)


def flip(data, offset, mask=0x01):
    return data[:offset] + bytes([data[offset] ^ mask]) + data[offset + 1 :]


def test_intact_file_loads_and_checks_cover_it(tmp_path, cnn_file):
    m = load_bytes(tmp_path, cnn_file)
    assert m.version == 2 and m.file_bytes == len(cnn_file)
    table, body, _ = split(cnn_file)
    payload = body[: m.payload_bytes]
    for entry in table["weights"]:  # crc32: of the codes, each a little-endian u64
        codes = codec.unpack_bits(payload, entry["bit_offset"], entry["numel"], entry["bits"])
        assert entry["crc32"] == zlib.crc32(codes.astype("<u8").tobytes()), entry["name"]
    floats = body[m.payload_bytes :]
    for entry in table["floats"]:
        start, n = entry["byte_offset"], 4 * math.prod(entry["shape"])
        assert entry["crc32"] == zlib.crc32(floats[start : start + n]), entry["name"]


@pytest.mark.parametrize(
    "region", ["fixed header", "table", "payload", "payload, first tensor", "float section"]
)
def test_a_flipped_byte_is_refused_naming_its_region(tmp_path, cnn_file, region):
    table, _, table_len = split(cnn_file)
    payload_start = 40 + table_len
    payload_bytes = math.ceil(table["format"]["payload_bits"] / 8)
    if region == "fixed header":
        offset, match = 20, r"is corrupt: the fixed header fails its CRC-32 check"
    elif region == "table":
        offset, match = 40 + table_len // 2, r"is corrupt: the tensor table fails its CRC-32"
    elif region.startswith("payload"):
        entry = table["weights"][0 if "first" in region else 2]
        middle = entry["bit_offset"] + entry["numel"] * entry["bits"] // 2
        offset = payload_start + middle // 8
        match = rf"is corrupt: the payload of weight tensor '{entry['name']}' fails its CRC-32"
    else:
        entry = next(e for e in table["floats"] if e["name"] == "blocks.1.bn.var")
        offset = payload_start + payload_bytes + entry["byte_offset"] + 5
        match = r"is corrupt: float array 'blocks.1.bn.var' fails its CRC-32 check"
    for mask in (0x01, 0x80, 0xFF):
        refused(tmp_path, flip(cnn_file, offset, mask), match)


def test_every_single_byte_flip_is_refused(tmp_path):
    """A small file with every region (padding bits included): no flipped byte loads."""
    spec = mq.weight_spec("uniform")
    weights = [
        ex.encode_weight("u3", np.float32([1, -1, 3]) * 0.25, {"d": 0.25, "qmax": 0.75}, spec),
        ex.encode_weight(
            "p3",
            np.float32([0.5, -0.25, 1]),
            {"qmin": 2.0**-3, "qmax": 1.0},
            mq.weight_spec("pow2"),
        ),
        ex.encode_weight("f", np.float32([1.5]), None, None),
    ]
    act = ex.encode_activation("act", (4,), {"d": 0.5, "qmax": 3.0}, mq.activation_spec())
    path = tmp_path / "small.mpq"
    sizes = ex.write(path, weights, activations=[act], floats={"bn.var": np.float32([2, 3])})
    assert sizes["payload_bits"] % 8  # the last payload byte has padding bits
    data = path.read_bytes()
    ex.load(path)
    for offset in range(len(data)):
        for mask in (0x01, 0x80):
            path.write_bytes(flip(data, offset, mask))
            with pytest.raises(ex.ExportError) as err:
                ex.load(path)
            assert "\n" not in str(err.value), offset
    path.write_bytes(flip(data, 40 + sizes["table_bytes"] + sizes["payload_bytes"] - 1, 0x80))
    with pytest.raises(ex.ExportError, match="is corrupt: the payload's padding bits"):
        ex.load(path)


def test_truncated_empty_random_and_padded_files_are_refused(tmp_path, cnn_file):
    rng = np.random.default_rng(0)
    refused(tmp_path, b"", "not an mpdnn export")
    refused(tmp_path, rng.bytes(len(cnn_file)), "not an mpdnn export")
    refused(tmp_path, cnn_file[:10], "is truncated: 10 bytes")
    refused(tmp_path, cnn_file[:30], "is truncated: 30 bytes")
    refused(tmp_path, cnn_file[:-1], "is truncated or has trailing bytes")
    refused(tmp_path, cnn_file + b"\0", "is truncated or has trailing bytes")


def test_version_1_files_still_load_and_unknown_versions_are_named(tmp_path, cnn_file):
    new = load_bytes(tmp_path, cnn_file)
    old = load_bytes(tmp_path, as_version_1(cnn_file))
    assert old.version == 1 and new.version == 2
    assert old.payload_bytes == new.payload_bytes and old.float_bytes == new.float_bytes
    for name, w in new.weights.items():
        np.testing.assert_array_equal(old.weights[name].integers, w.integers, err_msg=name)
    for name, f in new.floats.items():
        np.testing.assert_array_equal(old.floats[name], f, err_msg=name)
    assert old.activations.keys() == new.activations.keys()
    future = cnn_file[:8] + struct.pack("<I", 3) + cnn_file[12:]
    refused(tmp_path, future, r"\.mpq format version 3; this mpdnn reads versions 1 and 2$")


W1 = r"weights\[1\] 'blocks.1.conv.kernel': "


def drop(section, index, key):
    def edit(table):
        del (table[section] if index is None else table[section][index])[key]

    return edit


MISSING = [
    ("weights", 1, "bits", r"weights\[1\] 'blocks.1.conv.kernel'"),
    ("weights", 1, "numel", r"weights\[1\] 'blocks.1.conv.kernel'"),
    ("weights", 0, "shape", r"weights\[0\] 'blocks.0.conv.kernel'"),
    ("weights", 0, "bit_offset", r"weights\[0\] 'blocks.0.conv.kernel'"),
    ("weights", 2, "encoding", r"weights\[2\] 'blocks.2.conv.kernel'"),
    ("weights", 2, "step_exponent", r"weights\[2\] 'blocks.2.conv.kernel'"),
    ("weights", 3, "signed", r"weights\[3\] 'head.kernel'"),
    ("weights", 4, "name", r"weights\[4\]"),
    ("floats", 0, "byte_offset", r"floats\[0\] 'blocks.0.bn.multiplier'"),
    ("floats", 1, "shape", r"floats\[1\] 'blocks.1.bn.multiplier'"),
    ("activations", 0, "spec", r"activations\[0\] 'blocks.0.act'"),
    ("activations", 1, "step_exponent", r"activations\[1\] 'blocks.1.act'"),
    ("activations", 2, "qmax", r"activations\[2\] 'blocks.2.act'"),
    ("format", None, "payload_bits", "format"),
]
MISSING_V2 = [  # version 1 has no crc32
    ("weights", 1, "crc32", r"weights\[1\] 'blocks.1.conv.kernel'"),
    ("floats", 2, "crc32", r"floats\[2\] 'blocks.2.bn.multiplier'"),
]


@pytest.mark.parametrize(
    ("version", "section", "index", "key", "where"),
    [(v, *case) for v in (1, 2) for case in MISSING] + [(2, *case) for case in MISSING_V2],
)
def test_a_table_missing_a_field_is_refused_naming_it(
    tmp_path, cnn_file, version, section, index, key, where
):
    edit = drop(section, index, key)
    data = with_table(cnn_file, edit) if version == 2 else as_version_1(cnn_file, edit)
    refused(tmp_path, data, rf"bad tensor table: {where}: missing field '{key}'$")


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda t: t.pop("weights"), r"weights: missing field 'weights'"),
        (lambda t: t.clear() or t.update(format=[]), r"format: field 'format' is \[\], not an"),
        (lambda t: t["weights"][1].update(shape="3x3"), r"weights\[1\] .*: field 'shape' is"),
        (lambda t: t["weights"][1].update(numel=7), W1 + r"field 'numel' is 7, not prod\(shape"),
        (lambda t: t["weights"][1].update(bit_offset=0), W1 + r"field 'bit_offset' is 0, not 576"),
        (lambda t: t["weights"][1].update(encoding="int4"), W1 + r"field 'encoding' is 'int4'"),
        (lambda t: t["weights"][1].update(crc32=-1), W1 + r"field 'crc32' is -1, not an unsigned"),
        (lambda t: t["floats"][1].update(byte_offset=4), r"floats\[1\] .*'byte_offset' is 4"),
        (lambda t: t["floats"].pop(), r"floats: the arrays hold 1472 bytes, .* section 1600"),
        (
            lambda t: t["format"].update(payload_bits=8),
            r"format: field 'payload_bits' is 8, the weig",
        ),
        (lambda t: t["activations"][0]["spec"].update(family="log"), r"activations\[0\] 'blo"),
        (lambda t: t["activations"][0]["spec"].update(extra=1), r"activations\[0\] 'blocks"),
        (lambda t: t["weights"].append(t["weights"][0]), r"weights\[5\] .*a second weight"),
        (lambda t: t["format"].update(version=1), r"format: field 'version' is 1, the header"),
    ],
)
def test_a_table_with_a_bad_field_is_refused_naming_it(tmp_path, cnn_file, edit, match):
    refused(tmp_path, with_table(cnn_file, edit), r"bad tensor table: " + match)


@pytest.mark.parametrize("bits", [0, -1, 4.0, 4.5, 33, 64, True, "4", None])
@pytest.mark.parametrize("version", [1, 2])
def test_a_bitwidth_outside_1_to_32_is_refused(tmp_path, cnn_file, bits, version):
    def edit(table):
        table["weights"][2]["bits"] = bits

    data = with_table(cnn_file, edit) if version == 2 else as_version_1(cnn_file, edit)
    shown = json.dumps(bits)
    refused(
        tmp_path,
        data,
        rf"bad tensor table: weights\[2\] 'blocks.2.conv.kernel': field 'bits' is "
        rf"{re.escape(shown)}, not an integer",
    )


def test_bad_bits_elsewhere_and_tampering_without_checksums(tmp_path, cnn_file):
    def act_bits(table):
        table["activations"][0]["bits"] = 0

    refused(tmp_path, with_table(cnn_file, act_bits), r"activations\[0\] 'blocks.0.act': .*'bits'")
    # Editing the table by hand without its CRC-32 is corruption, whatever the edit.
    table, body, table_len = split(cnn_file)
    assert table["weights"][2]["bits"] == 4
    table["weights"][2]["bits"] = 0
    raw = json.dumps(table, allow_nan=False, separators=(",", ":")).encode()
    assert len(raw) == table_len  # the writer's own JSON, one digit changed
    refused(tmp_path, cnn_file[:40] + raw + body, "is corrupt: the tensor table fails its CRC-32")
    # float32 tensors are 32 bits; the writer refuses what the reader would
    w = ex.encode_weight("f", np.float32([1.5]), None, None)
    with pytest.raises(
        ex.ExportError, match=r"weights\[0\] 'f': field 'bits' is 16, not 32 \(float32\)"
    ):
        ex.write(tmp_path / "w.mpq", [dataclasses.replace(w, bits=16, info={**w.info, "bits": 16})])
    wide = ex.encode_weight(
        "u", np.float32([1, 2]), {"d": 1.0, "qmax": 2.0}, mq.weight_spec("uniform"), bits=33
    )
    with pytest.raises(ex.ExportError, match=r"cannot write .*field 'bits' is 33, not an integer"):
        ex.write(tmp_path / "w.mpq", [wide])
