r"""Export a trained mixed-precision network as bit-packed integers (docs/method.md §3, §5, §12).

    python -m mpdnn.export --workdir RUN [--out RUN/model.mpq] [--verify N] [--json]

writes the model that a finished run of ``python -m mpdnn.train`` delivered (``best/`` when
``summary.json`` says ``delivered == "best_feasible"``, else ``final/``) as one ``.mpq`` file:
every conv/linear kernel and bias as integers packed at its layer's inferred bitwidth (SPEC
§3), so that **the packed weight payload is exactly the accounting's weight memory**
(``weight_kb * 1024`` bytes, rounded up to a whole byte once, for the whole bitstream). The
rest of the forward pass travels beside it: every activation quantizer (spec, raw θ and the
derived step, range and bits) and the float tensors (BatchNorm parameters, statistics and
folded multipliers, the logit scale of pow2 networks). :func:`load` reads it back;
:func:`reference_forward` runs ResNet-20 from it with integer arithmetic in NumPy.

File format (all numbers little-endian; docs/export.md has the same with an example)::

    offset        size          content
    0             32            fixed header: magic b"MPDNNMPQ", u32 version (1),
                                u32 table_bytes, u64 payload_bytes, u64 float_bytes
    32            table_bytes   tensor table: UTF-8 JSON (model, weights, activations,
                                batch_norms, floats, accounting, run)
    32+table      payload_bytes weight payload: ONE bitstream of every weight tensor's codes
    ...           float_bytes   float section: float32 arrays, at the table's byte offsets

The header (fixed part + table) is reported apart from the payload. The **payload** holds
the tensors in the table's order (forward order, as docs/method.md §5's accounting counts them);
tensor ``t`` occupies stream bits ``[t.bit_offset, t.bit_offset + numel * bits)``, its
values in C (row-major) order, each a ``bits``-wide field written least significant bit
first; stream bit ``i`` is bit ``i % 8`` of payload byte ``i // 8``. The last byte is
padded with zero bits, so ``payload_bytes = ceil(Σ numel · bits / 8)``. Field encodings:

* ``uniform`` (U1/U2/U3, TQT, fixed): the integer ``k`` with ``value = k · 2**step_exponent``
  (the power-of-two step ``d`` of docs/method.md §2), in ``bits``-bit two's complement (signed; the
  inferred bits hold ``|k| <= round(qmax/d) <= 2**(bits-1) - 1``) or plain binary
  (unsigned).
* ``pow2`` (signed, no zero code: the paper's weights, docs/method.md §1.2):
  ``sign << (bits-1) | j``
  with ``sign`` 1 for negative values and ``j = log2|value| - qmin_exponent`` the exponent
  index; magnitudes run over the ``M = qmax_exponent - qmin_exponent + 1`` powers of two
  between qmin and qmax, and docs/method.md §3's ``bits = ceil(log2 M) + 1`` is exactly one sign bit
  plus enough bits for ``j < M``. (An exact zero has quantized to +qmin: there is no zero.)
* ``float32``: a float (unquantized) weight tensor, as its IEEE-754 bits; docs/method.md §5 counts
it
  at 32 bits, and so does the payload.

Activation quantizers are not in the payload (they hold no tensor); the table gives each
one's spec, raw θ and derived ``step``/``step_exponent``, ``qmax``, ``qmin`` (pow2) and
``bits``. Floats: per BatchNorm ``<path>.scale``, ``.bias``, ``.mean``, ``.var`` and the
folded ``.multiplier = rsqrt(var + epsilon) · scale`` **as XLA computes it** (the reference
forward needs it bit for bit, and XLA's float32 ``rsqrt`` is not correctly rounded, so no
NumPy formula reproduces it); ``scale`` for a pow2 network's logit scale.

Reference forward, and how exact it is (:func:`reference_forward`): every conv and the
linear layer take integer activation codes and integer weight codes, whose dot products are
computed exactly in int64 (through float64 BLAS where a bound proves it exact) and scaled by
the product of their power-of-two steps; BatchNorm, the residual add and the logit scale run
in float32 exactly as the jitted Flax model runs them on XLA:CPU (which fuses BatchNorm's
multiply-add into one FMA: one rounding). The Flax model's float32 convolutions are exact
too whenever every partial sum is an integer below 2**24 in units of the two steps (checked
per layer: :attr:`Trace.exact`), so from the first activation quantizer on, the reference
reproduces the logits **bit for bit** (tested). The one layer where that cannot hold is the
first conv: its input is the unquantized image, whose float32 values are not on any small
grid, so XLA rounds its partial sums in an order NumPy cannot follow. The reference computes
that conv exactly (the image as integers times ``2**-E``) and rounds once: the correctly
rounded result, within a few ulp of XLA's. A value that lands within those ulp of a rounding
midpoint of the first activation quantizer may take the neighbouring code, and then logits
differ by more than an ulp; ``reference_forward(..., stem_conv=...)`` takes the first conv's
output from elsewhere (e.g. the Flax model) and then the logits are equal bit for bit. So the
decision: logits are bitwise equal given the first conv's output (always, tested); the first
conv itself agrees within the float32 summation bound (measured: about 4 units of
``2**-24 Σ|x_i w_i|`` for its 27 terms, i.e. 2–3 ulp of the largest outputs); and the logits
are bitwise equal on every image where no first-layer code flips (on CIFAR-10 test images:
all of them, in the tests). These statements are about XLA:CPU; a GPU convolution in TF32
(JAX's default float32 matmul precision there) is not exact, and a host without FMA rounds
BatchNorm twice (``fused_multiply_add=False``). The reference supports ResNetCifar
(ResNet-20) with every weight and activation quantized, power-of-two steps and a pooled map
of a power-of-two size; anything else is an :class:`ExportError`.

Bad input (missing workdir, unfinished run, no deliverable model, a model the reference does
not support) is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import struct
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

import mpdnn.quantizers as mq
from mpdnn.cli import OneLineParser
from mpdnn.nn.layers import LogitScale, QConv, QLinear, QuantizedWeights
from mpdnn.nn.rules import path_str, quantizable_sites
from mpdnn.optim.accounting import KB, counted_tensors
from mpdnn.optim.memory import memory

MAGIC = b"MPDNNMPQ"
VERSION = 1
_FIXED = struct.Struct("<8sIIQQ")
#: Size of the fixed header; the JSON table follows it.
FIXED_HEADER_BYTES = _FIXED.size  # 32
FLOAT_BITS = 32
_SQRT2 = np.float32(math.sqrt(2.0))
_F32_SQRT2_MANTISSA = 0x3504F3  # as mpdnn.quantizers._ste.pow2_round
# XLA's float32 sums are exact while every partial sum is an integer below 2**24 (in units of
# the two steps); float64 BLAS gives exact integer dot products below 2**53.
_F32_EXACT = 2**24
_F64_EXACT = 2**53


class ExportError(ValueError):
    """Bad input to the exporter or the reference forward; the message is one line."""


# ----------------------------------------------------------------------------------------
# Weight tensors: encoding to and decoding from b-bit codes.


@dataclasses.dataclass(frozen=True, eq=False)
class WeightTensor:
    """One conv/linear kernel or bias, as stored in the payload.

    Attributes:
      name: ``"<site>.kernel"`` or ``"<site>.bias"`` (the layer's dotted module path).
      shape: the tensor's shape (HWIO kernels, ``(in, out)`` linear kernels).
      encoding: ``"uniform"``, ``"pow2"`` or ``"float32"`` (see the module docstring).
      bits: bits per value in the payload: the inferred bitwidth (docs/method.md §3), 32 for float.
      codes: the ``bits``-wide fields as stored, ``uint64``, flat (C order).
      integers: ``int64`` of ``shape`` with ``value = integers * step`` exactly; for pow2,
        ``sign · 2**(exponent - qmin_exponent)`` (step = qmin). ``None`` for float32.
      step_exponent: ``log2`` of the step (``d`` for uniform, ``qmin`` for pow2).
      info: the tensor's table entry (spec, raw θ, exponents, layer geometry...).
    """

    name: str
    shape: tuple[int, ...]
    encoding: str
    bits: int
    codes: np.ndarray
    integers: np.ndarray | None
    step_exponent: int | None
    info: dict[str, Any]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def step(self) -> float | None:
        """The power-of-two step (``None`` for float32)."""
        return None if self.step_exponent is None else math.ldexp(1.0, self.step_exponent)

    @property
    def values(self) -> np.ndarray:
        """The float32 values the network computes with (``integers * step``, exact)."""
        if self.encoding == "float32":
            return self.codes.astype(np.uint32).view(np.float32).reshape(self.shape)
        if self.encoding == "pow2":
            sign, exponent = _pow2_fields(self.codes, self.bits, self.info["qmin_exponent"])
            mags = np.ldexp(np.float32(1.0), exponent.astype(np.int32))
            return np.where(sign == 1, -mags, mags).astype(np.float32).reshape(self.shape)
        return np.ldexp(self.integers.astype(np.float32), np.int32(self.step_exponent))

    @property
    def exponents(self) -> np.ndarray | None:
        """pow2 only: ``log2 |value|`` of every element (int64, of ``shape``)."""
        if self.encoding != "pow2":
            return None
        _, exponent = _pow2_fields(self.codes, self.bits, self.info["qmin_exponent"])
        return exponent.reshape(self.shape)


def _exponent_of_pow2(value: float, what: str) -> int:
    """``log2 value`` for a positive power of two; ExportError otherwise."""
    mantissa, exponent = math.frexp(float(value))
    if mantissa != 0.5:
        raise ExportError(
            f"{what} = {value!r} is not a power of two; export needs pow2_step=True "
            "(docs/method.md §2)"
        )
    return exponent - 1


def _spec_json(spec: mq.QuantSpec) -> dict[str, Any]:
    return {
        k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(spec).items()
    }


def _spec_from_json(fields: Mapping[str, Any]) -> mq.QuantSpec:
    return mq.QuantSpec(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in fields.items()})


def _scalar_theta(theta: Mapping[str, Any], where: str) -> dict[str, float]:
    """θ as plain floats (float32 values, exact in JSON); per-channel θ are refused."""
    out = {}
    for name, value in theta.items():
        arr = np.asarray(value, np.float32)
        if arr.ndim != 0:
            raise ExportError(f"{where}: per-channel θ {name!r} {arr.shape} is not supported")
        out[name] = float(arr)
    return out


def _integral_bits(bits: Any, where: str) -> int:
    value = float(np.mean(np.asarray(bits)))
    if not value.is_integer() or value < 1:
        raise ExportError(f"{where}: bitwidth {value} is not a positive integer")
    return int(value)


def encode_weight(
    name: str,
    weights: jax.typing.ArrayLike,
    theta: Mapping[str, jax.typing.ArrayLike] | None,
    spec: mq.QuantSpec | None,
    *,
    bits: jax.typing.ArrayLike | None = None,
    layer: Mapping[str, Any] | None = None,
) -> WeightTensor:
    """Quantize float ``weights`` with ``(theta, spec)`` and encode them for the payload.

    The values are those of :func:`mpdnn.quantizers.quantize` (the network's own), so they
    are exactly what the trained model computes with. ``bits`` defaults to
    :func:`mpdnn.quantizers.bitwidth`; the model exporter passes the accounting's bits. A
    ``spec`` of ``None`` stores the float32 weights at 32 bits. Raises :class:`ExportError`
    when the quantizer has no integer code (a step that is not a power of two, a signed pow2
    grid with a zero code, a pow2 range with qmax < qmin) or the values need more bits.
    """
    w = np.asarray(weights, np.float32)
    shape = tuple(int(n) for n in w.shape)
    info: dict[str, Any] = {"name": name, "shape": list(shape), "numel": math.prod(shape)}
    if layer is not None:
        info["layer"] = dict(layer)
    if spec is None:
        info.update(encoding="float32", bits=FLOAT_BITS, spec=None, theta={})
        codes = np.ascontiguousarray(w).reshape(-1).view(np.uint32).astype(np.uint64)
        return WeightTensor(name, shape, "float32", FLOAT_BITS, codes, None, None, info)
    theta_f = _scalar_theta(theta or {}, name)
    b = _integral_bits(mq.bitwidth(theta_f, spec) if bits is None else bits, name)
    q = _quantize(w, theta_f, spec)
    params = mq.canonical(theta_f, spec)
    info.update(spec=_spec_json(spec), theta=theta_f, bits=b, signed=spec.signed)
    if spec.family == "uniform":
        e = _exponent_of_pow2(params.d, f"{name}: step d")
        k = np.ldexp(q.astype(np.float64), -e)
        if not np.array_equal(k, np.round(k)):
            raise ExportError(f"{name}: quantized values are not on the grid of step 2**{e}")
        k = k.astype(np.int64)
        lo, hi = (-(2 ** (b - 1)) + 1, 2 ** (b - 1) - 1) if spec.signed else (0, 2**b - 1)
        if k.size and (k.min() < lo or k.max() > hi):
            raise ExportError(
                f"{name}: integers span [{k.min()}, {k.max()}], more than {b} bits hold"
            )
        max_code = int(mq.round_half_away(params.qmax / params.d))
        info.update(encoding="uniform", step_exponent=e, max_code=max_code)
        codes = (k.reshape(-1) & ((1 << b) - 1)).astype(np.uint64)
        return WeightTensor(name, shape, "uniform", b, codes, k.reshape(shape), e, info)
    if not spec.signed or spec.with_zero:
        raise ExportError(
            f"{name}: only signed pow2 weights without a zero code can be packed "
            f"(docs/method.md §1.2), not {spec.describe()}"
        )
    emin = _exponent_of_pow2(params.qmin, f"{name}: qmin")
    emax = _exponent_of_pow2(params.qmax, f"{name}: qmax")
    if emax < emin:
        raise ExportError(f"{name}: pow2 quantizer with qmax < qmin has no code")
    if emax - emin + 1 > 2 ** (b - 1):
        raise ExportError(f"{name}: {emax - emin + 1} magnitudes do not fit {b} bits")
    mantissa, exponent = np.frexp(np.abs(q).astype(np.float64))
    if not np.all(mantissa == 0.5):
        raise ExportError(f"{name}: quantized magnitudes are not all powers of two")
    exponent = exponent.astype(np.int64) - 1
    if exponent.size and (exponent.min() < emin or exponent.max() > emax):
        raise ExportError(f"{name}: quantized magnitudes leave [2**{emin}, 2**{emax}]")
    sign = (q < 0).astype(np.uint64).reshape(-1)
    j = (exponent - emin).astype(np.uint64).reshape(-1)
    codes = (sign << np.uint64(b - 1)) | j
    info.update(encoding="pow2", qmin_exponent=emin, qmax_exponent=emax)
    return WeightTensor(
        name, shape, "pow2", b, codes, _pow2_integers(q, exponent, emin, emax), emin, info
    )


@functools.partial(jax.jit, static_argnums=2)
def _quantize_flat(flat: jax.Array, theta: dict[str, jax.Array], spec: mq.QuantSpec) -> jax.Array:
    return mq.quantize(flat, theta, spec)


def _quantize(w: np.ndarray, theta: dict[str, float], spec: mq.QuantSpec) -> np.ndarray:
    """:func:`mpdnn.quantizers.quantize` of ``w`` (elementwise), compiled once per spec and
    power-of-two length bucket instead of op by op for every kernel shape."""
    flat = w.reshape(-1)
    padded = np.zeros(1 << max(flat.size - 1, 0).bit_length(), np.float32)
    padded[: flat.size] = flat
    theta_arrays = {k: jnp.float32(v) for k, v in theta.items()}
    return np.asarray(_quantize_flat(padded, theta_arrays, spec))[: flat.size].reshape(w.shape)


def _pow2_integers(q, exponent, emin: int, emax: int) -> np.ndarray | None:
    """``sign · 2**(e - emin)`` as int64 (None when the span overflows int64)."""
    if emax - emin > 62:
        return None
    mags = np.left_shift(np.int64(1), (exponent - emin).astype(np.int64))
    return np.where(q < 0, -mags, mags).astype(np.int64).reshape(q.shape)


def _pow2_fields(codes: np.ndarray, bits: int, emin: int) -> tuple[np.ndarray, np.ndarray]:
    sign = (codes >> np.uint64(bits - 1)) & np.uint64(1)
    j = codes & np.uint64((1 << (bits - 1)) - 1)
    return sign.astype(np.int64), j.astype(np.int64) + emin


def _decode_weight(info: Mapping[str, Any], codes: np.ndarray) -> WeightTensor:
    name, shape, bits = info["name"], tuple(info["shape"]), int(info["bits"])
    encoding = info["encoding"]
    if encoding == "float32":
        return WeightTensor(name, shape, encoding, bits, codes, None, None, dict(info))
    if encoding == "uniform":
        k = codes.astype(np.int64)
        if info["signed"]:
            k = np.where(k >= 2 ** (bits - 1), k - 2**bits, k)
        e = int(info["step_exponent"])
        return WeightTensor(name, shape, encoding, bits, codes, k.reshape(shape), e, dict(info))
    if encoding == "pow2":
        emin, emax = int(info["qmin_exponent"]), int(info["qmax_exponent"])
        sign, exponent = _pow2_fields(codes, bits, emin)
        q = np.where(sign == 1, -1.0, 1.0)
        ints = _pow2_integers(q, exponent, emin, emax)
        ints = None if ints is None else ints.reshape(shape)
        return WeightTensor(name, shape, encoding, bits, codes, ints, emin, dict(info))
    raise ExportError(f"{name}: unknown encoding {encoding!r}")


# ----------------------------------------------------------------------------------------
# The bitstream.


_CHUNK = 1 << 20  # values per step: bounds the bit arrays' memory for large models


def _field_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """The bits of every code, least significant first, as one uint8 array."""
    shifts = np.arange(bits, dtype=np.uint64)
    return ((codes.reshape(-1, 1) >> shifts) & np.uint64(1)).astype(np.uint8).reshape(-1)


def pack_bits(fields: Sequence[tuple[np.ndarray, int]]) -> tuple[bytes, int]:
    """Concatenate ``(codes, bits)`` into one LSB-first bitstream; returns (bytes, bit count).

    Stream bit ``i`` is bit ``i % 8`` of byte ``i // 8``; the last byte is zero-padded.
    """
    out, pending, total = [], np.zeros(0, np.uint8), 0
    for codes, bits in fields:
        codes = np.asarray(codes, np.uint64).reshape(-1)
        total += codes.size * bits
        for i in range(0, codes.size, _CHUNK):
            stream = np.concatenate([pending, _field_bits(codes[i : i + _CHUNK], bits)])
            whole = stream.size - stream.size % 8
            out.append(np.packbits(stream[:whole], bitorder="little").tobytes())
            pending = stream[whole:]
    out.append(np.packbits(pending, bitorder="little").tobytes())
    return b"".join(out), total


def unpack_bits(payload: bytes, start: int, count: int, bits: int) -> np.ndarray:
    """``count`` codes of ``bits`` bits from stream bit ``start`` (uint64)."""
    weights = np.uint64(1) << np.arange(bits, dtype=np.uint64)
    out = np.empty(count, np.uint64)
    for i in range(0, count, _CHUNK):
        n = min(_CHUNK, count - i)
        first_bit = start + i * bits
        first, last = first_bit // 8, -(-(first_bit + n * bits) // 8)
        window = np.unpackbits(np.frombuffer(payload[first:last], np.uint8), bitorder="little")
        offset = first_bit - 8 * first
        fields = window[offset : offset + n * bits].reshape(n, bits).astype(np.uint64)
        out[i : i + n] = (fields * weights).sum(axis=1, dtype=np.uint64)
    return out


# ----------------------------------------------------------------------------------------
# Activation quantizers in NumPy.


@dataclasses.dataclass(frozen=True, eq=False)
class ActivationQuantizer:
    """One activation site's quantizer as stored: spec, raw θ and the derived grid.

    ``step`` is ``d`` (uniform) or ``qmin`` (pow2): every output is ``integers(x) * step``.
    :meth:`values` equals :func:`mpdnn.quantizers.quantize` bit for bit (tested).
    """

    site: str
    shape: tuple[int, ...]
    spec: mq.QuantSpec
    theta: dict[str, float]
    bits: int
    step_exponent: int
    qmax: np.float32
    qmin: np.float32 | None
    info: dict[str, Any]

    @property
    def step(self) -> float:
        return math.ldexp(1.0, self.step_exponent)

    def integers(self, x: np.ndarray) -> np.ndarray:
        """Integer codes (int64): ``values(x) = integers(x) * step`` exactly."""
        x = np.asarray(x, np.float32)
        spec = self.spec
        if spec.family == "uniform":
            lo = -self.qmax if spec.signed else np.float32(0.0)
            c = np.minimum(np.maximum(x, lo), self.qmax)
            return _round_half_away(np.ldexp(c, np.int32(-self.step_exponent)))
        if not spec.signed:
            x = np.maximum(x, np.float32(0.0))
        sign = np.where(x < 0, -1, 1).astype(np.int64)
        a = np.abs(x)
        below = a < self.qmin
        if spec.with_zero:
            below &= a >= self.qmin / _SQRT2
        inside = (a >= self.qmin) & (a < self.qmax)
        above = a >= self.qmax
        emin = self.step_exponent
        emax = _exponent_of_pow2(float(self.qmax), f"{self.site}: qmax")
        e = np.where(inside, _pow2_round_exponent(np.where(inside, a, 1.0)), emin)
        mag = np.where(inside, np.left_shift(np.int64(1), (e - emin).astype(np.int64)), 0)
        mag = mag + below * np.int64(1) + above * (np.int64(1) << np.int64(emax - emin))
        return sign * mag

    def values(self, x: np.ndarray) -> np.ndarray:
        """The quantized float32 values (as the network computes them)."""
        return np.ldexp(self.integers(x).astype(np.float32), np.int32(self.step_exponent))

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any]) -> ActivationQuantizer:
        """The quantizer of a table entry (:func:`encode_activation`)."""
        return cls(
            site=entry["site"],
            shape=tuple(entry["shape"]),
            spec=_spec_from_json(entry["spec"]),
            theta=dict(entry["theta"]),
            bits=int(entry["bits"]),
            step_exponent=int(entry["step_exponent"]),
            qmax=np.float32(entry["qmax"]),
            qmin=None if entry.get("qmin") is None else np.float32(entry["qmin"]),
            info=dict(entry),
        )


def _round_half_away(v: np.ndarray) -> np.ndarray:
    """Round half away from zero, exactly: float32 ``v`` plus 1/2 is exact in float64."""
    v = np.asarray(v, np.float64)
    return np.trunc(v + np.copysign(0.5, v)).astype(np.int64)


def _pow2_round_exponent(a: np.ndarray) -> np.ndarray:
    """``round(log2 a)`` of positive normal float32 ``a`` from its bits (as ``pow2_round``)."""
    bits = np.asarray(a, np.float32).view(np.int32).astype(np.int64)
    up = (bits & 0x007FFFFF) > _F32_SQRT2_MANTISSA
    return ((bits >> 23) & 0xFF) - 127 + up


def encode_activation(
    site: str,
    shape: Sequence[int],
    theta: Mapping[str, jax.typing.ArrayLike],
    spec: mq.QuantSpec,
    *,
    bits: jax.typing.ArrayLike | None = None,
) -> dict[str, Any]:
    """The table entry of one activation quantizer: spec, raw θ and the derived grid.

    ``step``/``step_exponent`` are ``d`` (uniform) or ``qmin`` (pow2), ``qmax`` the
    canonical range, ``bits`` :func:`mpdnn.quantizers.bitwidth` (or the given ``bits``).
    :meth:`ActivationQuantizer.from_entry` reads it back.
    """
    theta_f = _scalar_theta(theta, site)
    params = mq.canonical(theta_f, spec)
    entry: dict[str, Any] = {
        "site": site,
        "shape": [int(n) for n in shape],
        "numel": math.prod(shape),
        "spec": _spec_json(spec),
        "theta": theta_f,
        "bits": _integral_bits(mq.bitwidth(theta_f, spec) if bits is None else bits, site),
        "qmax": float(params.qmax),
    }
    if spec.family == "uniform":
        e = _exponent_of_pow2(params.d, f"{site}: step d")
        entry.update(step_exponent=e, step=float(params.d))
        entry["max_code"] = int(mq.round_half_away(params.qmax / params.d))
    else:
        emin = _exponent_of_pow2(params.qmin, f"{site}: qmin")
        emax = _exponent_of_pow2(params.qmax, f"{site}: qmax")
        if emax < emin:
            raise ExportError(f"{site}: pow2 quantizer with qmax < qmin has no code")
        entry.update(step_exponent=emin, step=float(params.qmin), qmin=float(params.qmin))
        entry.update(qmin_exponent=emin, qmax_exponent=emax)
    return entry


# ----------------------------------------------------------------------------------------
# The file.


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


# ----------------------------------------------------------------------------------------
# A finished run -> model.


class _Shapes(NamedTuple):
    """What ``trainer.build_model`` reads of a dataset."""

    image_shape: tuple[int, ...]
    num_classes: int


def _data_shapes(config) -> _Shapes:
    """Input shape and class count of the run's dataset, from its config (report.json's
    ``input_shape``, where the run wrote one, takes precedence over the shape)."""
    d = config.data
    size = int(d.get("image_size", 224))
    shapes = {
        "cifar10": ((32, 32, 3), 10),
        "digits": ((8, 8, 1), 10),
        "synthetic": (tuple(d.get("synthetic_shape", (32, 32, 3))), d.get("synthetic_classes", 10)),
        "imagenet": ((size, size, 3), 1000),
    }
    if d.name not in shapes:
        raise ExportError(f"unknown dataset {d.name!r} in config.json")
    shape, classes = shapes[d.name]
    if d.get("stream"):  # streamed with ImageNet preprocessing: crops of image_size
        shape = (size, size, shape[-1])
    return _Shapes(tuple(int(n) for n in shape), int(classes))


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ExportError(f"cannot read {what} {path}: {err}") from None


def load_run(workdir: str | Path) -> tuple[nnx.Module, dict[str, Any]]:
    """The delivered model of a finished training run and a description of the run.

    Rebuilds the model from ``config.json`` (``init.from_workdir`` cleared: the restored
    checkpoint holds every parameter) and restores ``best/`` when ``summary.json`` says the
    delivered model is the best feasible evaluation, else ``final/``.
    """
    import ml_collections

    from mpdnn.training import config as cfg
    from mpdnn.training.checkpoint import Checkpointer, CheckpointError
    from mpdnn.training.trainer import build_model

    workdir = Path(workdir)
    if not workdir.is_dir():
        raise ExportError(f"no run directory {workdir}")
    if not (workdir / "config.json").is_file():
        raise ExportError(
            f"no config.json in {workdir}: not a run of python -m mpdnn.train (a config with "
            "variants writes one run per variant: pass RUN/<variant>)"
        )
    if not (workdir / "summary.json").is_file():
        raise ExportError(
            f"{workdir} is not a finished run (no summary.json): let it finish, or resume it "
            "with the same python -m mpdnn.train command"
        )
    summary = _read_json(workdir / "summary.json", "run summary")
    config = ml_collections.ConfigDict(_read_json(workdir / "config.json", "run config"))
    delivered = summary.get("delivered")
    if delivered is None:
        raise ExportError(
            f"{workdir} delivered no model: no evaluation met every budget "
            f"{summary.get('budgets')} (docs/method.md §6); there is nothing feasible to export"
        )
    directory = workdir / ("best" if delivered == "best_feasible" else "final")
    if not directory.is_dir():
        raise ExportError(f"{workdir} is not a finished run: no {directory.name}/ checkpoint")
    data = config.data.name
    try:
        shapes = _data_shapes(config)
    except ExportError as err:
        raise ExportError(f"{workdir}: {err}") from None
    report_path = workdir / "report.json"
    if report_path.is_file():
        shape = _read_json(report_path, "run report").get("input_shape")
        shapes = shapes._replace(image_shape=tuple(shape or shapes.image_shape))
    # The checkpoint holds every parameter: nothing is loaded from elsewhere.
    config.init.from_workdir = None
    if "torchvision" in config.init:
        config.init.torchvision = None
    try:
        model = build_model(config, shapes, workdir)
    except cfg.ConfigError as err:
        raise ExportError(f"{workdir}/config.json: {err}") from None
    _, params, rest = nnx.split(model, nnx.Param, ...)
    with Checkpointer(directory, max_to_keep=1, async_save=False) as ckpt:
        try:
            restored = ckpt.restore({"params": params, "rest": rest})
        except CheckpointError as err:
            raise ExportError(f"{directory}: {err}") from None
    if restored is None:
        raise ExportError(f"{directory} holds no checkpoint: {workdir} is not a finished run")
    step, state, metadata = restored
    nnx.update(model, state["params"], state["rest"])
    model.eval()
    run = {
        "workdir": str(workdir),
        "name": summary.get("name"),
        "model": config.model.name,
        "dataset": data,
        "delivered": delivered,
        "checkpoint": directory.name,
        "step": int(step),
        "test_error": summary.get("delivered_test_error"),
        "budgets": summary.get("budgets"),
        "delivered_sizes": summary.get("delivered_sizes"),
        "compute_dtype": config.model.get("compute_dtype") or "float32",
    }
    return model, run


def export_run(workdir: str | Path, out: str | Path) -> dict[str, Any]:
    """:func:`load_run` then :func:`export_model`; returns sizes and the run description."""
    model, run = load_run(workdir)
    result = export_model(model, out, meta={"run": run})
    return {**result, "run": run}


# ----------------------------------------------------------------------------------------
# The reference forward (ResNetCifar) in NumPy.


class Trace(NamedTuple):
    """A reference forward pass: logits and what is needed to compare it with Flax's.

    Attributes:
      logits: float32 ``[N, classes]``.
      stem_conv: float32 output of the first conv (before BatchNorm): the correctly rounded
        exact result, or the ``stem_conv`` that was passed in.
      stem_terms: float64 ``Σ |x_i w_i|`` of every first-conv output (the scale of any
        float summation's error: at most ``n · 2**-24 · stem_terms`` for ``n`` terms, in any
        order); None when ``stem_conv`` was passed in.
      codes: ``{activation site: int64 codes}`` (``value = code · step``).
      exact: ``{layer: bool}``: whether every partial sum of the Flax model's float32
        conv/linear on these inputs is an exactly representable integer multiple of the
        step product (true: XLA's sum is exact in any order, so equality must hold).
    """

    logits: np.ndarray
    stem_conv: np.ndarray
    stem_terms: np.ndarray | None
    codes: dict[str, np.ndarray]
    exact: dict[str, bool]


def _fma32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 ``a·b + c`` rounded once (a fused multiply-add), exactly.

    The float64 product of two float32 is exact; the float64 sum ``s`` is corrected by its
    exact error ``e`` (TwoSum) where ``s`` lies exactly halfway between two float32, the one
    case where rounding ``s`` instead of ``s + e`` to float32 can go the wrong way.
    """
    p = np.asarray(a, np.float64) * np.asarray(b, np.float64)
    c = np.broadcast_to(np.asarray(c, np.float64), p.shape)
    s = p + c
    bb = s - p
    e = (p - (s - bb)) + (c - bb)
    r = s.astype(np.float32)
    r64 = r.astype(np.float64)
    toward = np.where(s > r64, np.float32(np.inf), np.float32(-np.inf))
    other = np.nextafter(r, toward)
    midpoint = (s != r64) & (s - r64 == other.astype(np.float64) - s) & (e != 0)
    pick_other = midpoint & ((e > 0) == (other > r))
    return np.where(pick_other, other, r).astype(np.float32)


def _int_matmul(a: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, int]:
    """Exact int64 ``a @ w`` and a bound on ``max Σ|a_i w_i|`` (the largest partial sum).

    float64 BLAS is exact (and 10x faster than NumPy's integer matmul) while the bound is
    below 2**53; beyond it the int64 product is used, and beyond 2**63 nothing is exact.
    """
    bound = a.shape[-1] * int(np.abs(a).max(initial=0)) * int(np.abs(w).max(initial=0))
    if bound >= 2**62:
        raise ExportError(f"integer dot products of up to {bound:.3g} overflow int64")
    if bound < _F64_EXACT:
        out = (a.astype(np.float64) @ w.astype(np.float64)).astype(np.int64)
    else:
        out = a @ w
    if bound >= _F32_EXACT and bound < _F64_EXACT:
        # The static bound is loose: the largest actual Σ|a_i w_i| decides float32 exactness.
        bound = int((np.abs(a).astype(np.float64) @ np.abs(w).astype(np.float64)).max(initial=0))
    return out, bound


def _im2col(x: np.ndarray, kh: int, kw: int, strides, padding) -> np.ndarray:
    """``[N, Ho, Wo, kh·kw·C]`` patches of NHWC ``x`` (explicit padding pairs)."""
    if isinstance(padding, str):
        raise ExportError(f"reference conv needs explicit padding, not {padding!r}")
    (pt, pb), (pl, pr) = padding
    x = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))
    win = win[:, :: strides[0], :: strides[1]]  # [N, Ho, Wo, C, kh, kw]
    n, ho, wo, c = win.shape[:4]
    return np.ascontiguousarray(win.transpose(0, 1, 2, 4, 5, 3)).reshape(n, ho, wo, kh * kw * c)


