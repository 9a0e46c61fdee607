r"""ONNX export: the delivered network as a QDQ graph that onnxruntime runs (docs/export.md).

The graph is the model's own forward pass, traced once (``jax.make_jaxpr`` in eval mode) with
every quantized :class:`~mpdnn.nn.Quantizer` marked
(:func:`mpdnn.nn.quantizer.replace_quantizers`), then written op by op. What each part becomes:

* **Uniform weights** (U1/U2/U3, TQT, fixed): the integer codes ``k`` of ``.mpq``
  (``value = k · 2**e``) as an integer initializer of the smallest ONNX type that holds the
  learned bits: INT2 (ONNX 1.20), INT4, INT8, INT16, INT32 (UINT* for unsigned grids), read
  through ``DequantizeLinear`` with the power-of-two scale ``2**e``. Exact.
* **Pow2 weights** (``±2**j``, no zero code): no ONNX integer type holds them linearly (a
  4-bit pow2 grid spans ``2**7``: INT16), so the codes are stored as ``.mpq`` packs them,
  ``sign << (b-1) | j`` in UINT2/UINT4/UINT8/UINT16, and a ``Gather`` from a
  ``2**b``-entry float32 table of the values (``Cast`` to int32 first) makes the weights.
  Exact, at the learned bits (rounded up to the type) plus the table.
* **Float weights** (unquantized layers): float32 initializers.
* **Uniform activation sites**: clipped (``Max``, ``Min``) to the grid's
  ``[-max_code·d, max_code·d]`` (``[0, max_code·d]`` unsigned: the clip that replaces the
  ReLU; clipping to the last code rather than to ``qmax`` gives the same codes), then
  ``QuantizeLinear`` / ``DequantizeLinear`` with scale ``d = 2**e`` and zero point 0, in
  INT8/UINT8 up to 8 learned bits and INT16/UINT16 up to 16 (above, :class:`ExportError`):
  the clip holds the grid to its learned bits, an activation's type costs no file bytes,
  and onnxruntime's QDQ rewrites (1.32) fail on 4-bit activations. One difference is
  ONNX's: ``QuantizeLinear`` rounds halves to even, the quantizers (and the paper's code)
  away from zero, so an input exactly halfway between two codes may take the lower one.
  Inputs are BatchNorm outputs and residual sums, so this is rare; the agreement is
  measured (``results/export_onnx.md``).
* **Pow2 activation sites**: no QDQ pair holds a log grid, so the site is written as the
  quantizer's own staircase: ``qmin + Σ_k [|x| > t_k] · 2**k`` over the float32 thresholds
  ``t_k`` (``√2 · 2**k`` rounded as :func:`mpdnn.quantizers.pow2_round` rounds), times the
  sign (and the zero code below ``qmin/√2`` when the grid has one). Exact.
* BatchNorm (eval: its statistics folded into one multiply and add, as the traced model
  computes them), the option-A shortcut (strided ``Slice`` and channel ``Pad``), max pool,
  the average pool and the logit scale: whatever the forward pass does, as the ops it does.

Layout: the input is NHWC ``images [batch, H, W, C]`` (the model's, ``batch`` dynamic),
the output ``logits [batch, classes]``; each conv and max pool is wrapped in the
``Transpose`` pair ONNX's NCHW operators need (onnxruntime removes the pairs that cancel).
Opset 25 (ONNX 1.20, for INT2/UINT2).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.extend.core import Literal, Primitive

from mpdnn.export.codec import ExportError, WeightTensor
from mpdnn.export.mpq import encode_model
from mpdnn.nn import quantizable_sites
from mpdnn.nn.quantizer import replace_quantizers

OPSET = 25
_SQRT2 = np.float32(math.sqrt(2.0))  # pow2_round's threshold mantissa, as the codec's
INPUT, OUTPUT = "images", "logits"

# A quantizer in the traced graph: its output is its input's shape; ``index`` says which.
_MARK = Primitive("mpdnn_quantizer")
_MARK.def_abstract_eval(lambda x, *, index: x)
_MARK.def_impl(lambda x, *, index: x)

_CALLS = {"jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call"}
_BINARY = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "max": "Max", "min": "Min"}
_UNARY = {
    "neg": "Neg",
    "abs": "Abs",
    "sign": "Sign",
    "exp": "Exp",
    "log": "Log",
    "sqrt": "Sqrt",
    "tanh": "Tanh",
    "logistic": "Sigmoid",
    "floor": "Floor",
    "ceil": "Ceil",
    "copy": "Identity",
    "copy_p": "Identity",
}


def _types():
    from onnx import TensorProto as T

    signed = [(2, T.INT2, ml_dtypes.int2), (4, T.INT4, ml_dtypes.int4), (8, T.INT8, np.int8)]
    signed += [(16, T.INT16, np.int16), (32, T.INT32, np.int32)]
    unsigned = [(2, T.UINT2, ml_dtypes.uint2), (4, T.UINT4, ml_dtypes.uint4)]
    unsigned += [(8, T.UINT8, np.uint8), (16, T.UINT16, np.uint16), (32, T.UINT32, np.uint32)]
    return signed, unsigned


def integer_type(bits: int, *, signed: bool, where: str, widest: int = 32):
    """``(width, onnx type, numpy dtype)``: the narrowest ONNX integer type of at least
    ``bits`` bits."""
    signed_types, unsigned_types = _types()
    for width, onnx_type, dtype in signed_types if signed else unsigned_types:
        if bits <= width <= widest:
            return width, onnx_type, dtype
    raise ExportError(f"{where}: {bits} bits need an integer type wider than {widest} bits")


class _Graph:
    """The ONNX nodes and initializers being written."""

    def __init__(self):
        self.nodes: list = []
        self.initializers: list = []
        self.weight_initializers: set[str] = set()
        # The values computed from the input: axis 0 is the batch (the rest, e.g. weights
        # read through DequantizeLinear, have no batch axis).
        self.batched: set[str] = {INPUT}
        # Conv kernels written in ONNX's OIHW layout (codes transposed here: onnxruntime
        # 1.32 mis-transposes packed 2-bit initializers when it folds a Transpose into them).
        self.oihw: set[str] = set()
        self._count = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def const(self, value: np.ndarray, hint: str = "const", *, weight: bool = False) -> str:
        from onnx import numpy_helper

        name = self.name(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        if weight:
            self.weight_initializers.add(name)
        return name

    def node(self, op: str, inputs: list[str], hint: str | None = None, **attrs) -> str:
        from onnx import helper

        out = self.name(hint or op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        if self.batched.intersection(inputs):
            self.batched.add(out)
        return out

    def tensor(self, value: Any, hint: str = "const") -> str:
        """A graph value: a tensor's name as is, a constant as a float32/int initializer."""
        if isinstance(value, str):
            return value
        array = np.asarray(value)
        if array.dtype == np.float64:
            array = array.astype(np.float32)
        return self.const(array, hint)


