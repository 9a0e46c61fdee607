"""Memory accounting of a quantized network, exactly in docs/method.md §5's units.

* weight memory: Σ over every conv/linear kernel and bias of ``numel · b`` bits (BatchNorm not
  counted; float tensors 32 bits);
* activation memory per sample (batch excluded): every activation site contributes
  ``numel · b`` bits; aggregates **max** (layer-sequential inference) and **sum** (pipelined).
  The network input, the pooled feature before the classifier and the logits are not sites.

1 KB = 1024 bytes. Bits come from :func:`mpdnn.quantizers.bitwidth`, so every total is
differentiable w.r.t. the quantizer parameters (straight-through, docs/method.md §3) and a budget
penalty can train them. The function reads only the parameter tree and the static shapes
recorded at model construction, so it runs inside a jitted loss on a merged model.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
from flax import nnx

from mpdnn.optim.accounting import KB, aggregate, counted_tensors, grouped_bits, tensor_kb

__all__ = ["KB", "LayerMemory", "MemoryReport", "memory"]


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
    """Per-tensor rows and the totals of docs/method.md §5 (KB, differentiable arrays)."""

    rows: tuple[LayerMemory, ...]
    num_weights: int
    num_activations: int
    weight_kb: jax.Array
    act_max_kb: jax.Array
    act_sum_kb: jax.Array

    def totals(self) -> dict[str, float]:
        """Plain-float totals, for printing and JSON."""
        return {
            "num_weights": self.num_weights,
            "num_activations": self.num_activations,
            "weight_kb": float(self.weight_kb),
            "act_max_kb": float(self.act_max_kb),
            "act_sum_kb": float(self.act_sum_kb),
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
    )