def _conv_int(codes: np.ndarray, weight: WeightTensor) -> tuple[np.ndarray, int]:
    geo = weight.info["layer"]
    if geo.get("groups", 1) != 1:
        raise ExportError(f"{weight.name}: grouped convs are not in the reference forward")
    kh, kw, cin, cout = weight.shape
    patches = _im2col(codes, kh, kw, geo["strides"], geo["padding"])
    n, ho, wo, k = patches.shape
    out, bound = _int_matmul(patches.reshape(-1, k), weight.integers.reshape(k, cout))
    return out.reshape(n, ho, wo, cout), bound


def _to_f32(total: np.ndarray, exponent: int) -> np.ndarray:
    """``total · 2**exponent`` as float32, rounded once (``|total| < 2**53``)."""
    return np.ldexp(total.astype(np.float64).astype(np.float32), np.int32(exponent))


def _image_as_integers(x: np.ndarray) -> tuple[np.ndarray, int]:
    """float32 ``x = X · 2**-E`` with int64 ``X``, exactly."""
    _, exponent = np.frexp(x[x != 0])
    if exponent.size == 0:
        return np.zeros(x.shape, np.int64), 0
    scale = 24 - int(exponent.min())  # a float32 has 24 significant bits
    top = int(exponent.max()) + scale
    if top > 52:
        raise ExportError(
            f"input values span 2**{int(exponent.min())}..2**{int(exponent.max())}: too wide "
            "for the exact first conv"
        )
    return np.ldexp(x.astype(np.float64), scale).astype(np.int64), scale


