"""Memory accounting as a pure function of the parameter pytree (docs/method.md §5).

:func:`mpdnn.optim.memory` reads a merged NNX model. An optax transform sees only the
parameter pytree, so :class:`Accounting` describes the model once, statically (which
quantizer sits where, its spec, which θ are trained, the shapes it counts), and then computes
the sizes from any parameter tree that holds the trained θ::

    accounting = Accounting.from_model(model)       # once, outside jit
    accounting(nnx.state(model, nnx.Param))         # {"weight_kb", "act_max_kb", "act_sum_kb"}

Sizes follow docs/method.md §5 exactly, as :func:`~mpdnn.optim.memory` does (both share this
module's
core, so they cannot drift apart):

    S_w     = Σ_weight tensors  numel · b / 8192          (KB; float tensors b = 32)
    S_a,max = max_activations   numel · b / 8192          (gradient to the first argmax)
    S_a,sum = Σ_activations     numel · b / 8192

with b from :func:`mpdnn.quantizers.bitwidth` (docs/method.md §3), straight-through, so every size
is
differentiable w.r.t. the trained θ. A per-channel θ (an array) gives one b per channel; the
tensor then counts ``numel · mean(b)`` bits (each channel holds ``numel / channels`` values).

θ are found by **path**: the parameter tree is flattened with
:func:`jax.tree_util.tree_flatten_with_path` and every key path becomes a dotted string
(dict key, sequence index or attribute name; the trailing ``value`` attribute of
``nnx.Variable`` leaves is dropped), so ``"head.kernel_quant.d"`` is found in an
``nnx.State``, in ``nnx.to_pure_dict`` of it and in a tree that ``optax.masked`` has partly
replaced by ``optax.MaskedNode`` (a node without leaves).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import mpdnn.quantizers as mq
from mpdnn.nn.layers import ActQuant, QuantizedWeights
from mpdnn.nn.quantizer import FLOAT_BITS, Quantizer
from mpdnn.nn.rules import quantizable_sites

KB = 8.0 * 1024.0  # bits per kilobyte (1 KB = 1024 bytes)
SIZE_NAMES = ("weight_kb", "act_max_kb", "act_sum_kb")


# ----------------------------------------------------------------------------------------
# The core shared with memory(): which tensors count, their bits, the aggregates.


class CountedTensor(NamedTuple):
    """One tensor of docs/method.md §5: a conv/linear kernel or bias, or a per-sample activation.

    ``site`` is the layer's dotted path, ``path`` its quantizer's (``site.kernel_quant``,
    ``site.bias_quant``, ``site.quant``); ``tensor`` is ``kernel``, ``bias`` or ``act``.
    """

    site: str
    path: str
    kind: str
    tensor: str
    shape: tuple[int, ...]
    numel: int
    quantizer: Quantizer


def counted_tensors(model: nnx.Module) -> list[CountedTensor]:
    """Every tensor counted in the memory of ``model``, in forward order."""
    out: list[CountedTensor] = []
    for site, _, m in quantizable_sites(model):
        if isinstance(m, QuantizedWeights):
            for tensor, numel, quant in m.weight_tensors():
                shape = tuple(getattr(m, tensor)[...].shape)
                out.append(
                    CountedTensor(
                        site, f"{site}.{tensor}_quant", "weight", tensor, shape, numel, quant
                    )
                )
        elif isinstance(m, ActQuant):
            if m.shape is None:
                raise ValueError(
                    f"activation site {site!r} has no recorded shape; build the model with "
                    "its input shape (record_activation_shapes) before counting memory"
                )
            numel = math.prod(m.shape)
            out.append(
                CountedTensor(site, f"{site}.quant", "activation", "act", m.shape, numel, m.quant)
            )
    return out


@functools.cache
def _stacked_bitwidth(spec: mq.QuantSpec):
    """``jit(vmap(bitwidth))`` for one spec, made once: called eagerly (reports, logging),
    an un-jitted vmap would compile every primitive of the bitwidth graph on every call."""
    return jax.jit(jax.vmap(lambda theta: mq.bitwidth(theta, spec)))


def grouped_bits(
    quantizers: Sequence[tuple[mq.QuantSpec | None, Mapping[str, jax.typing.ArrayLike]]],
) -> list[jax.Array]:
    """Bits (docs/method.md §3) of every ``(spec, θ)``, 32 where ``spec`` is None (float).

    One vectorised :func:`mq.bitwidth` per distinct spec (and θ shapes): a network has 20–70
    quantizers but only a few specs, and one scalar graph per quantizer doubled the HLO of a
    training step and its compile time.
    """
    bits: list[jax.Array] = [jnp.float32(FLOAT_BITS)] * len(quantizers)  # floats keep 32
    for members, group_bits in _bits_by_spec(quantizers):
        for j, i in enumerate(members):
            bits[i] = group_bits[j]
    return bits


def _bits_by_spec(
    quantizers: Sequence[tuple[mq.QuantSpec | None, Mapping[str, jax.typing.ArrayLike]]],
) -> list[tuple[list[int], jax.Array]]:
    """``[(members, bits [len(members), ...])]``: one vectorised :func:`mq.bitwidth` per
    distinct spec and θ shapes, over the indices of its quantizers (floats left out)."""
    groups: dict[tuple, list[int]] = {}
    for i, (spec, theta) in enumerate(quantizers):
        if spec is not None:
            shapes = tuple((k, jnp.shape(theta[k])) for k in spec.theta_names)
            groups.setdefault((spec, shapes), []).append(i)
    out = []
    for (spec, _), members in groups.items():
        stacked = {
            k: jnp.stack([jnp.asarray(quantizers[i][1][k], jnp.float32) for i in members])
            for k in spec.theta_names
        }
        out.append((members, _stacked_bitwidth(spec)(stacked)))
    return out


def stacked_bits(
    quantizers: Sequence[tuple[mq.QuantSpec | None, Mapping[str, jax.typing.ArrayLike]]],
) -> jax.Array:
    """``[len(quantizers)]``: the bits of every ``(spec, θ)`` as one vector, a per-channel
    θ's mean, 32 for a float tensor; the values of :func:`grouped_bits`, stacked.

    Built without a scalar per tensor: each spec's group stays the vector its vectorised
    :func:`mq.bitwidth` returns, the groups are concatenated and put in order by one
    gather. In a jitted step with a budget the gradient then runs as a few kernels, where a
    scalar per tensor cost a few each (``scripts/count_kernels.py --parts``).
    """
    pieces: list[jax.Array] = []
    order: list[int] = []
    floats = [i for i, (spec, _) in enumerate(quantizers) if spec is None]
    if floats:
        pieces.append(jnp.full([len(floats)], FLOAT_BITS, jnp.float32))
        order += floats
    for members, group_bits in _bits_by_spec(quantizers):
        if group_bits.ndim > 1:  # per channel: each member's mean, as grouped_bits' callers
            group_bits = jnp.stack([jnp.mean(b) for b in group_bits])
        pieces.append(group_bits)
        order += members
    if not pieces:
        return jnp.zeros([0], jnp.float32)
    bits = jnp.concatenate(pieces)
    if order == sorted(order):
        return bits
    return bits[np.argsort(np.asarray(order))]


@jax.custom_jvp
def _ordered_sum(x: jax.Array) -> jax.Array:
    """``((0 + x[0]) + x[1]) + …``: the sum in the order ``sum()`` of the scalars takes (the
    same float rounding as :func:`aggregate`); its derivative is one broadcast."""
    total = jnp.float32(0.0)
    for i in range(x.shape[0]):
        total = total + x[i]
    return total


@_ordered_sum.defjvp
def _ordered_sum_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return _ordered_sum(x), jnp.sum(t)


def aggregate_vector(kinds: Sequence[str], kb: jax.Array) -> tuple[Sizes, jax.Array]:
    """:func:`aggregate` of the vector ``kb`` (one entry per tensor), the same numbers bit
    for bit, and the activation tensors' KB as a vector."""
    kinds = np.asarray(kinds)
    weights = np.flatnonzero(kinds == "weight")
    acts = np.flatnonzero(kinds == "activation")
    zero = jnp.float32(0.0)
    weight_kb = _ordered_sum(kb[weights]) if len(weights) else zero
    if not len(acts):
        return Sizes(weight_kb, zero, zero), jnp.zeros([0], jnp.float32)
    act_kb = kb[acts] if len(acts) < len(kinds) else kb
    act_max_kb = act_kb[jnp.argmax(jax.lax.stop_gradient(act_kb))]
    return Sizes(weight_kb, act_max_kb, jnp.sum(act_kb)), act_kb


