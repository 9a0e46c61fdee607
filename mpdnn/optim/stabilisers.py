"""The authors' stabilisers of the quantizer parameters θ (docs/method.md §6, "authors' code,
not in the paper", needed to reproduce the paper's numbers).

* :func:`clip_quantizer_gradients`, with a budget active: the gradients of U3's ``(d, qmax)``
  clipped elementwise to ``[−d, d]``, of P3's ``(qmin, qmax)`` to ``[−qmin, qmin]``, before the
  momentum step (the authors' ``clip_quant_grads``);
* :func:`project` after every update (the authors' ``clip_quant_vals``), as the last transform of
  a chain :func:`project_quantizer_params`: the order restored,
  ``d' = min(d, qmax − m)``, ``qmax' = max(d + m, qmax)`` (U3; P3 with ``(qmin, qmax)``), then
  every raw θ clipped into its box (docs/method.md §1–2) shrunk by ``m = 1e-5``.

Both are stateless: their state is ``optax.EmptyState()``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from mpdnn.optim._base import map_by_path, require_params
from mpdnn.optim.accounting import Accounting, QuantizerInfo, leaves_by_path

# The parametrizations whose gradients the authors clip, and by which θ (docs/method.md §6); the
# same pairs (lower, upper) are kept ordered by the projection.
_ORDERED_PAIRS: dict[tuple[str, str], tuple[str, str]] = {
    ("uniform", "d_qmax"): ("d", "qmax"),  # U3: clip to ±d, keep d < qmax
    ("pow2", "qmin_qmax"): ("qmin", "qmax"),  # P3: clip to ±qmin, keep qmin < qmax
}


def _reduce_to(x: jax.Array, shape: tuple[int, ...], op) -> jax.Array:
    """Reduce ``x`` with ``op`` over the axes along which ``shape`` broadcasts to it."""
    x = jnp.asarray(x)
    if x.shape == tuple(shape):
        return x
    full = jnp.broadcast_shapes(x.shape, shape)
    x = jnp.broadcast_to(x, full)
    lead = len(full) - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, n in enumerate(shape) if n == 1 and full[lead + i] != 1
    )
    return op(x, axis=axes).reshape(shape)


def reduce_bound(bound: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """A clip bound fitted to a leaf of ``shape``: its ``min`` over the axes along which
    ``shape`` broadcasts to it (a per-channel ``d`` bounding a scalar ``qmax``)."""
    return _reduce_to(bound, shape, jnp.min)


def _bound_value(q: QuantizerInfo, name: str, values: Mapping[str, jax.Array]) -> jax.Array:
    if name not in q.learned:
        return jnp.asarray(q.constants[name], jnp.float32)
    path = q.theta_path(name)
    if path not in values:
        raise ValueError(f"quantizer parameter {path!r} is needed but is not in params")
    return values[path]


def clip_quantizer_gradients(accounting: Accounting) -> optax.GradientTransformation:
    """Clip quantizer-parameter gradients elementwise, as the authors' code does with a budget.

    U3 (``d_qmax``): the gradients of ``d`` and ``qmax`` are clipped to ``[−d, d]``; P3
    (``qmin_qmax``): those of ``qmin`` and ``qmax`` to ``[−qmin, qmin]``, with the current
    *raw* ``d``/``qmin`` from ``params`` (``|·|``, though the projection keeps them positive).
    Every other leaf passes unchanged: weights, BatchNorm, and the θ of U1, U2 and the b-based
    pow2 quantizers, which the authors' ``clip_quant_grads`` does not touch either. The step
    on θ is then at most ``lr · d``, so a penalty gradient (∂S/∂θ can reach hundreds of KB
    per unit of θ) cannot throw the step size across many octaves in one update.

    Place it after the weight decay and before the momentum step (see
    :func:`~mpdnn.optim.budget_chain`); the authors use it only while a budget is active.
    Needs ``params``; stateless.
    """
    bound_fn = clip_bounds(accounting)

    def clip(updates, params):
        require_params(params)
        named = bound_fn(params, leaves_by_path(updates))

        def clip_leaf(path, u):
            if path not in named:
                return u
            r = reduce_bound(named[path], u.shape).astype(u.dtype)
            return jnp.clip(u, -r, r)

        return map_by_path(clip_leaf, updates)

    return optax.stateless(clip)


def clip_bounds(accounting: Accounting):
    """``(params, paths) -> {θ path: |d|}`` (U3; ``|qmin|`` for P3): the bound of
    :func:`clip_quantizer_gradients` for each of ``paths`` that it clips, from the raw
    ``d``/``qmin`` in ``params``, in that θ's shape (:func:`reduce_bound` fits it to the
    clipped leaf); ``signed=True`` leaves out the ``abs`` (for a caller that takes it of
    many bounds at once)."""
    bounds: dict[str, tuple[QuantizerInfo, str]] = {}
    for q in accounting.quantizers:
        if q.spec is None:
            continue
        pair = _ORDERED_PAIRS.get((q.spec.family, q.spec.parametrization))
        if pair is None:
            continue
        for name in q.learned:
            bounds[q.theta_path(name)] = (q, pair[0])

    def bound_fn(params, paths: Iterable[str], *, signed: bool = False) -> dict[str, jax.Array]:
        values = leaves_by_path(params)
        sign = (lambda x: x) if signed else jnp.abs
        return {path: sign(_bound_value(*bounds[path], values)) for path in paths if path in bounds}

    return bound_fn


def _box(v: jax.Array, lo: float, hi: float, margin: float) -> jax.Array:
    lo_in, hi_in = lo + margin, hi - margin
    if lo_in > hi_in:  # a box narrower than 2·margin (e.g. a fixed b): its middle
        lo_in = hi_in = 0.5 * (lo + hi)
    return jnp.clip(v, lo_in, hi_in).astype(v.dtype)


def _projected(
    values: Mapping[str, jax.Array], accounting: Accounting, margin: float
) -> dict[str, jax.Array]:
    """Projected θ, by path, of every quantizer whose learned θ are in ``values``."""
    out: dict[str, jax.Array] = {}
    learned_total = 0
    for q in accounting.quantizers:
        if not q.learned:
            continue
        learned_total += 1
        present = [n for n in q.learned if q.theta_path(n) in values]
        if not present:
            continue
        if len(present) < len(q.learned):
            missing = [q.theta_path(n) for n in q.learned if n not in present]
            raise ValueError(f"quantizer {q.path!r} is partly in params: {missing} missing")
        theta = {n: jnp.asarray(values[q.theta_path(n)]) for n in q.learned}
        pair = _ORDERED_PAIRS.get((q.spec.family, q.spec.parametrization))
        if pair is not None and all(n in theta for n in pair):
            low, high = (theta[n] for n in pair)
            # both from the old values: a crossed pair (low > high) swaps, ``margin`` apart
            theta[pair[0]] = jnp.minimum(low, _reduce_to(high - margin, low.shape, jnp.min))
            theta[pair[1]] = jnp.maximum(high, _reduce_to(low + margin, high.shape, jnp.max))
        for n, v in theta.items():
            out[q.theta_path(n)] = _box(v, *q.spec.box(n), margin)
    if learned_total and not out:
        raise ValueError(
            "params hold none of the learned quantizer parameters of this Accounting "
            "(params of another model, or all masked out?)"
        )
    return out


def project(params: Any, accounting: Accounting, *, margin: float = 1e-5) -> Any:
    """Project raw θ back where the quantizers are valid: the authors' ``clip_quant_vals``.

    For U3, with the old values on the right (so a crossed pair swaps)::

        d' = min(d, qmax − margin),   qmax' = max(d + margin, qmax)

    and the same for P3 with (qmin, qmax); then every learned raw θ of every parametrization
    is clipped into its box shrunk by ``margin``: ``b`` into ``spec.b_range``, ``d`` into
    ``d_range``, ... (``[lo + margin, hi − margin]``, the box's middle if it is narrower than
    2·margin). Elementwise, so per-channel θ arrays work; a scalar partner of a per-channel θ
    is compared with its extreme. Other leaves are returned unchanged.

    Idempotent except in the corner where both of a pair sit at a common lower box edge
    (the order then needs one more application, as in the authors' code).
    """
    projected = _projected(leaves_by_path(params), accounting, margin)
    return map_by_path(lambda path, leaf: projected.get(path, leaf), params)


def project_quantizer_params(
    accounting: Accounting, *, margin: float = 1e-5
) -> optax.GradientTransformation:
    """:func:`project` as the last transform of a chain.

    θ leaves: ``updates' = project(params + updates) − params``; every other leaf passes
    unchanged, so after ``optax.apply_updates`` the θ are the projected ones (to float
    rounding) and the rest is exactly as without this transform. Needs ``params``; stateless.
    """
    learned = accounting.learned_paths()

    def project_updates(updates, params):
        require_params(params)
        old = leaves_by_path(params)
        steps = leaves_by_path(updates)
        for path in learned:
            if path in steps and path not in old:
                raise ValueError(f"{path!r} is in updates but not in params")
        new = {p: old[p] + steps[p].astype(old[p].dtype) for p in learned if p in steps}
        projected = _projected(new, accounting, margin) if new else {}

        def replace(path, u):
            if path not in projected:
                return u
            return (projected[path] - old[path]).astype(u.dtype)

        return map_by_path(replace, updates)

    return optax.stateless(project_updates)
