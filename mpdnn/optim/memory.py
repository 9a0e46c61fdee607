"""Memory accounting of a quantized network, exactly in docs/method.md §5's units.

* weight memory: Σ over every conv/linear kernel and bias of ``numel · b`` bits (BatchNorm not
  counted; float tensors 32 bits);
* activation memory per sample (batch excluded): every activation site contributes
  ``numel · b`` bits; aggregates **max** (layer-sequential inference) and **sum** (pipelined).
  The network input, the pooled feature before the classifier and the logits are not sites.

1 KB = 1024 bytes, 1 MB = 1024 KB. Bits come from :func:`mpdnn.quantizers.bitwidth`, so every
total is differentiable w.r.t. the quantizer parameters (straight-through, docs/method.md §3)
and a budget penalty can train them. The function reads only the parameter tree and the static
shapes recorded at model construction, so it runs inside a jitted loss on a merged model.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
from flax import nnx

from mpdnn.optim.accounting import KB, aggregate, counted_tensors, grouped_bits, tensor_kb

__all__ = ["KB", "LayerMemory", "MemoryReport", "memory"]

KB_PER_MB = 1024
UNITS = "1 KB = 1024 bytes, 1 MB = 2**20 bytes; activations per sample"


class LayerMemory(NamedTuple):
    """One counted tensor: ``kind`` is ``"weight"`` or ``"activation"``; ``tensor`` names it
    (``kernel``, ``bias`` or ``act``); ``shape`` is the kernel's or the per-sample
    activation's; ``bits`` and ``kb`` are arrays (differentiable)."""

    path: str
    kind: str
    tensor: str
    shape: tuple[int, ...]
    numel: int
    quantizer: str
    bits: jax.Array
    kb: jax.Array


class MemoryReport(NamedTuple):
    """Per-tensor rows and the totals of docs/method.md §5 (KB, differentiable arrays), and
    what the model is: its class name and the input shape it was built for (None if it has
    none)."""

    rows: tuple[LayerMemory, ...]
    num_weights: int
    num_activations: int
    weight_kb: jax.Array
    act_max_kb: jax.Array
    act_sum_kb: jax.Array
    model: str = ""
    input_shape: tuple[int, ...] | None = None

    def totals(self) -> dict[str, float]:
        """Plain-float totals, for printing and JSON."""
        return {
            "num_weights": self.num_weights,
            "num_activations": self.num_activations,
            "weight_kb": float(self.weight_kb),
            "act_max_kb": float(self.act_max_kb),
            "act_sum_kb": float(self.act_sum_kb),
        }

    def to_json(self, name: str | None = None) -> dict[str, Any]:
        """The report as plain JSON values (``json.dumps`` takes it as is): what a run writes
        to ``report.json`` and ``python -m mpdnn.report --json`` prints.

        Keys: ``model`` (``name``, default the model's class name), ``input_shape``,
        ``num_weights``, ``num_activations``, ``num_activation_tensors``, ``weight_kb``,
        ``weight_mb``, ``act_max_kb``, ``act_sum_kb``, ``units`` and ``layers``: one dict
        per counted tensor in forward order with ``index``, ``path``, ``kind``
        (``weight``/``activation``), ``tensor`` (``kernel``/``bias``/``act``), ``shape``,
        ``numel``, ``quantizer``, ``bits``, ``kb``. Numbers are plain ``int`` or ``float``.
        """
        totals = self.totals()
        return {
            "model": name or self.model,
            "input_shape": None if self.input_shape is None else list(self.input_shape),
            "num_weights": int(totals["num_weights"]),
            "num_activations": int(totals["num_activations"]),
            "num_activation_tensors": sum(r.kind == "activation" for r in self.rows),
            "weight_kb": totals["weight_kb"],
            "weight_mb": totals["weight_kb"] / KB_PER_MB,
            "act_max_kb": totals["act_max_kb"],
            "act_sum_kb": totals["act_sum_kb"],
            "units": UNITS,
            "layers": [
                {
                    "index": i,
                    "path": r.path,
                    "kind": r.kind,
                    "tensor": r.tensor,
                    "shape": [int(n) for n in r.shape],
                    "numel": int(r.numel),
                    "quantizer": r.quantizer,
                    "bits": float(r.bits),
                    "kb": float(r.kb),
                }
                for i, r in enumerate(self.rows)
            ],
        }


def memory(model: nnx.Module) -> MemoryReport:
    """Weight and activation memory of ``model`` at its current quantizer parameters.

    Rows come in forward order (the model records it at construction).
    For the ``max`` aggregate the gradient goes entirely to the first largest tensor, as in
    the authors' NNabla code (``jnp.max`` would share it between ties). The same core
    computes :class:`~mpdnn.optim.accounting.Accounting`'s sizes from a parameter pytree.
    """
    tensors = counted_tensors(model)
    bits = grouped_bits([(t.quantizer.spec, t.quantizer.theta()) for t in tensors])
    rows = [
        LayerMemory(
            t.site,
            t.kind,
            t.tensor,
            t.shape,
            t.numel,
            t.quantizer.describe(),
            b,
            tensor_kb(t.numel, b),
        )
        for t, b in zip(tensors, bits, strict=True)
    ]
    sizes = aggregate([r.kind for r in rows], [r.kb for r in rows])
    return MemoryReport(
        rows=tuple(rows),
        num_weights=sum(r.numel for r in rows if r.kind == "weight"),
        num_activations=sum(r.numel for r in rows if r.kind == "activation"),
        weight_kb=sizes.weight_kb,
        act_max_kb=sizes.act_max_kb,
        act_sum_kb=sizes.act_sum_kb,
        model=type(model).__name__,
        input_shape=_input_shape(model),
    )


def _input_shape(model: nnx.Module) -> tuple[int, ...] | None:
    shape = getattr(model, "input_shape", None)
    return None if shape is None else tuple(int(n) for n in shape)
