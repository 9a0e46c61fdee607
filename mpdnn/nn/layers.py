"""Quantizable convolution, linear and activation layers (Flax NNX).

Every layer is built float: its quantizers are :data:`~mpdnn.nn.quantizer.FLOAT` until
:func:`mpdnn.nn.rules.quantize_model` gives them a config by path. So a float model and its
quantized twin share one definition, and no model code changes to quantize it.

Layouts follow Flax: NHWC activations, HWIO kernels, ``(in, out)`` linear kernels.
"""

from __future__ import annotations

import contextvars
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from mpdnn.nn import initializers
from mpdnn.nn.quantizer import FLOAT, QuantConfig, Quantizer

# Set only while record_activation_shapes traces a model: activation sites report their
# per-sample shapes here (a Python-time check, free inside jitted code).
_RECORDER: contextvars.ContextVar[list | None] = contextvars.ContextVar("mpdnn_act", default=None)


def _note_call(site: nnx.Module, x: jax.Array) -> None:
    """While :func:`record_activation_shapes` traces, report this site's call and input."""
    recorder = _RECORDER.get()
    if recorder is not None:
        recorder.append((site.site_index, tuple(int(n) for n in x.shape[1:])))


class QuantizedWeights(nnx.Module):
    """Base of the layers whose kernel (and bias) are quantized and counted as weights."""

    site_index: int = -1  # forward-call order, set by record_activation_shapes

    kernel: nnx.Param
    bias: nnx.Param | None
    kernel_quant: Quantizer
    bias_quant: Quantizer | None

    def set_quantizer(self, config: QuantConfig) -> None:
        """Quantize kernel and bias with ``config``; the bias quantizer is initialised like
        its layer's kernel (docs/method.md §4)."""
        kernel = self.kernel[...]
        self.kernel_quant = Quantizer(config, kind="weight", init_from=kernel)
        if self.bias is not None:
            self.bias_quant = Quantizer(config, kind="weight", init_from=kernel)

    def quantized_kernel(self) -> jax.Array:
        return self.kernel_quant(self.kernel[...])

    def quantized_bias(self) -> jax.Array | None:
        if self.bias is None:
            return None
        return self.bias_quant(self.bias[...])

    def weight_tensors(self) -> list[tuple[str, int, Quantizer]]:
        """``(name, numel, quantizer)`` of every tensor counted in the weight memory."""
        out = [("kernel", math.prod(self.kernel[...].shape), self.kernel_quant)]
        if self.bias is not None:
            out.append(("bias", math.prod(self.bias[...].shape), self.bias_quant))
        return out


def _operands(layer: QuantizedWeights, x: jax.Array) -> tuple[jax.Array, jax.Array, dict]:
    """The layer's input and quantized kernel in its compute dtype, and the options that keep
    a lower-precision product accumulated and returned in float32 (see
    :func:`set_compute_dtype`)."""
    dtype = getattr(layer, "compute_dtype", None) or x.dtype
    kernel = layer.quantized_kernel().astype(dtype)
    if jnp.dtype(dtype).itemsize < 4 and x.dtype == jnp.float32:
        return x.astype(dtype), kernel, {"preferred_element_type": jnp.float32}
    return x, kernel, {}


def set_compute_dtype(model: nnx.Module, dtype) -> int:
    """Run every conv and linear layer of ``model`` with ``dtype`` operands (e.g.
    ``jnp.bfloat16``), accumulating and returning float32; BatchNorm, the quantizers and the
    loss stay float32. Returns the number of layers set; ``None`` restores float32.

    Exact for quantized layers up to 8 bits: a b-bit weight or activation is an integer
    times a power-of-two step, and bfloat16's 8-bit significand holds every integer up to
    256 exactly, so the conv sees the same operands as in float32 and only the accumulation
    order can differ. Float layers (and the unquantized network input) are rounded to
    bfloat16, the usual mixed-precision trade.
    """
    count = 0
    for _, module in nnx.iter_modules(model):
        if isinstance(module, QConv | QLinear):
            module.compute_dtype = None if dtype is None else jnp.dtype(dtype)
            count += 1
    return count