class _Converter:
    def __init__(self, graph: _Graph, marks: list, weights, activations):
        self.g = graph
        self.marks = marks
        self.weights: Mapping[str, WeightTensor] = weights
        self.activations: Mapping[str, dict] = activations

    # -- the walk ------------------------------------------------------------------------
    def run(self, jaxpr, consts, args) -> list:
        env: dict = {}

        def read(v):
            if isinstance(v, Literal):
                return np.asarray(v.val, dtype=v.aval.dtype)
            return env[v]

        for var, value in zip(jaxpr.constvars, consts, strict=True):
            env[var] = np.asarray(value)
        for var, value in zip(jaxpr.invars, args, strict=True):
            env[var] = value
        for eqn in jaxpr.eqns:
            ins = [read(v) for v in eqn.invars]
            outs = self.equation(eqn, ins)
            for var, value in zip(eqn.outvars, outs, strict=True):
                env[var] = value
        return [read(v) for v in jaxpr.outvars]

    def equation(self, eqn, ins: list) -> list:
        name = eqn.primitive.name
        if name == _MARK.name:
            return [self.quantizer(eqn.params["index"], ins[0])]
        if name in _CALLS:
            inner = next(
                eqn.params[k] for k in ("jaxpr", "call_jaxpr", "fun_jaxpr") if k in eqn.params
            )
            return self.run(inner.jaxpr, inner.consts, ins)
        if all(not isinstance(v, str) for v in ins):  # constants only: computed here
            outs = eqn.primitive.bind(*[jnp.asarray(v) for v in ins], **eqn.params)
            outs = outs if eqn.primitive.multiple_results else [outs]
            return [np.asarray(o) for o in outs]
        if name != "conv_general_dilated" and self.g.oihw.intersection(
            v for v in ins if isinstance(v, str)
        ):
            if name == "convert_element_type" and eqn.params["new_dtype"] == np.float32:
                return [ins[0]]
            raise ExportError(f"the ONNX export writes 4-D weights for convs only, not {name!r}")
        handler = getattr(self, f"op_{name}", None)
        if handler is not None:
            return [handler(eqn, *ins)]
        if name in _BINARY:
            a, b = (self.g.tensor(v) for v in ins)
            return [self.g.node(_BINARY[name], [a, b])]
        if name in _UNARY:
            return [self.g.node(_UNARY[name], [ins[0]])]
        raise ExportError(f"the ONNX export has no rule for the traced operation {name!r}")

    # -- quantizers ----------------------------------------------------------------------
    def quantizer(self, index: int, x: Any) -> str:
        kind, name = self.marks[index]
        if kind == "weight":
            if isinstance(x, str):
                raise ExportError(f"{name}: a weight that is computed from the input")
            return self.weight(self.weights[name])
        if not isinstance(x, str):
            raise ExportError(f"{name}: an activation site on a constant")
        entry = self.activations[name]
        if entry["spec"]["family"] == "uniform":
            return self.uniform_site(name, entry, x)
        return self.pow2_site(name, entry, x)

    def weight(self, w: WeightTensor) -> str:
        g = self.g
        signed = bool(w.info.get("signed", True))
        layout = (3, 2, 0, 1) if len(w.shape) == 4 else tuple(range(len(w.shape)))
        if w.encoding == "uniform":
            _, _, dtype = integer_type(w.bits, signed=signed, where=w.name)
            ints = np.transpose(w.integers, layout).astype(dtype)
            codes = g.const(ints, f"{w.name}.codes", weight=True)
            scale = g.const(np.float32(w.step), f"{w.name}.scale", weight=True)
            zero = g.const(np.zeros((), dtype), f"{w.name}.zero_point", weight=True)
            out = g.node("DequantizeLinear", [codes, scale, zero], w.name)
        elif w.encoding == "pow2":
            _, _, dtype = integer_type(w.bits, signed=False, where=w.name)
            fields = np.transpose(w.codes.reshape(w.shape), layout).astype(dtype)
            codes = g.const(fields, f"{w.name}.codes", weight=True)
            table = g.const(_pow2_table(w), f"{w.name}.table", weight=True)
            index = g.node("Cast", [codes], f"{w.name}.index", to=_onnx_type(np.int32))
            out = g.node("Gather", [table, index], w.name, axis=0)
        else:
            raise ExportError(f"{w.name}: a {w.encoding} weight has no quantizer to export")
        if len(w.shape) == 4:
            g.oihw.add(out)
        return out

    def uniform_site(self, site: str, entry: Mapping[str, Any], x: str) -> str:
        g = self.g
        signed = bool(entry["spec"]["signed"])
        bits = int(entry["bits"])
        # 8 bits at least: an activation's type costs no file bytes, and onnxruntime's QDQ
        # rewrites (1.32) break on 4-bit activations (e.g. moving a max pool onto them).
        _, _, dtype = integer_type(max(bits, 8), signed=signed, where=site, widest=16)
        step = np.float32(entry["step"])
        top = np.float32(int(entry["max_code"]) * step)
        lo = g.const(-top if signed else np.float32(0.0), f"{site}.low")
        hi = g.const(top, f"{site}.high")
        # Max and Min, not Clip: onnxruntime's Clip-QuantizeLinear fusion fails on 4-bit
        # zero points (1.32).
        clipped = g.node("Min", [g.node("Max", [x, lo], f"{site}.low_clip"), hi], f"{site}.clip")
        scale = g.const(step, f"{site}.scale")
        zero = g.const(np.zeros((), dtype), f"{site}.zero_point")
        codes = g.node("QuantizeLinear", [clipped, scale, zero], f"{site}.codes")
        return g.node("DequantizeLinear", [codes, scale, zero], site)

    def pow2_site(self, site: str, entry: Mapping[str, Any], x: str) -> str:
        g = self.g
        spec = entry["spec"]
        emin, emax = int(entry["qmin_exponent"]), int(entry["qmax_exponent"])
        if emax - emin > 24:
            raise ExportError(f"{site}: a pow2 grid of {emax - emin + 1} magnitudes")
        qmin = np.float32(math.ldexp(1.0, emin))
        if not spec["signed"]:
            x = g.node("Relu", [x], f"{site}.relu")
        a = g.node("Abs", [x], f"{site}.abs")
        magnitude = g.const(qmin, f"{site}.qmin")
        if emax > emin:
            # pow2_round goes up past the float32 whose mantissa is round(√2 · 2**23).
            thresholds = np.array(
                [np.ldexp(np.float32(_SQRT2), k) for k in range(emin, emax)], np.float32
            )
            steps = np.array([math.ldexp(1.0, k) for k in range(emin, emax)], np.float32)
            above = g.node(
                "Greater",
                [g.node("Unsqueeze", [a, g.const(np.array([-1], np.int64))]), g.const(thresholds)],
                f"{site}.above",
            )
            rises = g.node("Cast", [above], to=_onnx_type(np.float32))
            total = g.node("MatMul", [rises, g.const(steps)], f"{site}.rise")
            magnitude = g.node("Add", [total, magnitude], f"{site}.magnitude")
        if spec["with_zero"]:
            keep = g.node("GreaterOrEqual", [a, g.const(np.float32(qmin / _SQRT2))])
            keep = g.node("Cast", [keep], to=_onnx_type(np.float32))
            magnitude = g.node("Mul", [magnitude, keep], f"{site}.zeroed")
        if not spec["signed"]:
            return g.node("Identity", [magnitude], site)
        negative = g.node("Cast", [g.node("Less", [x, g.const(np.float32(0))])], to=1)
        sign = g.node("Sub", [g.const(np.float32(1)), g.node("Add", [negative, negative])])
        return g.node("Mul", [sign, magnitude], site)

    # -- operations on tensors -----------------------------------------------------------
    def op_conv_general_dilated(self, eqn, x, w) -> str:
        p = eqn.params
        if any(d != 1 for d in p["lhs_dilation"]) or p["batch_group_count"] != 1:
            raise ExportError("the ONNX export has no rule for a transposed or batch-group conv")
        dn = p["dimension_numbers"]
        lhs, rhs, out = dn.lhs_spec, dn.rhs_spec, dn.out_spec
        g = self.g
        x = g.node("Transpose", [x], perm=list(lhs))
        if not isinstance(w, str):
            w = g.const(np.transpose(w, rhs).astype(np.float32))
        elif w in g.oihw:
            if tuple(rhs) != (3, 2, 0, 1):
                raise ExportError("the ONNX export takes conv kernels in HWIO only")
        else:
            w = g.node("Transpose", [w], perm=list(rhs))
        padding = p["padding"]
        pads = [lo for lo, _ in padding] + [hi for _, hi in padding]
        y = g.node(
            "Conv",
            [x, w],
            strides=list(p["window_strides"]),
            pads=pads,
            dilations=list(p["rhs_dilation"]),
            group=int(p["feature_group_count"]),
        )
        return g.node("Transpose", [y], perm=[int(i) for i in np.argsort(out)])

    def op_dot_general(self, eqn, x, w) -> str:
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        rank = len(eqn.invars[0].aval.shape)
        if lb or rb or tuple(lc) != (rank - 1,) or tuple(rc) != (0,):
            raise ExportError("the ONNX export writes a dot product as x @ w only")
        return self.g.node("MatMul", [self.g.tensor(x), self.g.tensor(w)])

    def _axes(self, x: str, axes) -> str:
        if x in self.g.batched and 0 in axes:
            raise ExportError("the ONNX export cannot reduce over the batch axis")
        return self.g.const(np.array(axes, np.int64))

    def op_reduce_sum(self, eqn, x) -> str:
        return self.g.node("ReduceSum", [x, self._axes(x, eqn.params["axes"])], keepdims=0)

    def op_reduce_max(self, eqn, x) -> str:
        return self.g.node("ReduceMax", [x, self._axes(x, eqn.params["axes"])], keepdims=0)

    def _reshape(self, x: str, shape) -> str:
        shape = [int(n) for n in shape]
        if x in self.g.batched:
            shape[0] = 0  # the batch, as it comes
        return self.g.node("Reshape", [x, self.g.const(np.array(shape, np.int64))])

    def op_reshape(self, eqn, x) -> str:
        if eqn.params.get("dimensions") is not None:
            raise ExportError("the ONNX export has no rule for a transposing reshape")
        batch = eqn.invars[0].aval.shape[:1]
        if x in self.g.batched and tuple(eqn.params["new_sizes"][:1]) != batch:
            raise ExportError("the ONNX export cannot reshape the batch axis")
        return self._reshape(x, eqn.params["new_sizes"])

    def op_squeeze(self, eqn, x) -> str:
        return self._reshape(x, eqn.outvars[0].aval.shape)

    def op_expand_dims(self, eqn, x) -> str:
        return self._reshape(x, eqn.outvars[0].aval.shape)

    def op_broadcast_in_dim(self, eqn, x) -> str:
        shape, dims = eqn.params["shape"], eqn.params["broadcast_dimensions"]
        batched = x in self.g.batched
        if batched and (not dims or dims[0] != 0):
            raise ExportError("the ONNX export cannot broadcast along the batch axis")
        in_shape = eqn.invars[0].aval.shape
        middle = [1] * len(shape)
        for i, d in enumerate(dims):
            middle[d] = in_shape[i]
        y = self._reshape(x, middle)
        target = [int(n) for n in shape]
        if batched:
            target[0] = 1  # Expand broadcasts: the batch stays
        return self.g.node("Expand", [y, self.g.const(np.array(target, np.int64))])

    def op_convert_element_type(self, eqn, x) -> str:
        dtype = np.dtype(eqn.params["new_dtype"])
        if dtype == eqn.invars[0].aval.dtype:
            return x
        return self.g.node("Cast", [x], to=_onnx_type(dtype))

    def op_pad(self, eqn, x, value) -> str:
        config = eqn.params["padding_config"]
        if any(interior for _, _, interior in config) or any(
            lo < 0 or hi < 0 for lo, hi, _ in config
        ):
            raise ExportError("the ONNX export pads with non-negative edges only")
        if x in self.g.batched and tuple(config[0][:2]) != (0, 0):
            raise ExportError("the ONNX export cannot pad the batch axis")
        pads = [lo for lo, _, _ in config] + [hi for _, hi, _ in config]
        g = self.g
        return g.node("Pad", [x, g.const(np.array(pads, np.int64)), g.tensor(value)])

    def op_slice(self, eqn, x) -> str:
        p = eqn.params
        shape = eqn.invars[0].aval.shape
        strides = p["strides"] or (1,) * len(shape)
        edges = zip(p["start_indices"], p["limit_indices"], strides, strict=True)
        axes = [i for i, (a, b, s) in enumerate(edges) if (a, b, s) != (0, shape[i], 1)]
        if x in self.g.batched and 0 in axes:
            raise ExportError("the ONNX export cannot slice the batch axis")
        g = self.g

        def pick(values):
            return g.const(np.array([values[i] for i in axes], np.int64))

        return g.node(
            "Slice",
            [
                x,
                pick(p["start_indices"]),
                pick(p["limit_indices"]),
                g.const(np.array(axes, np.int64)),
                pick(strides),
            ],
        )

    def op_clamp(self, eqn, lo, x, hi) -> str:
        g = self.g
        return g.node("Clip", [x, g.tensor(np.float32(lo)), g.tensor(np.float32(hi))])

    def op_reduce_window_max(self, eqn, x) -> str:
        p = eqn.params
        window, strides, padding = p["window_dimensions"], p["window_strides"], p["padding"]
        if window[0] != 1 or window[-1] != 1 or strides[0] != 1 or strides[-1] != 1:
            raise ExportError("the ONNX export pools over the spatial axes of NHWC only")
        if any(d != 1 for d in (*p["base_dilation"], *p["window_dilation"])):
            raise ExportError("the ONNX export has no rule for a dilated pool")
        g = self.g
        y = g.node("Transpose", [x], perm=[0, 3, 1, 2])
        pads = [lo for lo, _ in padding[1:3]] + [hi for _, hi in padding[1:3]]
        y = g.node(
            "MaxPool", [y], kernel_shape=list(window[1:3]), strides=list(strides[1:3]), pads=pads
        )
        return g.node("Transpose", [y], perm=[0, 2, 3, 1])

    def op_integer_pow(self, eqn, x) -> str:
        return self.g.node("Pow", [x, self.g.const(np.float32(eqn.params["y"]))])