class _Reference:
    """The ResNetCifar forward pass over an :class:`ExportedModel`."""

    def __init__(self, exported: ExportedModel, fused_multiply_add: bool):
        arch = exported.table.get("architecture", {})
        if arch.get("class") != "ResNetCifar":
            raise ExportError(
                f"the reference forward supports ResNetCifar (resnet20) models, not "
                f"{arch.get('class')!r}"
            )
        self.m = exported
        self.prefix = arch["prefix"]
        self.fma = fused_multiply_add
        self.exact: dict[str, bool] = {}
        self.codes: dict[str, np.ndarray] = {}
        for w in exported.weights.values():
            if w.integers is None:
                raise ExportError(
                    f"the reference forward needs every weight quantized: {w.name} is "
                    f"{w.encoding} (or its pow2 range overflows int64)"
                )
        for entry in exported.table["activations"]:
            if entry.get("spec") is None:
                raise ExportError(
                    f"the reference forward needs every activation quantized: "
                    f"{entry['site']} is float"
                )

    def weight(self, name: str) -> WeightTensor:
        return self.m.weights[self.prefix + name]

    def batch_norm(self, x: np.ndarray, name: str) -> np.ndarray:
        f = self.m.floats
        path = self.prefix + name
        y = x - f[f"{path}.mean"]
        mul = f[f"{path}.multiplier"]
        bias = f.get(f"{path}.bias", np.zeros_like(mul))
        if self.fma:
            return _fma32(y, mul, bias)
        return (y * mul + bias).astype(np.float32)

    def quantize(self, x: np.ndarray, site: str) -> tuple[np.ndarray, int]:
        act = self.m.activations[self.prefix + site]
        codes = act.integers(x)
        self.codes[self.prefix + site] = codes
        return codes, act.step_exponent

    def conv(self, codes: np.ndarray, exponent: int, name: str) -> np.ndarray:
        w = self.weight(f"{name}.kernel")
        total, bound = _conv_int(codes, w)
        self.exact[self.prefix + name] = bound < _F32_EXACT
        return _to_f32(total, exponent + w.step_exponent)

    def stem_conv(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The exact first conv rounded once, and its ``Σ |x_i w_i|`` (float64)."""
        w = self.weight("stem.kernel")
        integers, scale = _image_as_integers(x)
        total, bound = _conv_int(integers, w)
        if bound >= _F64_EXACT:
            raise ExportError(f"the exact first conv needs sums up to {bound:.3g} > 2**53")
        magnitude = dataclasses.replace(w, integers=np.abs(w.integers))
        terms, _ = _conv_int(np.abs(integers), magnitude)
        return (
            _to_f32(total, w.step_exponent - scale),
            np.ldexp(terms.astype(np.float64), w.step_exponent - scale),
        )

    def __call__(self, x: np.ndarray, stem_conv: np.ndarray | None) -> Trace:
        x = np.asarray(x, np.float32)
        if stem_conv is None:
            stem, terms = self.stem_conv(x)
        else:
            stem, terms = np.asarray(stem_conv, np.float32), None
        self.exact[self.prefix + "stem"] = False  # float input: XLA rounds its sums
        codes, e = self.quantize(self.batch_norm(stem, "stem_bn"), "stem_act")
        for block in self.m.table["architecture"]["blocks"]:
            p = block["path"]
            h, e1 = self.quantize(
                self.batch_norm(self.conv(codes, e, f"{p}.conv1"), f"{p}.bn1"), f"{p}.act1"
            )
            y = self.batch_norm(self.conv(h, e1, f"{p}.conv2"), f"{p}.bn2")
            shortcut = np.ldexp(codes.astype(np.float32), np.int32(e))
            s = block["stride"]
            shortcut = shortcut[:, ::s, ::s, :]
            if block["pad_features"]:
                half = block["pad_features"] // 2
                pad = ((0, 0), (0, 0), (0, 0), (half, block["pad_features"] - half))
                shortcut = np.pad(shortcut, pad)
            codes, e = self.quantize((y + shortcut).astype(np.float32), f"{p}.act2")
        return Trace(self.head(codes, e), stem, terms, self.codes, self.exact)

    def head(self, codes: np.ndarray, exponent: int) -> np.ndarray:
        positions = codes.shape[1] * codes.shape[2]
        shift = _exponent_of_pow2(positions, "pooled positions")  # jnp.mean divides exactly
        pooled = codes.sum(axis=(1, 2))
        kernel = self.weight("head.kernel")
        total, bound = _int_matmul(pooled, kernel.integers)
        pooled_exact = int(np.abs(pooled).max(initial=0)) < _F32_EXACT
        self.exact[self.prefix + "head"] = bound < _F32_EXACT and pooled_exact
        logits = _to_f32(total, exponent - shift + kernel.step_exponent)
        bias_name = self.prefix + "head.bias"
        if bias_name in self.m.weights:
            logits = (logits + self.m.weights[bias_name].values).astype(np.float32)
        scale = self.m.table["architecture"].get("logit_scale")
        if scale:
            logits = (self.m.floats[scale] * logits).astype(np.float32)
        return logits


def reference_trace(
    exported: ExportedModel,
    images: np.ndarray,
    *,
    stem_conv: np.ndarray | None = None,
    fused_multiply_add: bool = True,
) -> Trace:
    """The integer reference forward of an exported ResNetCifar, with its intermediates.

    Args:
      exported: :func:`load`'s result.
      images: float32 NHWC network inputs (normalised as the model takes them).
      stem_conv: the first conv's float32 output to use instead of the exact one (to
        compare everything downstream of it bit for bit with another implementation).
      fused_multiply_add: BatchNorm's ``(x - mean)·mul + bias`` rounded once, as XLA:CPU
        fuses it in a jitted model; False rounds the product and the sum separately.

    Raises :class:`ExportError` for a model it does not support (another architecture, a
    float weight or activation, a pooled map whose size is not a power of two).
    """
    return _Reference(exported, fused_multiply_add)(images, stem_conv)


def reference_forward(exported: ExportedModel, images: np.ndarray, **kwargs) -> np.ndarray:
    """Logits of :func:`reference_trace` (float32 ``[N, classes]``)."""
    return reference_trace(exported, images, **kwargs).logits


# ----------------------------------------------------------------------------------------
# Comparison with the Flax model, and the command line.


def flax_forward(model: nnx.Module, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The Flax model's logits in eval mode, jitted as the trainer evaluates it, and its
    first conv's output (the stem of a ResNetCifar)."""
    model.eval()
    graphdef, state = nnx.split(model)
    inner = model.model if isinstance(model, LogitScale) else model

    @jax.jit
    def logits(state, x):
        return nnx.merge(graphdef, state)(x)

    stem_graph, stem_state = nnx.split(inner.stem)

    @jax.jit
    def stem(state, x):
        return nnx.merge(stem_graph, state)(x)

    x = jnp.asarray(images, jnp.float32)
    return np.asarray(logits(state, x)), np.asarray(stem(stem_state, x))