class QConv(QuantizedWeights):
    """2-D convolution with quantized kernel (and bias); NHWC, kernel HWIO."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int | Sequence[int],
        *,
        strides: int = 1,
        padding: str | int = "SAME",
        groups: int = 1,
        use_bias: bool = False,
        rngs: nnx.Rngs,
        kernel_init: Callable = initializers.he_normal_fan_out,
    ):
        ks = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        if in_features % groups or out_features % groups:
            raise ValueError(f"groups={groups} must divide {in_features} and {out_features}")
        shape = (*ks, in_features // groups, out_features)
        self.kernel = nnx.Param(kernel_init(rngs.params(), shape, jnp.float32))
        self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32)) if use_bias else None
        self.kernel_quant = Quantizer(FLOAT, kind="weight")
        self.bias_quant = Quantizer(FLOAT, kind="weight") if use_bias else None
        self.strides = (strides, strides)
        self.padding = ((padding, padding),) * 2 if isinstance(padding, int) else padding
        self.groups = groups
        self.compute_dtype = None  # None: the input's dtype; see set_compute_dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        _note_call(self, x)
        x, kernel, options = _operands(self, x)
        y = lax.conv_general_dilated(
            x,
            kernel,
            window_strides=self.strides,
            padding=self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=self.groups,
            **options,
        )
        return _add_bias(y, self.quantized_bias())


class QLinear(QuantizedWeights):
    """Dense layer with quantized kernel and bias; kernel ``(in, out)``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = True,
        rngs: nnx.Rngs,
        kernel_init: Callable = initializers.lecun_normal,
    ):
        self.kernel = nnx.Param(kernel_init(rngs.params(), (in_features, out_features)))
        self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32)) if use_bias else None
        self.kernel_quant = Quantizer(FLOAT, kind="weight")
        self.bias_quant = Quantizer(FLOAT, kind="weight") if use_bias else None
        self.compute_dtype = None  # None: the input's dtype; see set_compute_dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        _note_call(self, x)
        x, kernel, options = _operands(self, x)
        y = jnp.matmul(x, kernel, **options)
        return _add_bias(y, self.quantized_bias())


def _add_bias(y: jax.Array, bias: jax.Array | None) -> jax.Array:
    """``y + bias`` over the last axis, broadcast explicitly (no implicit rank promotion)."""
    if bias is None:
        return y
    return y + bias.astype(y.dtype).reshape((1,) * (y.ndim - 1) + bias.shape)


def relu(x: jax.Array) -> jax.Array:
    return jnp.maximum(x, 0)


def relu6(x: jax.Array) -> jax.Array:
    return jnp.clip(x, 0, 6)


def identity(x: jax.Array) -> jax.Array:
    return x


class ActQuant(nnx.Module):
    """An activation quantizer site: replaces the float activation when quantized.

    Unsigned sites replace a ReLU/ReLU6 (the clip to ``[0, qmax]`` is a clipped ReLU,
    docs/method.md §1.1); signed sites quantize tensors without a ReLU that feed a conv
    (docs/method.md §7).
    Float, the site applies ``float_fn`` (the activation it stands for). The per-sample shape
    is recorded by the model (:func:`record_activation_shapes`) for the memory accounting.
    """

    def __init__(self, *, signed: bool = False, float_fn: Callable = relu):
        self.signed = signed
        self.float_fn = float_fn
        self.quant = Quantizer(FLOAT, kind="activation", signed=signed)
        self.shape: tuple[int, ...] | None = None  # per sample; see record_activation_shapes
        self.site_index = -1

    def set_quantizer(self, config: QuantConfig) -> None:
        self.quant = Quantizer(config, kind="activation", signed=self.signed)

    def __call__(self, x: jax.Array) -> jax.Array:
        _note_call(self, x)
        if not self.quant.config.quantized:
            return self.float_fn(x)
        return self.quant(x)


def record_activation_shapes(model: nnx.Module, input_shape: Sequence[int]) -> None:
    """Trace ``model`` once on an abstract 1-sample input (``jax.eval_shape``: no FLOPs).

    Stores on every :class:`ActQuant` its per-sample shape (for the memory accounting) and on
    every quantizable site its position in the forward pass (``site_index``), so reports and
    plots list layers in network order. Each site must run exactly once per forward pass.
    """
    sites = [m for _, m in nnx.iter_modules(model) if isinstance(m, ActQuant | QuantizedWeights)]
    for i, m in enumerate(sites):
        m.site_index = i  # static: survives split/merge, identifies the site in the trace
    graphdef, state = nnx.split(model)
    seen: list[tuple[int, tuple[int, ...]]] = []

    def forward(state, x):
        return nnx.merge(graphdef, state)(x)

    token = _RECORDER.set(seen)
    try:
        jax.eval_shape(forward, state, jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))
    finally:
        _RECORDER.reset(token)
    called = sorted(i for i, _ in seen)
    if called != list(range(len(sites))):
        raise ValueError(
            f"{len(sites)} quantizable sites, but one forward pass called {called}: every "
            "site must run exactly once per call to be counted"
        )
    for order, (i, shape) in enumerate(seen):
        sites[i].site_index = order
        if isinstance(sites[i], ActQuant):
            sites[i].shape = shape


class LogitScale(nnx.Module):
    """``scale · model(x)`` with one learnable scalar ``scale`` (init 1).

    The authors' code gives power-of-two networks this scalar on the logits (docs/method.md §6):
    with
    pow2 weights the classifier's output can only move in factors of two, and a free scale
    restores the softmax temperature. The wrapped model keeps its parameters and paths under
    ``model.`` (rules such as ``".*"`` still match every site).
    """

    def __init__(self, model: nnx.Module):
        self.model = model
        self.scale = nnx.Param(jnp.ones((), jnp.float32))

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        return getattr(self.model, "input_shape", None)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.scale[...] * self.model(x)