def _onnx_type(dtype) -> int:
    from onnx import helper

    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def _pow2_table(w: WeightTensor) -> np.ndarray:
    """The value of every ``bits``-wide pow2 code: ``±2**(qmin_exponent + j)``, 0 unused."""
    b, emin, emax = w.bits, int(w.info["qmin_exponent"]), int(w.info["qmax_exponent"])
    codes = np.arange(2**b, dtype=np.int64)
    sign = codes >> (b - 1)
    j = codes & ((1 << (b - 1)) - 1)
    values = np.ldexp(np.float32(1.0), (emin + j).astype(np.int32))
    values = np.where(sign == 1, -values, values).astype(np.float32)
    return np.where(emin + j <= emax, values, np.float32(0.0))


def to_onnx(model: nnx.Module, *, meta: Mapping[str, Any] | None = None):
    """The ONNX ``ModelProto`` of ``model`` (built, trained state loaded) and its sizes.

    Returns ``(proto, sizes)``; ``sizes`` has ``weight_initializer_bytes`` (the weights'
    codes, scales, zero points and pow2 tables, plus float weights),
    ``accounted_weight_bytes`` (docs/method.md §5's weight memory) and ``weight_kb``.
    Raises :class:`ExportError` (one line) for what it cannot write.
    """
    import onnx
    from onnx import TensorProto, helper

    input_shape = getattr(model, "input_shape", None)
    if input_shape is None:
        raise ExportError(f"{type(model).__name__} has no input_shape to trace the graph with")
    weights, activations, _, table = encode_model(model)
    by_name = {w.name: w for w in weights}
    sites = {a["site"]: a for a in activations}
    names: dict[int, tuple[str, str]] = {}
    for site, kind, module in quantizable_sites(model):
        if kind == "weight":
            for tensor, _, quantizer in module.weight_tensors():
                names[id(quantizer)] = ("weight", f"{site}.{tensor}")
        else:
            names[id(module.quant)] = ("activation", site)
    marks: list[tuple[str, str]] = []

    def mark(quantizer, x):
        marks.append(names[id(quantizer)])
        return _MARK.bind(x, index=len(marks) - 1)

    model.eval()
    with replace_quantizers(mark):
        # A fresh function: jax caches a function's trace, which would skip the marks.
        closed = jax.make_jaxpr(lambda x: model(x))(
            jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
        )
    graph = _Graph()
    converter = _Converter(graph, marks, by_name, sites)
    (out,) = converter.run(closed.jaxpr, closed.consts, [INPUT])
    if not isinstance(out, str):
        raise ExportError("the traced model's output does not depend on its input")
    graph.nodes.append(helper.make_node("Identity", [out], [OUTPUT], name=OUTPUT))
    out_shape = closed.jaxpr.outvars[0].aval.shape
    proto = helper.make_model(
        helper.make_graph(
            graph.nodes,
            type(model).__name__,
            [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", *input_shape])],
            [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", *out_shape[1:]])],
            graph.initializers,
        ),
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="mpdnn",
    )
    for key, value in (meta or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = str(key), str(value)
    onnx.checker.check_model(proto)
    float_bytes = sum(w.numel * 4 for w in weights if w.encoding == "float32")
    initializer_bytes = sum(
        len(t.raw_data) for t in graph.initializers if t.name in graph.weight_initializers
    )
    accounted = table["accounting"]["weight_bits"] / 8
    return proto, {
        "weight_initializer_bytes": initializer_bytes + float_bytes,
        "accounted_weight_bytes": accounted,
        "weight_kb": table["accounting"]["weight_kb"],
    }


def export_onnx(
    model: nnx.Module, path: str | Path, *, meta: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Write ``model`` as an ONNX file at ``path``; returns its sizes (see :func:`to_onnx`)
    with ``file_bytes`` and ``path``."""
    proto, sizes = to_onnx(model, meta=meta)
    data = proto.SerializeToString()
    path = Path(path)
    path.write_bytes(data)
    return {**sizes, "file_bytes": len(data), "path": str(path)}


def compare_onnx(model: nnx.Module, onnx_model: Any, images: np.ndarray) -> dict[str, Any]:
    """The ONNX model in onnxruntime (CPU) against the jitted Flax model on ``images``.

    ``onnx_model``: a path or a ``ModelProto``. Keys: ``num_images``, ``top1_agreement`` (the
    fraction of images whose top-1 class is the same), ``logits_equal`` (images whose logits
    are bitwise equal), ``logits_max_abs_diff`` and ``logits_max_abs`` (its scale).
    """
    import onnxruntime as ort

    if isinstance(onnx_model, str | Path):
        source = str(onnx_model)
    else:
        source = onnx_model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    x = np.asarray(images, np.float32)
    got = np.concatenate(
        [session.run([OUTPUT], {INPUT: x[i : i + 256]})[0] for i in range(0, len(x), 256)]
    )
    model.eval()
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    want = np.concatenate(
        [np.asarray(forward(state, x[i : i + 256])) for i in range(0, len(x), 256)]
    )
    return {
        "num_images": len(x),
        "top1_agreement": float(np.mean(got.argmax(axis=1) == want.argmax(axis=1))),
        "logits_equal": int(np.all(got == want, axis=1).sum()),
        "logits_max_abs_diff": float(np.abs(got - want).max(initial=0)),
        "logits_max_abs": float(np.abs(want).max(initial=0)),
    }
