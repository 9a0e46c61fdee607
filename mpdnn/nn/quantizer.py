"""A quantizer as a Flax NNX module: its θ lives in the parameter tree (docs/method.md §2, §9).

Four modes, one module:

* ``learned``: every raw θ of the parametrization is a :class:`QuantParam` (trained);
* ``tqt``: "learned range, fixed b", the paper's TQT baseline: the b-based parametrization
  (``b_qmax``) with ``b`` boxed to ``[bits, bits]``, so only the range learns;
* ``fixed``: b and range fixed at their initial values, the paper's "Fixed" baseline: θ are
  :class:`QuantState` variables, which no optimizer over ``nnx.Param`` sees;
* ``float``: not quantized (32 bits in the memory accounting).

:class:`QuantParam` subclasses ``nnx.Param``: an optimizer over ``nnx.Param`` trains it, and
``nnx.state(model, QuantParam)`` selects it apart from the weights (optimizer groups, weight
decay masks, logging).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

import mpdnn.quantizers as mq

Mode = Literal["learned", "tqt", "fixed", "float"]
Kind = Literal["weight", "activation"]
FLOAT_BITS = 32.0

# Set only inside replace_quantizers: every quantized Quantizer's call goes to it instead.
_REPLACEMENT: contextvars.ContextVar[Callable | None] = contextvars.ContextVar(
    "mpdnn_quantizer_replacement", default=None
)


@contextlib.contextmanager
def replace_quantizers(call: Callable[[Quantizer, jax.Array], jax.Array]) -> Iterator[None]:
    """Within the block, each quantized :class:`Quantizer` returns ``call(quantizer, x)``
    instead of quantizing ``x`` (float ones still return ``x``). For tools that trace a model
    and need to see its quantizers as such, e.g. the ONNX exporter, which marks each one in
    the traced graph and writes it as integer codes and a quantize-dequantize pair."""
    token = _REPLACEMENT.set(call)
    try:
        yield
    finally:
        _REPLACEMENT.reset(token)


class QuantParam(nnx.Param):
    """A raw learnable quantizer value θ (``b``, ``d``, ``qmax`` or ``qmin``; docs/method.md §2)."""


class QuantState(nnx.Variable):
    """A quantizer value that is not trained (the ``fixed`` mode's θ, TQT's ``b``)."""


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How one tensor is quantized: what a rule assigns to a layer.

    Attributes:
      mode: ``learned``, ``tqt``, ``fixed`` or ``float`` (see module docstring).
      family: ``uniform`` or ``pow2``.
      parametrization: for ``learned``; default the paper's U3 (``d_qmax``) / P3
        (``qmin_qmax``). ``tqt`` and ``fixed`` use ``b_qmax``.
      bits: initial bitwidth (``learned``) or the fixed one (``tqt``, ``fixed``).
      init: weights only: ``"float"`` derives the step from the layer's current weights
        (docs/method.md §4, float-net init), ``"random"`` uses ``d0 = 2**-3``.
      spec_overrides: extra :class:`~mpdnn.quantizers.QuantSpec` fields (boxes,
        ``pow2_step``), as ``(("qmax_range", (0.01, 8.0)),)``.
    """

    mode: Mode = "learned"
    family: mq.spec.Family = "uniform"
    parametrization: str | None = None
    bits: int = 4
    init: Literal["float", "random"] = "float"
    spec_overrides: tuple[tuple[str, object], ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in ("learned", "tqt", "fixed", "float"):
            raise ValueError(
                f"unknown quantizer mode {self.mode!r}; expected learned, tqt, fixed or float"
            )
        if self.init not in ("float", "random"):
            raise ValueError(f"unknown init {self.init!r}; expected 'float' or 'random'")
        if self.mode != "float":
            self.spec("weight", signed=True)  # validates family, parametrization, boxes

    @property
    def quantized(self) -> bool:
        return self.mode != "float"

    def spec(self, kind: Kind, *, signed: bool) -> mq.QuantSpec:
        """The :class:`QuantSpec` of this config at a site of ``kind`` and signedness."""
        par = self.parametrization if self.mode == "learned" else "b_qmax"
        make = mq.weight_spec if kind == "weight" else mq.activation_spec
        overrides = dict(self.spec_overrides)
        overrides["signed"] = signed
        if self.family == "pow2":
            # Weights: signed, no zero code; activations: with zero (docs/method.md §1.2). A signed
            # activation (a residual sum) keeps the zero code too.
            overrides.setdefault("with_zero", kind == "activation")
        if self.mode in ("tqt", "fixed"):
            overrides["b_range"] = (self.bits, self.bits)
        return make(self.family, par, **overrides)


FLOAT = QuantConfig(mode="float")


class Quantizer(nnx.Module):
    """Owns one tensor's quantizer θ and applies :func:`mpdnn.quantizers.quantize`.

    Args:
      config: what to do (``FLOAT`` when omitted).
      kind: ``"weight"`` or ``"activation"`` (boxes and initialisation, docs/method.md §2, §4).
      signed: the grid's signedness; default signed for weights, unsigned for activations.
      init_from: for a weight quantizer with ``config.init == "float"``: the float weights
        whose max magnitude sets the initial step (the bias quantizer gets its layer's kernel,
        docs/method.md §4).
    """

    def __init__(
        self,
        config: QuantConfig = FLOAT,
        *,
        kind: Kind,
        signed: bool | None = None,
        init_from: jax.Array | None = None,
    ):
        self.config = config
        self.kind = kind
        self.signed = (kind == "weight") if signed is None else signed
        if not config.quantized:
            return
        spec = config.spec(kind, signed=self.signed)
        if kind == "weight":
            weights = init_from if config.init == "float" else None
            theta = mq.init_weight_theta(spec, config.bits, weights=weights)
        else:
            theta = mq.init_activation_theta(spec, config.bits)
        variable = QuantState if config.mode == "fixed" else QuantParam
        for name, value in theta.items():
            if name == "b" and config.mode == "tqt":
                setattr(self, name, QuantState(value))
            else:
                setattr(self, name, variable(value))

    @property
    def spec(self) -> mq.QuantSpec | None:
        if not self.config.quantized:
            return None
        return self.config.spec(self.kind, signed=self.signed)

    def theta(self) -> dict[str, jax.Array]:
        """The raw θ as a dict of arrays (empty when float)."""
        spec = self.spec
        if spec is None:
            return {}
        return {name: getattr(self, name)[...] for name in spec.theta_names}

    def __call__(self, x: jax.Array) -> jax.Array:
        spec = self.spec
        if spec is None:
            return x
        replacement = _REPLACEMENT.get()
        if replacement is not None:
            return replacement(self, x)
        return mq.quantize(x, self.theta(), spec)

    def bits(self) -> jax.Array:
        """Bits per value (docs/method.md §3), differentiable w.r.t. θ; 32 when not quantized."""
        spec = self.spec
        if spec is None:
            return jnp.float32(FLOAT_BITS)
        return mq.bitwidth(self.theta(), spec)

    def describe(self) -> str:
        if not self.config.quantized:
            return "float"
        c = self.config
        par = c.parametrization or ("d_qmax" if c.family == "uniform" else "qmin_qmax")
        what = par if c.mode == "learned" else f"{c.mode} {c.bits}b"
        return f"{c.family} {what}"