def compare(model: nnx.Module, exported: ExportedModel, images: np.ndarray) -> dict[str, Any]:
    """The reference forward against the jitted Flax model on ``images``.

    Keys: ``images``; ``exact_sums`` (every conv/linear after the first is exact in float32,
    so equality must hold); ``logits_equal_given_stem`` (images whose logits are bitwise
    equal when the reference takes the Flax model's first conv); ``logits_equal`` (the same
    with the reference's own, exact first conv); ``stem_codes_differing`` (first activation
    codes that the two first convs round differently; ``images_with_stem_code_flips``);
    ``unexplained_differences`` (images whose logits differ although none of their first
    codes does: must be 0); ``stem_conv_max_abs_diff`` and ``stem_conv_error_in_u`` (the
    largest ``|Δ| / (2**-24 Σ|x_i w_i|)``: float32 summation of ``n`` terms errs by at most
    ``n`` of these units, in any order).
    """
    own = reference_trace(exported, images)  # first: an unsupported model fails at once
    logits, stem = flax_forward(model, images)
    given = reference_trace(exported, images, stem_conv=stem)
    stem_site = exported.table["architecture"]["prefix"] + "stem_act"
    flips = own.codes[stem_site] != given.codes[stem_site]
    flipped = np.any(flips, axis=(1, 2, 3))
    delta = np.abs(own.stem_conv.astype(np.float64) - stem)
    units = delta / np.maximum(own.stem_terms * 2.0**-24, np.finfo(np.float64).tiny)
    return {
        "images": len(images),
        "exact_sums": all(v for k, v in given.exact.items() if not k.endswith("stem")),
        "logits_equal_given_stem": int(np.all(given.logits == logits, axis=1).sum()),
        "logits_equal": int(np.all(own.logits == logits, axis=1).sum()),
        "images_with_stem_code_flips": int(flipped.sum()),
        "unexplained_differences": int((np.any(own.logits != logits, axis=1) & ~flipped).sum()),
        "stem_codes_differing": int(flips.sum()),
        "stem_conv_max_abs_diff": float(delta.max(initial=0)),
        "stem_conv_error_in_u": float(units.max(initial=0)),
        "logits_max_abs_diff": float(np.abs(own.logits - logits).max(initial=0)),
    }


