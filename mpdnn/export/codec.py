r"""Per-tensor encoding: weights as b-bit integer codes, the bitstream, activation grids.

The codes of one weight tensor (docs/method.md §3, §5; docs/export.md has the same with
examples), each a ``bits``-wide field of the payload's bitstream:

* ``uniform`` (U1/U2/U3, TQT, fixed): the integer ``k`` with ``value = k · 2**step_exponent``
  (the power-of-two step ``d`` of docs/method.md §2), in ``bits``-bit two's complement
  (signed; the inferred bits hold ``|k| <= round(qmax/d) <= 2**(bits-1) - 1``) or plain
  binary (unsigned).
* ``pow2`` (signed, no zero code: the paper's weights, docs/method.md §1.2):
  ``sign << (bits-1) | j`` with ``sign`` 1 for negative values and
  ``j = log2|value| - qmin_exponent`` the exponent index; magnitudes run over the
  ``M = qmax_exponent - qmin_exponent + 1`` powers of two between qmin and qmax, and
  docs/method.md §3's ``bits = ceil(log2 M) + 1`` is exactly one sign bit plus enough bits
  for ``j < M``. (An exact zero has quantized to +qmin: there is no zero.)
* ``float32``: a float (unquantized) weight tensor, as its IEEE-754 bits; docs/method.md §5
  counts it at 32 bits, and so does the payload.

:func:`pack_bits` concatenates the fields of every tensor into one LSB-first bitstream
(stream bit ``i`` is bit ``i % 8`` of byte ``i // 8``; the last byte is padded with zero
bits) and :func:`unpack_bits` reads them back. Activation quantizers hold no tensor: their
table entry (:func:`encode_activation`) gives the spec, raw θ and derived grid, and
:class:`ActivationQuantizer` quantizes with it in NumPy, bit for bit as
:func:`mpdnn.quantizers.quantize`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import mpdnn.quantizers as mq

FLOAT_BITS = 32
_SQRT2 = np.float32(math.sqrt(2.0))
_F32_SQRT2_MANTISSA = 0x3504F3  # as mpdnn.quantizers._ste.pow2_round


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
