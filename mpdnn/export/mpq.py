r"""The ``.mpq`` file: a model's weights bit-packed at their inferred bitwidths, and its reader.

:func:`export_model` writes a built NNX model: every conv/linear kernel and bias as integers
packed at its layer's inferred bitwidth (docs/method.md §3), so that **the packed weight
payload is exactly the accounting's weight memory** (``weight_kb * 1024`` bytes, rounded up
to a whole byte once, for the whole bitstream). The rest of the forward pass travels beside
it: every activation quantizer (spec, raw θ and the derived step, range and bits) and the
float tensors (BatchNorm parameters, statistics and folded multipliers, the logit scale of
pow2 networks). :func:`load` reads it back.

File format (all numbers little-endian; docs/export.md has the same with an example)::

    offset        size          content
    0             40            fixed header: magic b"MPDNNMPQ", u32 version (2),
                                u32 table_bytes, u64 payload_bytes, u64 float_bytes,
                                u32 table_crc32, u32 header_crc32 (of bytes 0..36)
    40            table_bytes   tensor table: UTF-8 JSON (model, weights, activations,
                                batch_norms, floats, accounting, run)
    40+table      payload_bytes weight payload: ONE bitstream of every weight tensor's codes
    ...           float_bytes   float section: float32 arrays, at the table's byte offsets

Integrity (version 2): CRC-32 (zlib's) of the fixed header and of the table in the fixed
header, and in the table one per weight tensor (``crc32``: of its codes, each zero-extended
to a little-endian u64) and per float array (``crc32``: of its bytes); the weights and the
float arrays tile the payload and the float section, and the payload's padding bits are
zero, so every byte of the file is checked. :func:`load` refuses a file that fails a check
in one line naming the region, and a table that lacks a field or holds a bad one (a bitwidth
outside ``[1, MAX_BITS]``...) in one line naming field and tensor. Version 1 (the same
without the two header CRC-32 fields, a 32-byte fixed header, and without ``crc32`` in the
table) still loads, unchecked.

The header (fixed part + table) is reported apart from the payload. The **payload** holds
the tensors in the table's order (forward order, as docs/method.md §5's accounting counts
them); tensor ``t`` occupies stream bits ``[t.bit_offset, t.bit_offset + numel * bits)``, its
values in C (row-major) order, each a ``bits``-wide field written least significant bit
first (the field encodings are :mod:`mpdnn.export.codec`'s), so
``payload_bytes = ceil(Σ numel · bits / 8)``.

Activation quantizers are not in the payload (they hold no tensor); the table gives each
one's spec, raw θ and derived ``step``/``step_exponent``, ``qmax``, ``qmin`` (pow2) and
``bits``. Floats: per BatchNorm ``<path>.scale``, ``.bias``, ``.mean``, ``.var`` and the
folded ``.multiplier = rsqrt(var + epsilon) · scale`` **as XLA computes it** (the reference
forward needs it bit for bit, and XLA's float32 ``rsqrt`` is not correctly rounded, so no
NumPy formula reproduces it); ``scale`` for a pow2 network's logit scale.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import struct
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax import lax

from mpdnn.export.codec import (
    FLOAT_BITS,
    ActivationQuantizer,
    ExportError,
    WeightTensor,
    _decode_weight,
    encode_activation,
    encode_weight,
    pack_bits,
    unpack_bits,
)
from mpdnn.nn.layers import LogitScale, QConv, QLinear, QuantizedWeights
from mpdnn.nn.rules import path_str, quantizable_sites
from mpdnn.optim.accounting import KB, counted_tensors
from mpdnn.optim.memory import memory

MAGIC = b"MPDNNMPQ"
#: The version :func:`write` writes. 2 added the CRC-32 checks; 1 (no checks) still loads.
VERSION = 2
#: The versions :func:`load` reads.
READABLE_VERSIONS = (1, 2)
#: The widest field of the payload: every code fits 32 bits (float32 weights are 32).
MAX_BITS = FLOAT_BITS
#: Fixed header (version 2): magic, version, table_bytes, payload_bytes, float_bytes,
#: table_crc32 (of the table bytes), header_crc32 (of the 36 bytes before it).
_FIXED = struct.Struct("<8sIIQQII")
#: Version 1's fixed header: the same without the two CRC-32 fields.
_FIXED_V1 = struct.Struct("<8sIIQQ")
#: Size of the fixed header; the JSON table follows it.
FIXED_HEADER_BYTES = _FIXED.size  # 40
_WEIGHT_ENCODINGS = ("uniform", "pow2", "float32")


def _crc32(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def _codes_crc32(codes: np.ndarray, bits: int) -> int:
    """CRC-32 of a weight tensor's codes, each its ``bits``-wide field zero-extended to a
    little-endian u64 (independent of where the tensor starts in the bitstream)."""
    mask = np.uint64((1 << bits) - 1)
    fields = np.asarray(codes, np.uint64).reshape(-1) & mask
    return _crc32(fields.astype("<u8").tobytes())


@dataclasses.dataclass(frozen=True, eq=False)
class ExportedModel:
    """What :func:`load` returns: the table and every tensor, decoded.

    Attributes:
      table: the JSON tensor table (model, run, accounting, entries of every tensor).
      weights: ``{name: WeightTensor}`` in payload (forward) order.
      activations: ``{site: ActivationQuantizer}`` in forward order.
      floats: ``{name: float32 array}`` (BatchNorm tensors, logit scale).
      header_bytes: fixed header + table; payload_bytes, payload_bits, float_bytes: sizes.
      version: the file's format version (1 has no CRC-32s, so nothing was checked).
    """

    table: dict[str, Any]
    weights: dict[str, WeightTensor]
    activations: dict[str, ActivationQuantizer]
    floats: dict[str, np.ndarray]
    header_bytes: int
    payload_bytes: int
    payload_bits: int
    float_bytes: int
    version: int = VERSION

    @property
    def file_bytes(self) -> int:
        return self.header_bytes + self.payload_bytes + self.float_bytes


def write(
    path: str | Path,
    weights: Sequence[WeightTensor],
    *,
    activations: Sequence[Mapping[str, Any]] = (),
    floats: Mapping[str, jax.typing.ArrayLike] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> dict[str, int]:
    """Write an ``.mpq`` file; returns its section sizes in bytes (and the payload bits).

    ``activations`` are table entries (as :func:`export_model` builds them); ``meta`` is
    merged into the table (model description, run, accounting...). Every weight tensor and
    float array gets a CRC-32 in the table, the table one in the fixed header. A table that
    :func:`load` would refuse (a bitwidth outside ``[1, MAX_BITS]``, a missing field) raises
    :class:`ExportError` before anything is written.
    """
    for i, w in enumerate(weights):  # before packing: a field wider than MAX_BITS overflows
        try:
            _check_bits({"bits": w.bits}, _where("weights", i, w.name))
        except _TableError as err:
            raise ExportError(f"cannot write {path}: {err}") from None
    payload, nbits = pack_bits([(w.codes, w.bits) for w in weights])
    entries, offset = [], 0
    for w in weights:
        crc = _codes_crc32(w.codes, w.bits)
        entries.append({**w.info, "bit_offset": offset, "crc32": crc})
        offset += w.numel * w.bits
    float_entries, blobs, byte_offset = [], [], 0
    for name, value in (floats or {}).items():
        arr = np.ascontiguousarray(np.asarray(value, np.float32))
        blob = arr.astype("<f4").tobytes()
        float_entries.append(
            {
                "name": name,
                "shape": list(arr.shape),
                "byte_offset": byte_offset,
                "crc32": _crc32(blob),
            }
        )
        blobs.append(blob)
        byte_offset += arr.nbytes
    float_section = b"".join(blobs)
    table = {
        **(meta or {}),
        "format": {"magic": MAGIC.decode(), "version": VERSION, "payload_bits": nbits},
        "weights": entries,
        "activations": list(activations),
        "floats": float_entries,
    }
    try:
        _check_table(table, VERSION, len(payload), len(float_section))
    except _TableError as err:
        raise ExportError(f"cannot write {path}: {err}") from None
    table_bytes = json.dumps(table, allow_nan=False, separators=(",", ":")).encode()
    head = _FIXED.pack(
        MAGIC, VERSION, len(table_bytes), len(payload), len(float_section), _crc32(table_bytes), 0
    )
    header = head[:-4] + struct.pack("<I", _crc32(head[:-4]))
    Path(path).write_bytes(header + table_bytes + payload + float_section)
    return {
        "header_bytes": len(header) + len(table_bytes),
        "fixed_header_bytes": len(header),
        "table_bytes": len(table_bytes),
        "payload_bytes": len(payload),
        "payload_bits": nbits,
        "float_bytes": len(float_section),
        "file_bytes": len(header) + len(table_bytes) + len(payload) + len(float_section),
    }


def load(path: str | Path) -> ExportedModel:
    """Read an ``.mpq`` file: the integers, steps, bits and float tensors, decoded.

    Every failure is one line of :class:`ExportError` (a ``ValueError``): not an ``.mpq``
    file, an unknown version, a truncated file, a region that fails its CRC-32 ("corrupt",
    naming the fixed header, the table, or the weight tensor or float array), or a table
    that lacks a field or holds a bad one (naming the field and the tensor). Version 1
    files (no checksums) load with every check but the CRC-32s.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ExportError(f"cannot read {path}: {err.strerror or err}") from None
    if data[:8] != MAGIC:
        raise ExportError(f"{path} is not an mpdnn export (.mpq): bad magic")
    if len(data) < 12:
        raise ExportError(f"{path} is truncated: {len(data)} bytes, shorter than its header")
    (version,) = struct.unpack_from("<I", data, 8)
    if version not in READABLE_VERSIONS:
        known = " and ".join(str(v) for v in READABLE_VERSIONS)
        raise ExportError(
            f"{path}: .mpq format version {version}; this mpdnn reads versions {known}"
        )
    fixed = _FIXED if version >= 2 else _FIXED_V1
    if len(data) < fixed.size:
        raise ExportError(f"{path} is truncated: {len(data)} bytes, shorter than its header")
    fields = fixed.unpack_from(data)
    table_len, payload_len, float_len = fields[2:5]
    if version >= 2:
        table_crc, header_crc = fields[5:7]
        if _crc32(data[: fixed.size - 4]) != header_crc:
            raise ExportError(f"{path} is corrupt: the fixed header fails its CRC-32 check")
    end_table = fixed.size + table_len
    if len(data) != end_table + payload_len + float_len:
        raise ExportError(f"{path} is truncated or has trailing bytes")
    table_data = data[fixed.size : end_table]
    if version >= 2 and _crc32(table_data) != table_crc:
        raise ExportError(f"{path} is corrupt: the tensor table fails its CRC-32 check")
    try:
        table = json.loads(table_data)
    except ValueError as err:
        reason = str(err).splitlines()[0]
        raise ExportError(f"{path}: the tensor table is not valid JSON ({reason})") from None
    try:
        _check_table(table, version, payload_len, float_len)
    except _TableError as err:
        raise ExportError(f"{path}: bad tensor table: {err}") from None
    payload = data[end_table : end_table + payload_len]
    float_section = data[end_table + payload_len :]
    weights = {}
    for entry in table["weights"]:
        bits = entry["bits"]
        codes = unpack_bits(payload, entry["bit_offset"], entry["numel"], bits)
        if version >= 2 and _codes_crc32(codes, bits) != entry["crc32"]:
            raise ExportError(
                f"{path} is corrupt: the payload of weight tensor {entry['name']!r} "
                "fails its CRC-32 check"
            )
        weights[entry["name"]] = _decode_weight(entry, codes)
    nbits = table["format"]["payload_bits"]
    if version >= 2 and nbits % 8 and payload[-1] >> (nbits % 8):
        raise ExportError(f"{path} is corrupt: the payload's padding bits are not zero")
    floats = {}
    for entry in table["floats"]:
        count = math.prod(entry["shape"])
        start = entry["byte_offset"]
        blob = float_section[start : start + 4 * count]
        if version >= 2 and _crc32(blob) != entry["crc32"]:
            raise ExportError(
                f"{path} is corrupt: float array {entry['name']!r} fails its CRC-32 check"
            )
        floats[entry["name"]] = (
            np.frombuffer(blob, "<f4").astype(np.float32).reshape(entry["shape"])
        )
    activations = {}
    for i, entry in enumerate(table["activations"]):
        if entry["spec"] is None:
            continue
        try:
            activations[entry["site"]] = ActivationQuantizer.from_entry(entry)
        except (KeyError, TypeError, ValueError) as err:
            where = _where("activations", i, entry.get("site"))
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ExportError(f"{path}: bad tensor table: {where}: {reason}") from None
    return ExportedModel(
        table=table,
        weights=weights,
        activations=activations,
        floats=floats,
        header_bytes=end_table,
        payload_bytes=payload_len,
        payload_bits=nbits,
        float_bytes=float_len,
        version=version,
    )