def _verify(workdir: Path, model: nnx.Module, out: Path, count: int) -> dict[str, Any]:
    """:func:`compare` on the first ``count`` test images of the run's own dataset."""
    import ml_collections

    from mpdnn.data import normalize
    from mpdnn.training.trainer import load_data

    exported = load(out)
    _Reference(exported, fused_multiply_add=True)  # an unsupported model: say so first
    config = ml_collections.ConfigDict(_read_json(workdir / "config.json", "run config"))
    dataset = load_data(config)
    images = dataset.test_images[:count]
    x = np.asarray(normalize(images, dataset.pixel_scale, dataset.pixel_offset), np.float32)
    result = compare(model, exported, x)
    result["data"] = dataset.description
    return result


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = OneLineParser(prog="python -m mpdnn.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, required=True, help="a finished training run")
    parser.add_argument(
        "--out", type=Path, default=None, help="the .mpq file to write (default RUN/model.mpq)"
    )
    parser.add_argument(
        "--verify",
        type=int,
        default=0,
        metavar="N",
        help="run the integer reference forward on N test images of the run's dataset and "
        "compare it with the Flax model (ResNet-20 only)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    args = parser.parse_args(argv)
    if args.verify < 0:
        parser.error(f"--verify must be >= 0, got {args.verify}")
    args.parser = parser
    return args


def _describe(result: dict[str, Any]) -> str:
    run = result["run"]
    lines = [
        f"{result['path']}: {result['file_bytes']} bytes = header {result['header_bytes']} "
        f"(fixed {result['fixed_header_bytes']} + table {result['table_bytes']}) + weight "
        f"payload {result['payload_bytes']} + float section {result['float_bytes']}",
        f"weight payload: {result['payload_bytes']} bytes = ceil({result['payload_bits']} "
        f"bits / 8); accounting (docs/method.md §5): weight_kb {result['weight_kb']!r} x 1024 = "
        f"{result['weight_kb'] * 1024:g} bytes for {result['num_weights']} weights",
        f"model: {run['model']} from {run['workdir']}, delivered {run['delivered']} "
        f"({run['checkpoint']}/ step {run['step']}, test error {run['test_error']})",
    ]
    if "verify" in result:
        v = result["verify"]
        lines.append(
            f"reference forward on {v['images']} test images ({v['data']}): logits bit-equal "
            f"on {v['logits_equal']}, and on {v['logits_equal_given_stem']} given the model's "
            f"own first conv; first conv max |diff| {v['stem_conv_max_abs_diff']:.3g} "
            f"({v['stem_conv_error_in_u']:.2f} u of its terms), "
            f"{v['stem_codes_differing']} first activation codes differ"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    parser = args.parser
    out = args.out if args.out is not None else args.workdir / "model.mpq"
    from mpdnn.data import DataError

    try:
        model, run = load_run(args.workdir)
        result = {**export_model(model, out, meta={"run": run}), "run": run}
        if args.verify:
            result["verify"] = _verify(args.workdir, model, out, args.verify)
    except (ExportError, DataError, OSError) as err:
        parser.error(str(err).splitlines()[0] if str(err) else type(err).__name__)
    if args.json:
        print(json.dumps(result, allow_nan=False))
    else:
        print(_describe(result))
    verify = result.get("verify")
    if verify and verify["logits_equal_given_stem"] != verify["images"]:
        print("error: the reference forward does NOT reproduce the model", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