def tensor_kb(numel: int, bits: jax.Array) -> jax.Array:
    """``numel · b / 8192``; a per-channel ``b`` counts ``numel · mean(b)`` bits."""
    b = bits if bits.ndim == 0 else jnp.mean(bits)
    return numel * b / KB


class Sizes(NamedTuple):
    """The three totals of docs/method.md §5 in KB (differentiable scalar arrays)."""

    weight_kb: jax.Array
    act_max_kb: jax.Array
    act_sum_kb: jax.Array


def aggregate(kinds: Sequence[str], kb: Sequence[jax.Array]) -> Sizes:
    """Weight sum, activation max and sum of per-tensor sizes.

    The ``max`` gives its whole gradient to the first largest tensor, as the authors' NNabla
    code does (``jnp.max`` would share it between ties).
    """
    zero = jnp.float32(0.0)
    weight_kb = sum((s for k, s in zip(kinds, kb, strict=True) if k == "weight"), zero)
    acts = [s for k, s in zip(kinds, kb, strict=True) if k == "activation"]
    if not acts:
        return Sizes(weight_kb, zero, zero)
    act_kb = jnp.stack(acts)
    act_max_kb = act_kb[jnp.argmax(jax.lax.stop_gradient(act_kb))]
    return Sizes(weight_kb, act_max_kb, jnp.sum(act_kb))


