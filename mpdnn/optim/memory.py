"""Memory accounting of a quantized network, exactly in SPEC §5's units.

* weight memory: Σ over every conv/linear kernel and bias of ``numel · b`` bits (BatchNorm not
  counted; float tensors 32 bits);
* activation memory per sample (batch excluded): every activation site contributes
  ``numel · b`` bits; aggregates **max** (layer-sequential inference) and **sum** (pipelined).
  The network input, the pooled feature before the classifier and the logits are not sites.

1 KB = 1024 bytes. Bits come from :func:`mpdnn.quantizers.bitwidth`, so every total is
differentiable w.r.t. the quantizer parameters (straight-through, SPEC §3) and a budget
penalty can train them. The function reads only the parameter tree and the static shapes
recorded at model construction, so it runs inside a jitted loss on a merged model.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

import mpdnn.quantizers as mq
from mpdnn.nn.layers import ActQuant, QuantizedWeights
from mpdnn.nn.quantizer import FLOAT_BITS, Quantizer
from mpdnn.nn.rules import quantizable_sites

KB = 8.0 * 1024.0  # bits per kilobyte


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
    """Per-tensor rows and the totals of SPEC §5 (KB, differentiable arrays)."""

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


def _all_bits(quantizers: list[Quantizer]) -> list[jax.Array]:
    """Bits of every quantizer, with one vectorised :func:`mq.bitwidth` per distinct spec.

    A network has 20–70 quantizers but only a few specs; one scalar graph per quantizer
    doubled the HLO of a training step and its compile time.
    """
    bits: list[jax.Array | None] = [None] * len(quantizers)
    groups: dict[mq.QuantSpec, list[int]] = {}
    for i, q in enumerate(quantizers):
        spec = q.spec
        if spec is None:
            bits[i] = jnp.float32(FLOAT_BITS)
        else:
            groups.setdefault(spec, []).append(i)
    for spec, members in groups.items():
        thetas = [quantizers[i].theta() for i in members]
        stacked = {
            k: jnp.stack([jnp.asarray(t[k], jnp.float32) for t in thetas]) for k in thetas[0]
        }
        group_bits = jax.vmap(lambda t, spec=spec: mq.bitwidth(t, spec))(stacked)
        for j, i in enumerate(members):
            bits[i] = group_bits[j]
    return bits


def memory(model: nnx.Module) -> MemoryReport:
    """Weight and activation memory of ``model`` at its current quantizer parameters.

    Rows come in forward order (the model records it at construction).
    For the ``max`` aggregate the gradient goes entirely to the first largest tensor, as in
    the authors' NNabla code (``jnp.max`` would share it between ties).
    """
    entries: list[tuple[str, str, str, tuple[int, ...], int, Quantizer]] = []
    for name, _, m in quantizable_sites(model):
        if isinstance(m, QuantizedWeights):
            for tensor, numel, quant in m.weight_tensors():
                shape = tuple(getattr(m, tensor)[...].shape)
                entries.append((name, "weight", tensor, shape, numel, quant))
        elif isinstance(m, ActQuant):
            if m.shape is None:
                raise ValueError(
                    f"activation site {name!r} has no recorded shape; build the model with "
                    "its input shape (record_activation_shapes) before counting memory"
                )
            entries.append((name, "activation", "act", m.shape, math.prod(m.shape), m.quant))
    bits = _all_bits([e[-1] for e in entries])
    rows = [
        LayerMemory(name, kind, tensor, shape, numel, q.describe(), b, numel * b / KB)
        for (name, kind, tensor, shape, numel, q), b in zip(entries, bits, strict=True)
    ]
    weights = [r for r in rows if r.kind == "weight"]
    acts = [r for r in rows if r.kind == "activation"]
    zero = jnp.float32(0.0)
    weight_kb = sum((r.kb for r in weights), zero)
    if acts:
        act_kb = jnp.stack([r.kb for r in acts])
        act_max_kb = act_kb[jnp.argmax(jax.lax.stop_gradient(act_kb))]
        act_sum_kb = jnp.sum(act_kb)
    else:
        act_max_kb = act_sum_kb = zero
    return MemoryReport(
        rows=tuple(rows),
        num_weights=sum(r.numel for r in weights),
        num_activations=sum(r.numel for r in acts),
        weight_kb=weight_kb,
        act_max_kb=act_max_kb,
        act_sum_kb=act_sum_kb,
    )