# ----------------------------------------------------------------------------------------
# The table's schema: what load() needs of it, checked before anything is decoded.


class _TableError(Exception):
    """A table that lacks a field or holds a bad one; the message names field and tensor."""


def _where(section: str, index: int, name: Any) -> str:
    return f"{section}[{index}]" + (f" {name!r}" if isinstance(name, str) else "")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _field(entry: Mapping[str, Any], key: str, where: str, kind: str) -> Any:
    """``entry[key]``, checked to be of ``kind``: int, uint32, count, str, bool, number,
    shape (list of counts), dict or list."""
    if key not in entry:
        raise _TableError(f"{where}: missing field {key!r}")
    value = entry[key]
    ok = {
        "int": _is_int(value),
        "count": _is_int(value) and value >= 0,
        "uint32": _is_int(value) and 0 <= value < 2**32,
        "str": isinstance(value, str),
        "bool": isinstance(value, bool),
        "number": isinstance(value, int | float) and not isinstance(value, bool),
        "shape": isinstance(value, list) and all(_is_int(n) and n >= 0 for n in value),
        "dict": isinstance(value, dict),
        "list": isinstance(value, list),
    }[kind]
    if not ok:
        described = {
            "count": "a non-negative integer",
            "uint32": "an unsigned 32-bit integer",
            "shape": "a list of non-negative integers",
            "int": "an integer",
            "str": "a string",
            "bool": "true or false",
            "number": "a number",
            "dict": "an object",
            "list": "a list",
        }[kind]
        raise _TableError(f"{where}: field {key!r} is {json.dumps(value)[:40]}, not {described}")
    return value