# ----------------------------------------------------------------------------------------
# Paths in a parameter pytree.


def _key_str(key: Any) -> str:
    for attr in ("key", "idx", "name"):  # DictKey, SequenceKey / FlattenedIndexKey, GetAttrKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def dotted_path(key_path: Sequence[Any]) -> str:
    """A key path as a dotted string; the trailing ``value`` of a Variable leaf is dropped."""
    parts = [_key_str(k) for k in key_path]
    if key_path and isinstance(key_path[-1], jax.tree_util.GetAttrKey) and parts[-1] == "value":
        parts = parts[:-1]
    return ".".join(parts)


def leaves_by_path(tree: Any) -> dict[str, Any]:
    """``{dotted path: leaf}`` of a pytree (``nnx.State``, pure dict, masked tree...)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {dotted_path(p): leaf for p, leaf in flat}


# ----------------------------------------------------------------------------------------
# The static description and the pure size function.


class QuantizerInfo(NamedTuple):
    """The static facts of one quantizer and the tensor it counts.

    Attributes:
      path: dotted module path of the :class:`~mpdnn.nn.quantizer.Quantizer`
        (``"stages.0.1.conv1.kernel_quant"``, ``"stem_act.quant"``); θ ``name`` lives at
        ``f"{path}.{name}"`` in the parameter tree.
      spec: its :class:`~mpdnn.quantizers.QuantSpec`; ``None`` for a float tensor (32 bits).
      learned: names of the trained θ (``QuantParam``), e.g. ``("d", "qmax")``.
      constants: θ not trained (``QuantState``: the fixed mode's, TQT's ``b``), by value at
        build time (float, or a numpy array for a per-channel θ).
      kind: ``"weight"`` or ``"activation"``.
      site: the layer's dotted path; ``tensor``: ``kernel``, ``bias`` or ``act``.
      shape: the kernel's or the per-sample activation's shape; ``numel``: its size.
    """

    path: str
    spec: mq.QuantSpec | None
    learned: tuple[str, ...]
    constants: dict[str, Any]
    kind: str
    site: str
    tensor: str
    shape: tuple[int, ...]
    numel: int

    @property
    def learns_bits(self) -> bool:
        """Whether training can change this tensor's bitwidth (U3/P3 learned, or a learned b)."""
        if self.spec is None:
            return False
        if self.spec.learns_bits:
            return "b" in self.learned
        return bool(self.learned)

    def theta_path(self, name: str) -> str:
        return f"{self.path}.{name}"


