r"""The integer reference forward of an exported ResNet-20, in NumPy, and its comparison with Flax.

How exact it is (:func:`reference_forward`): every conv and the linear layer take integer
activation codes and integer weight codes, whose dot products are computed exactly in int64
(through float64 BLAS where a bound proves it exact) and scaled by the product of their
power-of-two steps; BatchNorm, the residual add and the logit scale run in float32 exactly
as the jitted Flax model runs them on XLA:CPU (which fuses BatchNorm's multiply-add into one
FMA: one rounding). The Flax model's float32 convolutions are exact too whenever every
partial sum is an integer below 2**24 in units of the two steps (checked per layer:
:attr:`Trace.exact`), so from the first activation quantizer on, the reference reproduces
the logits **bit for bit** (tested). The one layer where that cannot hold is the first conv:
its input is the unquantized image, whose float32 values are not on any small grid, so XLA
rounds its partial sums in an order NumPy cannot follow. The reference computes that conv
exactly (the image as integers times ``2**-E``) and rounds once: the correctly rounded
result, within a few ulp of XLA's. A value that lands within those ulp of a rounding
midpoint of the first activation quantizer may take the neighbouring code, and then logits
differ by more than an ulp; ``reference_forward(..., stem_conv=...)`` takes the first conv's
output from elsewhere (e.g. the Flax model) and then the logits are equal bit for bit. So
the decision: logits are bitwise equal given the first conv's output (always, tested); the
first conv itself agrees within the float32 summation bound (measured: about 4 units of
``2**-24 Σ|x_i w_i|`` for its 27 terms, i.e. 2–3 ulp of the largest outputs); and the logits
are bitwise equal on every image where no first-layer code flips (on CIFAR-10 test images:
all of them, in the tests). These statements are about XLA:CPU; a GPU convolution in TF32
(JAX's default float32 matmul precision there) is not exact, and a host without FMA rounds
BatchNorm twice (``fused_multiply_add=False``). The reference supports ResNetCifar
(ResNet-20) with every weight and activation quantized, power-of-two steps and a pooled map
of a power-of-two size; anything else is an :class:`~mpdnn.export.codec.ExportError`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mpdnn.export.codec import ExportError, WeightTensor, _exponent_of_pow2
from mpdnn.export.mpq import ExportedModel
from mpdnn.nn.layers import LogitScale

# XLA's float32 sums are exact while every partial sum is an integer below 2**24 (in units of
# the two steps); float64 BLAS gives exact integer dot products below 2**53.
_F32_EXACT = 2**24
_F64_EXACT = 2**53


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
# Comparison with the Flax model.


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