def _check_bits(entry: Mapping[str, Any], where: str, *, float_bits: bool = False) -> int:
    bits = _field(entry, "bits", where, "int")
    if not 1 <= bits <= MAX_BITS or (float_bits and bits != FLOAT_BITS):
        allowed = f"{FLOAT_BITS} (float32)" if float_bits else f"an integer in [1, {MAX_BITS}]"
        raise _TableError(f"{where}: field 'bits' is {bits}, not {allowed}")
    return bits


def _unique_name(entry: dict, where: str, names: set[str], what: str) -> None:
    name = _field(entry, "name", where, "str")
    if name in names:
        raise _TableError(f"{where}: a second {what} of that name")
    names.add(name)


def _check_tiling(entry: dict, where: str, key: str, offset: int, version: int) -> None:
    """The entry starts where the ones before it end (``key``: its offset field), and from
    version 2 carries its CRC-32."""
    if _field(entry, key, where, "count") != offset:
        raise _TableError(
            f"{where}: field '{key}' is {entry[key]}, not {offset} (the entries before it end "
            "there)"
        )
    if version >= 2:
        _field(entry, "crc32", where, "uint32")


def _check_table(table: Any, version: int, payload_bytes: int, float_bytes: int) -> None:
    """Raise :class:`_TableError` unless ``table`` has every field :func:`load` reads, of the
    right type, and its weights and floats tile the payload and the float section exactly
    (so that the CRC-32s of a version-2 file cover every byte)."""
    if not isinstance(table, dict):
        raise _TableError(f"the table is a JSON {type(table).__name__}, not an object")
    fmt = _field(table, "format", "format", "dict")
    if _field(fmt, "version", "format", "int") != version:
        raise _TableError(f"format: field 'version' is {fmt['version']}, the header's {version}")
    payload_bits = _field(fmt, "payload_bits", "format", "count")
    for section in ("weights", "activations", "floats"):
        for i, entry in enumerate(_field(table, section, section, "list")):
            if not isinstance(entry, dict):
                raise _TableError(f"{section}[{i}] is {json.dumps(entry)[:40]}, not an object")
    names, offset = set(), 0
    for i, entry in enumerate(table["weights"]):
        where = _where("weights", i, entry.get("name"))
        _unique_name(entry, where, names, "weight tensor")
        shape = _field(entry, "shape", where, "shape")
        numel = _field(entry, "numel", where, "count")
        if numel != math.prod(shape):
            raise _TableError(f"{where}: field 'numel' is {numel}, not prod(shape {shape})")
        encoding = _field(entry, "encoding", where, "str")
        if encoding not in _WEIGHT_ENCODINGS:
            raise _TableError(
                f"{where}: field 'encoding' is {encoding!r}, not one of {_WEIGHT_ENCODINGS}"
            )
        bits = _check_bits(entry, where, float_bits=encoding == "float32")
        if encoding == "uniform":
            _field(entry, "signed", where, "bool")
            _field(entry, "step_exponent", where, "int")
        elif encoding == "pow2":
            emin = _field(entry, "qmin_exponent", where, "int")
            emax = _field(entry, "qmax_exponent", where, "int")
            if not 0 <= emax - emin < 2 ** (bits - 1):
                raise _TableError(
                    f"{where}: exponents [{emin}, {emax}] are not 1 to {2 ** (bits - 1)} "
                    f"magnitudes of {bits} bits"
                )
        _check_tiling(entry, where, "bit_offset", offset, version)
        offset += numel * bits
    if offset != payload_bits:
        raise _TableError(
            f"format: field 'payload_bits' is {payload_bits}, the weights hold {offset}"
        )
    if -(-payload_bits // 8) != payload_bytes:
        raise _TableError(
            f"format: {payload_bits} payload bits do not fill the header's {payload_bytes} "
            "payload bytes"
        )
    names, offset = set(), 0
    for i, entry in enumerate(table["floats"]):
        where = _where("floats", i, entry.get("name"))
        _unique_name(entry, where, names, "float array")
        shape = _field(entry, "shape", where, "shape")
        _check_tiling(entry, where, "byte_offset", offset, version)
        offset += 4 * math.prod(shape)
    if offset != float_bytes:
        raise _TableError(
            f"floats: the arrays hold {offset} bytes, the header's float section {float_bytes}"
        )
    sites = set()
    for i, entry in enumerate(table["activations"]):
        where = _where("activations", i, entry.get("site"))
        site = _field(entry, "site", where, "str")
        if site in sites:
            raise _TableError(f"{where}: a second activation site of that name")
        sites.add(site)
        if "spec" not in entry:
            raise _TableError(f"{where}: missing field 'spec'")
        if entry["spec"] is None:
            _check_bits(entry, where, float_bits=True)
            continue
        _field(entry, "spec", where, "dict")
        _field(entry, "shape", where, "shape")
        _field(entry, "theta", where, "dict")
        _check_bits(entry, where)
        _field(entry, "step_exponent", where, "int")
        _field(entry, "qmax", where, "number")
        if entry.get("qmin") is not None:
            _field(entry, "qmin", where, "number")


# ----------------------------------------------------------------------------------------
# A model in memory -> file.


def _layer_geometry(module: QuantizedWeights) -> dict[str, Any]:
    if isinstance(module, QConv):
        padding = module.padding
        padding = padding if isinstance(padding, str) else [list(p) for p in padding]
        return {
            "type": "conv",
            "strides": list(module.strides),
            "padding": padding,
            "groups": module.groups,
        }
    if isinstance(module, QLinear):
        return {"type": "linear"}
    return {"type": type(module).__name__}


@functools.partial(jax.jit, static_argnums=2)
def _rsqrt_times(var: jax.Array, scale: jax.Array | None, epsilon: float) -> jax.Array:
    mul = lax.rsqrt(var + epsilon)
    return mul if scale is None else mul * scale


def _batch_norm_multiplier(bn: nnx.BatchNorm) -> jax.Array:
    """``rsqrt(var + epsilon) · scale`` with the ops of Flax's BatchNorm, jitted as the
    trained model is (XLA's rsqrt is not correctly rounded: the value is XLA's)."""
    scale = bn.scale[...] if bn.scale is not None else None
    return _rsqrt_times(bn.var[...], scale, float(bn.epsilon))


def _architecture(model: nnx.Module) -> dict[str, Any]:
    """What the reference forward needs to know about the topology."""
    from mpdnn.models.resnet_cifar import ResNetCifar

    inner, prefix = (model.model, "model.") if isinstance(model, LogitScale) else (model, "")
    arch: dict[str, Any] = {
        "class": type(inner).__name__,
        "prefix": prefix,
        "logit_scale": "scale" if isinstance(model, LogitScale) else None,
        "input_shape": list(getattr(inner, "input_shape", ()) or ()),
    }
    if isinstance(inner, ResNetCifar):
        arch["blocks"] = [
            {
                "path": f"stages.{i}.{j}",
                "stride": int(block.stride),
                "pad_features": int(block.pad_features),
            }
            for i, stage in enumerate(inner.stages)
            for j, block in enumerate(stage)
        ]
    return arch


def export_model(
    model: nnx.Module, path: str | Path, *, meta: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Write ``model`` (built, trained state loaded) to ``path``; returns sizes and counts.

    Weight tensors are stored in the accounting's order with the accounting's bits (the
    rows of :func:`mpdnn.optim.memory`), so ``payload_bits == Σ numel · bits ==
    weight_kb · 8192``; the table records :func:`~mpdnn.optim.memory`'s totals, and a
    mismatch raises :class:`ExportError`.
    """
    weights, activations, floats, table = encode_model(model, meta=meta)
    result = write(path, weights, activations=activations, floats=floats, meta=table)
    return {**result, **table["accounting"], "path": str(path)}


def encode_model(
    model: nnx.Module, *, meta: Mapping[str, Any] | None = None
) -> tuple[list[WeightTensor], list[dict[str, Any]], dict[str, np.ndarray], dict[str, Any]]:
    """What :func:`export_model` writes: the weight tensors, the activation entries, the
    float arrays (BatchNorm, logit scale) and the table."""
    # docs/method.md §5's totals and per-tensor bits, which the payload follows
    sizes = memory(model)
    tensors = counted_tensors(model)  # the same tensors in the same (forward) order
    sites = {p: m for p, _, m in quantizable_sites(model)}
    weights, activations, weight_bits = [], [], 0
    for t, row in zip(tensors, sizes.rows, strict=True):
        b = row.bits
        q = t.quantizer
        if t.kind == "weight":
            module = sites[t.site]
            value = getattr(module, t.tensor)[...]
            w = encode_weight(
                f"{t.site}.{t.tensor}",
                value,
                q.theta() if q.spec is not None else None,
                q.spec,
                bits=b if q.spec is not None else None,
                layer={"site": t.site, "tensor": t.tensor, **_layer_geometry(module)},
            )
            w.info["quantizer"] = q.describe()
            weights.append(w)
            weight_bits += t.numel * w.bits
        elif q.spec is None:
            activations.append(
                {
                    "site": t.site,
                    "shape": list(t.shape),
                    "numel": t.numel,
                    "spec": None,
                    "bits": FLOAT_BITS,
                }
            )
        else:
            activations.append(encode_activation(t.site, t.shape, q.theta(), q.spec, bits=b))
    excluded = {w.name for w in weights}
    floats: dict[str, np.ndarray] = {}
    batch_norms = []
    for mpath, module in nnx.iter_modules(model):
        if isinstance(module, nnx.BatchNorm):
            name = path_str(mpath)
            batch_norms.append(
                {
                    "path": name,
                    "epsilon": float(module.epsilon),
                    "use_scale": module.scale is not None,
                    "use_bias": module.bias is not None,
                }
            )
            floats[f"{name}.multiplier"] = np.asarray(_batch_norm_multiplier(module))
    for vpath, variable in nnx.iter_graph(model):
        if not isinstance(variable, nnx.Param | nnx.BatchStat):
            continue
        name = path_str(vpath)
        if name in excluded or any(p.endswith("quant") for p in name.split(".")[:-1]):
            continue  # weights are in the payload, quantizer θ in the table
        floats[name] = np.asarray(variable[...], np.float32)
    table = {
        **(meta or {}),
        "architecture": _architecture(model),
        "batch_norms": batch_norms,
        "accounting": {
            "weight_bits": weight_bits,
            "weight_kb": float(sizes.weight_kb),
            "act_max_kb": float(sizes.act_max_kb),
            "act_sum_kb": float(sizes.act_sum_kb),
            "num_weights": sum(w.numel for w in weights),
        },
    }
    # The accounting sums per-tensor KB in float32: exact for ResNet-20, within float32
    # rounding beyond 2**24 bits; a bitwidth that is not an integer would be far off.
    if abs(weight_bits - float(sizes.weight_kb) * KB) > 1e-5 * weight_bits:
        raise ExportError(
            f"packed {weight_bits} weight bits but the accounting counts "
            f"{float(sizes.weight_kb) * KB} (a bitwidth that is not an integer?)"
        )
    return weights, activations, floats, table