def _constant(value: jax.Array) -> Any:
    arr = np.asarray(value, np.float32)
    return float(arr) if arr.ndim == 0 else arr


class Accounting:
    """Memory of a quantized model as a pure function of its parameter pytree.

    Build it once with :meth:`from_model` (outside ``jit``); call it inside a jitted step::

        sizes = accounting(params)   # {"weight_kb": ..., "act_max_kb": ..., "act_sum_kb": ...}

    ``params`` is any pytree that holds every trained θ at its module path: the
    ``nnx.State`` of ``nnx.Param``, its ``nnx.to_pure_dict``, or a tree ``optax.masked`` passes
    on. The numbers equal :func:`~mpdnn.optim.memory`'s for the same state.
    """

    def __init__(
        self,
        quantizers: Iterable[QuantizerInfo],
        fixed_bits: Sequence[float],
        *,
        vectorized: bool = False,
    ):
        self.quantizers: tuple[QuantizerInfo, ...] = tuple(quantizers)
        # Bits at build time of the tensors whose bits training cannot change (for min_sizes).
        self._fixed_bits = tuple(fixed_bits)
        self.vectorized = vectorized

    @classmethod
    def from_model(cls, model: nnx.Module, *, vectorized: bool = False) -> Accounting:
        """Describe ``model`` (built, its activation shapes recorded, as for ``memory``).

        ``vectorized``: compute bits, KB and totals as vectors (:func:`stacked_bits`,
        :func:`aggregate_vector`) instead of a scalar per tensor: the same numbers bit for
        bit, in fewer kernels in a jitted step (ResNet-20 with both budgets: the sizes'
        gradient 233 → 167 on CPU, ``results/kernel_counts.md``). Off by default until a
        GPU has timed it; ``optim.flat_update`` turns it on in a run.
        """
        infos, fixed_bits = [], []
        for t in counted_tensors(model):
            q = t.quantizer
            spec = q.spec
            learned: list[str] = []
            constants: dict[str, Any] = {}
            for name in spec.theta_names if spec is not None else ():
                variable = getattr(q, name)
                if isinstance(variable, nnx.Param):
                    learned.append(name)
                else:
                    constants[name] = _constant(variable[...])
            info = QuantizerInfo(
                t.path, spec, tuple(learned), constants, t.kind, t.site, t.tensor, t.shape, t.numel
            )
            infos.append(info)
            fixed_bits.append(np.nan if info.learns_bits else float(jnp.mean(q.bits())))
        return cls(infos, fixed_bits, vectorized=vectorized)

    def __repr__(self) -> str:
        learned = sum(q.learns_bits for q in self.quantizers)
        how = ", vectorized" if self.vectorized else ""
        return f"Accounting({len(self.quantizers)} tensors, {learned} with learned bits{how})"

    def _theta(self, lookup: Mapping[str, Any], q: QuantizerInfo) -> dict[str, jax.Array]:
        theta = {k: jnp.asarray(v, jnp.float32) for k, v in q.constants.items()}
        for name in q.learned:
            path = q.theta_path(name)
            if path not in lookup:
                raise ValueError(
                    f"learned quantizer parameter {path!r} is not in params (masked out, or "
                    f"params of another model?); params hold {len(lookup)} leaves, e.g. "
                    f"{sorted(lookup)[:3]}"
                )
            theta[name] = lookup[path]
        return theta

    def theta(self, params: Any, q: QuantizerInfo) -> dict[str, jax.Array]:
        """θ of quantizer ``q``: the learned ones looked up in ``params``, constants filled in.

        Raises ValueError when a learned θ is missing from ``params``.
        """
        return self._theta(leaves_by_path(params), q)

    def sizes(self, params: Any) -> Sizes:
        """Weight, max- and sum-activation memory (KB) at the θ in ``params``.

        Differentiable w.r.t. the learned θ (straight-through through the bitwidth, docs/method.md
        §3).
        """
        return self.sizes_of_bits(self.tensor_bits(params))

    def tensor_bits(self, params: Any) -> jax.Array:
        """``[num tensors]``: the bits of every counted tensor (a per-channel θ's mean), in
        the order of :attr:`quantizers`; 32 for a float tensor. Differentiable like
        :meth:`sizes`, which is :meth:`sizes_of_bits` of this."""
        lookup = leaves_by_path(params)
        thetas = [(q.spec, self._theta(lookup, q)) for q in self.quantizers]
        if self.vectorized:
            return stacked_bits(thetas)
        return jnp.stack([b if b.ndim == 0 else jnp.mean(b) for b in grouped_bits(thetas)])

    def sizes_of_bits(self, bits: jax.Array) -> Sizes:
        """The :class:`Sizes` of per-tensor ``bits`` (:meth:`tensor_bits`): a caller that
        needs both computes the bitwidths once."""
        return self._sizes(bits)[0]

    def _sizes(self, bits: jax.Array) -> tuple[Sizes, jax.Array]:
        """The :class:`Sizes` of ``bits`` and every activation tensor's KB (a vector)."""
        kinds = [q.kind for q in self.quantizers]
        if self.vectorized:
            numels = np.asarray([q.numel for q in self.quantizers], np.float32)
            return aggregate_vector(kinds, numels * bits / KB)  # tensor_kb on the vector
        kb = [tensor_kb(q.numel, bits[i]) for i, q in enumerate(self.quantizers)]
        acts = [s for k, s in zip(kinds, kb, strict=True) if k == "activation"]
        act_kb = jnp.stack(acts) if acts else jnp.zeros([0], jnp.float32)
        return aggregate(kinds, kb), act_kb

    def __call__(self, params: Any) -> dict[str, jax.Array]:
        """:meth:`sizes` as a dict: the ``size_fn`` the budget transforms take."""
        return self.sizes(params)._asdict()

    def with_tensors(self, params: Any) -> dict[str, jax.Array]:
        """:meth:`__call__` plus ``"act_kb"``, every activation tensor's KB in forward order.

        The ``size_fn`` for a budget on every activation tensor, ``Budget("act_kb", L)``:
        its feasible set is that of ``Budget("act_max_kb", L)``, but each tensor above ``L``
        gets its own gradient, where the max gives it all to its first argmax.
        """
        sizes, act_kb = self._sizes(self.tensor_bits(params))
        return {**sizes._asdict(), "act_kb": act_kb}

    def min_sizes(self) -> dict[str, float]:
        """Sizes (KB) of the smallest model training can reach.

        Every tensor whose bits are learned at its minimum ``spec.b_range[0]`` (docs/method.md §3's
        b_min); fixed, TQT and float tensors keep their bits. A budget below these numbers
        can never be met.
        """
        weight, acts = 0.0, []
        for q, fixed in zip(self.quantizers, self._fixed_bits, strict=True):
            bits = q.spec.b_range[0] if q.learns_bits else fixed
            kb = q.numel * bits / KB
            if q.kind == "weight":
                weight += kb
            else:
                acts.append(kb)
        return {
            "weight_kb": weight,
            "act_max_kb": max(acts, default=0.0),
            "act_sum_kb": sum(acts),
        }

    def learned_paths(self) -> dict[str, tuple[QuantizerInfo, str]]:
        """``{θ path: (quantizer, θ name)}`` of every learned θ."""
        return {q.theta_path(n): (q, n) for q in self.quantizers for n in q.learned}
