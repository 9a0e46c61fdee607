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
    0             32            fixed header: magic b"MPDNNMPQ", u32 version (1),
                                u32 table_bytes, u64 payload_bytes, u64 float_bytes
    32            table_bytes   tensor table: UTF-8 JSON (model, weights, activations,
                                batch_norms, floats, accounting, run)
    32+table      payload_bytes weight payload: ONE bitstream of every weight tensor's codes
    ...           float_bytes   float section: float32 arrays, at the table's byte offsets

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
VERSION = 1
_FIXED = struct.Struct("<8sIIQQ")
#: Size of the fixed header; the JSON table follows it.
FIXED_HEADER_BYTES = _FIXED.size  # 32


@dataclasses.dataclass(frozen=True, eq=False)
class ExportedModel:
    """What :func:`load` returns: the table and every tensor, decoded.

    Attributes:
      table: the JSON tensor table (model, run, accounting, entries of every tensor).
      weights: ``{name: WeightTensor}`` in payload (forward) order.
      activations: ``{site: ActivationQuantizer}`` in forward order.
      floats: ``{name: float32 array}`` (BatchNorm tensors, logit scale).
      header_bytes: fixed header + table; payload_bytes, payload_bits, float_bytes: sizes.
    """

    table: dict[str, Any]
    weights: dict[str, WeightTensor]
    activations: dict[str, ActivationQuantizer]
    floats: dict[str, np.ndarray]
    header_bytes: int
    payload_bytes: int
    payload_bits: int
    float_bytes: int

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
    merged into the table (model description, run, accounting...).
    """
    payload, nbits = pack_bits([(w.codes, w.bits) for w in weights])
    entries, offset = [], 0
    for w in weights:
        entries.append({**w.info, "bit_offset": offset})
        offset += w.numel * w.bits
    float_entries, blobs, byte_offset = [], [], 0
    for name, value in (floats or {}).items():
        arr = np.ascontiguousarray(np.asarray(value, np.float32))
        float_entries.append({"name": name, "shape": list(arr.shape), "byte_offset": byte_offset})
        blobs.append(arr.astype("<f4").tobytes())
        byte_offset += arr.nbytes
    float_section = b"".join(blobs)
    table = {
        **(meta or {}),
        "format": {"magic": MAGIC.decode(), "version": VERSION, "payload_bits": nbits},
        "weights": entries,
        "activations": list(activations),
        "floats": float_entries,
    }
    table_bytes = json.dumps(table, allow_nan=False, separators=(",", ":")).encode()
    header = _FIXED.pack(MAGIC, VERSION, len(table_bytes), len(payload), len(float_section))
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
    """Read an ``.mpq`` file: the integers, steps, bits and float tensors, decoded."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ExportError(f"cannot read {path}: {err.strerror or err}") from None
    if len(data) < FIXED_HEADER_BYTES or data[:8] != MAGIC:
        raise ExportError(f"{path} is not an mpdnn export (.mpq): bad magic")
    magic, version, table_len, payload_len, float_len = _FIXED.unpack_from(data)
    if version != VERSION:
        raise ExportError(f"{path}: format version {version}, this reader knows {VERSION}")
    end_table = FIXED_HEADER_BYTES + table_len
    if len(data) != end_table + payload_len + float_len:
        raise ExportError(f"{path} is truncated or has trailing bytes")
    try:
        table = json.loads(data[FIXED_HEADER_BYTES:end_table])
    except ValueError as err:
        raise ExportError(f"{path}: the tensor table is not valid JSON ({err})") from None
    payload = data[end_table : end_table + payload_len]
    float_section = data[end_table + payload_len :]
    weights = {}
    for entry in table["weights"]:
        codes = unpack_bits(payload, entry["bit_offset"], entry["numel"], entry["bits"])
        weights[entry["name"]] = _decode_weight(entry, codes)
    floats = {}
    for entry in table["floats"]:
        count = math.prod(entry["shape"])
        arr = np.frombuffer(float_section, "<f4", count, entry["byte_offset"])
        floats[entry["name"]] = arr.astype(np.float32).reshape(entry["shape"])
    activations = {
        e["site"]: ActivationQuantizer.from_entry(e)
        for e in table["activations"]
        if e["spec"] is not None
    }
    return ExportedModel(
        table=table,
        weights=weights,
        activations=activations,
        floats=floats,
        header_bytes=end_table,
        payload_bytes=payload_len,
        payload_bits=int(table["format"]["payload_bits"]),
        float_bytes=float_len,
    )


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
    result = write(path, weights, activations=activations, floats=floats, meta=table)
    return {**result, **table["accounting"], "path": str(path)}
