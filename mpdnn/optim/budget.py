"""Memory budgets as optax gradient transformations (docs/method.md §6).

A budget j asks ``S_j(θ) ≤ L_j``: ``S_j`` one of the sizes of docs/method.md §5 (``weight_kb``,
``act_max_kb``, ``act_sum_kb``, in KB), ``L_j`` its limit. With ``g_j = S_j − L_j``:

* :func:`budget_penalty` (the paper): adds ``∇_θ Σ_j λ_j · max(0, g_j)²`` to the updates,
  i.e. the gradient of the paper's loss term, λ = 0.1 for CIFAR-10;
* :func:`budget_lagrangian` (ours, beyond the paper): adds ``∇_θ Σ_j λ_j · g_j`` with
  multipliers learned by dual ascent, ``λ_j ← max(0, λ_j + η · g_j)``, so no λ is tuned.

Both read the sizes from a ``size_fn(params) -> {name: KB}``, usually an
:class:`~mpdnn.optim.accounting.Accounting`; their gradients reach θ through the inferred
bitwidth (straight-through, docs/method.md §3). The authors' code adds two stabilisers that are not
in
the paper but are needed to reproduce it (docs/method.md §6): :func:`clip_quantizer_gradients` and
:func:`project_quantizer_params`. NNabla's momentum SGD is :func:`sgd_nnabla`.

The authors' update, in order: loss gradients (penalty included) → weight decay 2e-4 added to
every gradient (quantizer parameters and BatchNorm too) → quantizer gradients clipped (only
with a budget) → momentum step → raw θ projected into their boxes. As one optax chain::

    accounting = Accounting.from_model(model)
    budgets = [Budget("weight_kb", 70.1), Budget("act_max_kb", 8.1)]
    tx = optax.chain(
        budget_penalty(accounting, budgets),        # or budget_lagrangian(...)
        optax.add_decayed_weights(2e-4),
        clip_quantizer_gradients(accounting),
        sgd_nnabla(learning_rate, momentum=0.9),
        project_quantizer_params(accounting),
    )

:func:`budget_chain` builds exactly this (and rejects budgets that no model can meet).
Inside the loss the trainer then keeps only the cross-entropy: the penalty comes from here.
:func:`budget_values` finds the multipliers and violations in the optimizer state for logging.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mpdnn.optim.accounting import Accounting, QuantizerInfo, dotted_path, leaves_by_path

SizeFn = Callable[[Any], Mapping[str, jax.Array]]

# optax's message for a transform that needs params (optax._src.base.NO_PARAMS_MSG).
_NO_PARAMS = (
    "You are using a transformation that requires the current value of parameters, but you "
    "are not passing `params` when calling `update`."
)

#: Default dual step size η of :func:`budget_lagrangian`, per KB of violation per step.
DUAL_LEARNING_RATE = 0.01

# The parametrizations whose gradients the authors clip, and by which θ (docs/method.md §6); the
# same
# pairs (lower, upper) are kept ordered by the projection.
_ORDERED_PAIRS: dict[tuple[str, str], tuple[str, str]] = {
    ("uniform", "d_qmax"): ("d", "qmax"),  # U3: clip to ±d, keep d < qmax
    ("pow2", "qmin_qmax"): ("qmin", "qmax"),  # P3: clip to ±qmin, keep qmin < qmax
}


class Budget(NamedTuple):
    """One memory constraint ``size_fn(params)[size] ≤ limit_kb``.

    Attributes:
      size: key of the ``size_fn`` output: ``"weight_kb"``, ``"act_max_kb"`` or
        ``"act_sum_kb"`` for an :class:`~mpdnn.optim.accounting.Accounting`, or
        ``"act_kb"`` of :meth:`Accounting.with_tensors <mpdnn.optim.Accounting.with_tensors>`:
        a vector size is one constraint per element, all with this limit.
      limit_kb: the limit in KB (> 0).
      strength: λ of :func:`budget_penalty`, a float or an ``optax.Schedule`` of the step
        count (ignored by :func:`budget_lagrangian`). The paper uses 0.1 on CIFAR-10.
      margin: ε in ``[0, 1)``: the transforms aim at ``(1 − ε) · limit_kb`` (the penalty
        and the multipliers act from there), while :func:`check_feasible`, the trainer and
        :func:`freeze_quantizer_params` judge the budget at ``limit_kb``. A controller that
        chatters around its target then chatters inside the feasible set.
    """

    size: str
    limit_kb: float
    strength: float | optax.Schedule = 0.1
    margin: float = 0.0

    @property
    def target_kb(self) -> float:
        return (1.0 - float(self.margin)) * float(self.limit_kb)


class BudgetState(NamedTuple):
    """State of :func:`budget_penalty` and :func:`budget_lagrangian`, one entry per
    constraint: per budget, in the order given, one for a scalar size and one per element
    for a vector size (``"act_kb"``).

    Attributes:
      count: number of updates done (int32).
      multipliers: ``[num_constraints]``. Penalty: the λ_j(count) of the last update (at
        init, λ_j(0)). Lagrangian: the current multipliers, which the next update uses.
      violations: ``[num_constraints]``, ``g_j = S_j − (1 − ε_j)·L_j`` (KB) at the params
        the last update saw (zeros at init); ``≤ 0`` means the target is met.
    """

    count: jax.Array
    multipliers: jax.Array
    violations: jax.Array


def _check_budgets(budgets: Sequence[Budget]) -> tuple[Budget, ...]:
    budgets = tuple(Budget(*b) for b in budgets)
    if not budgets:
        raise ValueError("no budgets given: leave the budget transform out of the chain")
    for b in budgets:
        if not isinstance(b.size, str):
            raise ValueError(f"budget size must be a size name such as 'weight_kb', got {b}")
        if not float(b.limit_kb) > 0:
            raise ValueError(f"budget limit must be > 0 KB, got {b.size} ≤ {b.limit_kb}")
        if not callable(b.strength) and not float(b.strength) >= 0:
            raise ValueError(f"budget strength must be ≥ 0, got {b.strength} for {b.size}")
        if not 0.0 <= float(b.margin) < 1.0:
            raise ValueError(f"budget margin must be in [0, 1), got {b.margin} for {b.size}")
    return budgets


def _sizes_of(size_fn: SizeFn, budgets: tuple[Budget, ...], params: Any) -> list[jax.Array]:
    """Each budget's size at ``params``, flattened (a scalar size is one element)."""
    sizes = size_fn(params)
    missing = [b.size for b in budgets if b.size not in sizes]
    if missing:
        raise ValueError(f"size_fn gives {sorted(sizes)}, no {missing} to budget")
    return [jnp.ravel(jnp.asarray(sizes[b.size], jnp.float32)) for b in budgets]


def _constraint_counts(size_fn: SizeFn, budgets: tuple[Budget, ...], params: Any) -> list[int]:
    """Constraints per budget (1 for a scalar size, its length for a vector), by shape only."""
    shapes = jax.eval_shape(lambda p: _sizes_of(size_fn, budgets, p), params)
    return [int(s.shape[0]) for s in shapes]


def _per_constraint(values: Sequence[Any], counts: Sequence[int]) -> jax.Array:
    """One value per budget repeated over its constraints: ``[num_constraints]``."""
    return jnp.concatenate(
        [jnp.full([n], v, jnp.float32) for v, n in zip(values, counts, strict=True)]
    )


def _violations_and_vjp(size_fn: SizeFn, budgets: tuple[Budget, ...], params: Any):
    """``g = S − (1 − ε)·L`` per constraint at ``params`` and the VJP
    ``c ↦ Σ_j c_j ∇_params g_j``."""

    def violations(p):
        sizes = _sizes_of(size_fn, budgets, p)
        return jnp.concatenate([s - b.target_kb for s, b in zip(sizes, budgets, strict=True)])

    g, vjp = jax.vjp(violations, params)
    return g, lambda c: vjp(c)[0]


def _add(updates: Any, extra: Any) -> Any:
    return jax.tree.map(
        lambda u, e: None if u is None else u + e.astype(u.dtype),
        updates,
        extra,
        is_leaf=lambda x: x is None,
    )


def feasible(size_fn: SizeFn, budgets: Sequence[Budget], params: Any) -> jax.Array:
    """Whether ``params`` meet every budget at its limit (margins ignored): a bool array,
    usable under ``jit``. A vector size meets its budget when every element does."""
    budgets = _check_budgets(budgets)
    sizes = _sizes_of(size_fn, budgets, params)
    ok = [jnp.all(s <= b.limit_kb) for s, b in zip(sizes, budgets, strict=True)]
    return jnp.all(jnp.stack(ok))


def budget_penalty(size_fn: SizeFn, budgets: Sequence[Budget]) -> optax.GradientTransformation:
    """The paper's budget penalty as a transform: adds its gradient to the updates.

    ``updates ← updates + ∇_params Σ_j λ_j(count) · max(0, g_j)²``, with
    ``g_j = size_fn(params)[size_j] − (1 − ε_j)·limit_j`` in KB (docs/method.md §6; ε = 0 in the
    paper). So ``∂/∂θ = Σ_j 2 λ_j max(0, g_j) ∂S_j/∂θ``: zero while every target is met.
    A vector size (``"act_kb"``) is one term per element: ``Σ_t λ · max(0, S_t − L)²``.

    Args:
      size_fn: ``params -> {size name: KB}``, e.g. an
        :class:`~mpdnn.optim.accounting.Accounting`. Must be differentiable w.r.t. params.
      budgets: the :class:`Budget` s; ``strength`` is λ (float or schedule of the count).

    Returns:
      An ``optax.GradientTransformation`` whose ``update`` needs ``params``; its state is a
      :class:`BudgetState`.
    """
    budgets = _check_budgets(budgets)

    def strengths(count, counts):
        return _per_constraint(
            [
                jnp.asarray(b.strength(count) if callable(b.strength) else b.strength)
                for b in budgets
            ],
            counts,
        )

    def init_fn(params):
        counts = _constraint_counts(size_fn, budgets, params)
        count = jnp.zeros([], jnp.int32)
        zeros = jnp.zeros([sum(counts)], jnp.float32)
        return BudgetState(count=count, multipliers=strengths(count, counts), violations=zeros)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(_NO_PARAMS)
        counts = _constraint_counts(size_fn, budgets, params)
        lam = strengths(state.count, counts)
        g, vjp = _violations_and_vjp(size_fn, budgets, params)
        updates = _add(updates, vjp(2.0 * lam * jnp.maximum(g, 0.0)))
        return updates, BudgetState(optax.safe_increment(state.count), lam, g)

    return optax.GradientTransformation(init_fn, update_fn)


def budget_lagrangian(
    size_fn: SizeFn,
    budgets: Sequence[Budget],
    *,
    dual_learning_rate: float | optax.Schedule = DUAL_LEARNING_RATE,
    initial_multiplier: float = 0.0,
) -> optax.GradientTransformation:
    """Budgets by the Lagrangian: multipliers learned by projected dual ascent (ours).

    With the multipliers λ_j in the state (all ``initial_multiplier`` at init)::

        updates ← updates + ∇_params Σ_j λ_j · g_j        (the current λ_j)
        λ_j     ← max(0, λ_j + η · g_j)                    (stored for the next update)

    where ``g_j = size_fn(params)[size_j] − (1 − ε_j)·limit_j`` (KB), one multiplier per
    constraint (per element of a vector size). λ_j grows while budget j is
    violated and shrinks, never below 0, while it is met, so the pull on θ settles where the
    budget binds: no λ to tune. ``Budget.strength`` is ignored.

    Default η = 0.01 per KB of violation per step (sizes in KB). Under a constant violation
    g the multiplier reaches 0.2·g, the coefficient of the paper's penalty gradient at that
    violation (2·λ·g, λ = 0.1), after 0.2/η = 20 steps, whatever the size of g; it takes as
    long to release a budget met with the same margin. 20 steps is a few percent of a
    CIFAR-10 epoch (390 steps), about the time momentum SGD (lr 0.03, steps clipped to ±d by
    :func:`clip_quantizer_gradients`) needs to move a qmax by one bit, so the multipliers
    neither lag the bitwidths by epochs nor jump faster than θ can answer.

    Args:
      size_fn: ``params -> {size name: KB}``, e.g. an Accounting.
      budgets: the :class:`Budget` s.
      dual_learning_rate: η, a float or a schedule of the step count.
      initial_multiplier: λ_j at init (≥ 0).

    Returns:
      An ``optax.GradientTransformation`` (needs ``params``) with a :class:`BudgetState`.
    """
    budgets = _check_budgets(budgets)
    if not initial_multiplier >= 0:
        raise ValueError(f"initial_multiplier must be ≥ 0, got {initial_multiplier}")
    if not callable(dual_learning_rate) and not dual_learning_rate > 0:
        raise ValueError(f"dual_learning_rate must be > 0, got {dual_learning_rate}")

    def init_fn(params):
        n = sum(_constraint_counts(size_fn, budgets, params))
        return BudgetState(
            count=jnp.zeros([], jnp.int32),
            multipliers=jnp.full([n], initial_multiplier, jnp.float32),
            violations=jnp.zeros([n], jnp.float32),
        )

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(_NO_PARAMS)
        lam = state.multipliers
        g, vjp = _violations_and_vjp(size_fn, budgets, params)
        updates = _add(updates, vjp(lam))
        eta = (
            dual_learning_rate(state.count) if callable(dual_learning_rate) else dual_learning_rate
        )
        new_lam = jnp.maximum(lam + jnp.asarray(eta, jnp.float32) * g, 0.0)
        return updates, BudgetState(optax.safe_increment(state.count), new_lam, g)

    return optax.GradientTransformation(init_fn, update_fn)


def budget_values(opt_state: Any) -> BudgetState | None:
    """The first :class:`BudgetState` inside ``opt_state`` (chained, masked, nested), or None.

    ``opt_state`` may be an optax state or an ``nnx.Optimizer``'s ``opt_state``.

    For logging: ``budget_values(opt_state).violations`` are the ``g_j`` (KB) and
    ``.multipliers`` the λ_j, in the order the budgets were given.
    """
    found = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, BudgetState))
    state = next((s for s in found if isinstance(s, BudgetState)), None)
    if state is None:
        return None
    # nnx.Optimizer keeps its state in OptArray variables: hand back plain arrays.
    return BudgetState(*(v[...] if isinstance(v, nnx.Variable) else v for v in state))


def check_feasible(accounting: Accounting, budgets: Sequence[Budget]) -> None:
    """Raise ValueError when a budget is below the smallest model training can reach.

    The minimum is :meth:`Accounting.min_sizes`: every learned bitwidth at its ``b_min``,
    fixed, TQT and float tensors at their bits. It is printed in the message.
    """
    smallest = accounting.min_sizes()
    smallest["act_kb"] = smallest["act_max_kb"]  # every tensor within L iff the max is
    for b in _check_budgets(budgets):
        if b.size in smallest and b.limit_kb < smallest[b.size]:
            raise ValueError(
                f"budget {b.size} ≤ {b.limit_kb:g} KB cannot be met: the smallest model "
                f"possible (every learned bitwidth at its minimum, fixed and float tensors "
                f"as they are) has {b.size} = {smallest[b.size]:.4f} KB"
            )


# ----------------------------------------------------------------------------------------
# The authors' stabilisers (docs/method.md §6, "authors' code, not in the paper").


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

    Place it after the weight decay and before the momentum step (see the module docstring);
    the authors use it only while a budget is active.
    """
    bounds: dict[str, tuple[QuantizerInfo, str]] = {}
    for q in accounting.quantizers:
        if q.spec is None:
            continue
        pair = _ORDERED_PAIRS.get((q.spec.family, q.spec.parametrization))
        if pair is None:
            continue
        for name in q.learned:
            bounds[q.theta_path(name)] = (q, pair[0])

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(_NO_PARAMS)
        values = leaves_by_path(params)

        def clip(key_path, u):
            target = bounds.get(dotted_path(key_path))
            if u is None or target is None:
                return u
            q, name = target
            r = _reduce_to(jnp.abs(_bound_value(q, name, values)), u.shape, jnp.min)
            r = r.astype(u.dtype)
            return jnp.clip(u, -r, r)

        return jax.tree_util.tree_map_with_path(clip, updates, is_leaf=lambda x: x is None), state

    return optax.GradientTransformation(init_fn, update_fn)


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

    def replace(key_path, leaf):
        return projected.get(dotted_path(key_path), leaf)

    return jax.tree_util.tree_map_with_path(replace, params)


def project_quantizer_params(
    accounting: Accounting, *, margin: float = 1e-5
) -> optax.GradientTransformation:
    """:func:`project` as the last transform of a chain.

    θ leaves: ``updates' = project(params + updates) − params``; every other leaf passes
    unchanged, so after ``optax.apply_updates`` the θ are the projected ones (to float
    rounding) and the rest is exactly as without this transform.
    """

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(_NO_PARAMS)
        old = leaves_by_path(params)
        steps = leaves_by_path(updates)
        learned = accounting.learned_paths()
        for path in learned:
            if path in steps and path not in old:
                raise ValueError(f"{path!r} is in updates but not in params")
        new = {p: old[p] + steps[p].astype(old[p].dtype) for p in learned if p in steps}
        projected = _projected(new, accounting, margin) if new else {}

        def replace(key_path, u):
            path = dotted_path(key_path)
            if u is None or path not in projected:
                return u
            return (projected[path] - old[path]).astype(u.dtype)

        updates = jax.tree_util.tree_map_with_path(replace, updates, is_leaf=lambda x: x is None)
        return updates, state

    return optax.GradientTransformation(init_fn, update_fn)


# ----------------------------------------------------------------------------------------
# Ours, beyond the paper: freezing the quantizers once the budgets are met.


class FreezeState(NamedTuple):
    """State of :func:`freeze_quantizer_params`.

    Attributes:
      count: number of updates done (int32).
      frozen_at: the update count at which θ froze (the parameters it saw are the frozen
        ones), or −1 while they are not frozen (int32).
    """

    count: jax.Array
    frozen_at: jax.Array

    @property
    def frozen(self) -> jax.Array:
        return self.frozen_at >= 0


def freeze_quantizer_params(
    accounting: Accounting,
    budgets: Sequence[Budget] = (),
    *,
    start_step: int = 0,
    size_fn: SizeFn | None = None,
) -> optax.GradientTransformation:
    """Freeze every learned quantizer θ from the first update at or after ``start_step``
    whose ``params`` meet every budget (at its limit, margins ignored); ours, docs/method.md §13.

    From then on the updates of every θ leaf are zero, so θ (and the bits, steps and ranges
    they set) stay exactly at values that meet every budget, whatever the transforms before
    this one added; the other leaves pass unchanged. Place it last in the chain (after
    :func:`project_quantizer_params`). With no budgets θ freeze at ``start_step``.

    The budget transforms earlier in the chain still run after the freeze but reach only θ,
    whose updates this zeroes: the update of every other leaf is exactly that of the same
    chain without budgets.

    Args:
      accounting: which leaves are θ.
      budgets: the :class:`Budget` s to meet before freezing.
      start_step: the update count from which a feasible update freezes.
      size_fn: the sizes the budgets name (default ``accounting.with_tensors``).
    """
    budgets = tuple(Budget(*b) for b in budgets)
    size_fn = accounting.with_tensors if size_fn is None else size_fn
    learned = set(accounting.learned_paths())

    def init_fn(params):
        del params
        return FreezeState(count=jnp.zeros([], jnp.int32), frozen_at=jnp.full([], -1, jnp.int32))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(_NO_PARAMS)
        ok = feasible(size_fn, budgets, params) if budgets else jnp.bool_(True)
        now = (~state.frozen) & (state.count >= start_step) & ok
        frozen_at = jnp.where(now, state.count, state.frozen_at)
        frozen = frozen_at >= 0

        def zero(key_path, u):
            if u is None or dotted_path(key_path) not in learned:
                return u
            return jnp.where(frozen, jnp.zeros_like(u), u)

        updates = jax.tree_util.tree_map_with_path(zero, updates, is_leaf=lambda x: x is None)
        return updates, FreezeState(optax.safe_increment(state.count), frozen_at)

    return optax.GradientTransformation(init_fn, update_fn)


def freeze_values(opt_state: Any) -> FreezeState | None:
    """The :class:`FreezeState` inside ``opt_state``, or None (no freeze in the chain)."""
    found = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, FreezeState))
    state = next((s for s in found if isinstance(s, FreezeState)), None)
    if state is None:
        return None
    return FreezeState(*(v[...] if isinstance(v, nnx.Variable) else v for v in state))


# ----------------------------------------------------------------------------------------
# The optimizer of the authors' code.


def sgd_nnabla(
    learning_rate: float | optax.Schedule, momentum: float = 0.9
) -> optax.GradientTransformation:
    """Momentum SGD as NNabla's ``Momentum`` solver: the learning rate inside the velocity.

    ``v ← m·v + lr·g``, ``p ← p − v``. ``optax.sgd`` does ``v ← m·v + g``,
    ``p ← p − lr·v``: the same while lr is constant, but after a step decay (lr / 10 at epochs
    80 and 120, docs/method.md §8) optax's old velocity is suddenly 10× weaker, NNabla's is not.
    Built as ``chain(scale_by_learning_rate(lr), trace(m))``: the trace accumulates
    ``−lr·g``.
    """
    return optax.chain(
        optax.scale_by_learning_rate(learning_rate),
        optax.trace(decay=momentum, nesterov=False),
    )


class LogSpaceState(NamedTuple):
    """State of :func:`sgd_log_space`: the update count and the velocity in ``log θ``."""

    count: jax.Array
    trace: Any


def sgd_log_space(
    learning_rate: float | optax.Schedule, momentum: float = 0.0
) -> optax.GradientTransformation:
    """NNabla-style momentum SGD on ``log θ`` for positive leaves (quantizer θ; ours).

    With ``u = log θ`` the gradient is ``∂L/∂u = θ · ∂L/∂θ``, so::

        v ← m·v + lr · θ · g,      θ ← θ · exp(−v)

    Every step is a relative change of θ, whatever its scale: a step size d = 2^-8 moves
    as readily as 0.5, one octave of d (one bit) is ``|v| = ln 2``, and θ stay positive. It
    replaces what the authors' ±d clip does crudely (their step is at most ``lr·d``, so also
    relative) without saturating: a gradient twice as large moves θ twice as far, so the
    penalty's pull stays proportional to λ, the violation and a layer's number of values.
    Needs ``params``; the updates returned are ``θ·(exp(−v) − 1)``.
    """

    def init_fn(params):
        return LogSpaceState(jnp.zeros([], jnp.int32), jax.tree.map(jnp.zeros_like, params))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(_NO_PARAMS)
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        trace = jax.tree.map(
            lambda v, g, p: momentum * v + jnp.asarray(lr, v.dtype) * p * g,
            state.trace,
            updates,
            params,
        )
        steps = jax.tree.map(lambda v, p: p * jnp.expm1(-v), trace, params)
        return steps, LogSpaceState(optax.safe_increment(state.count), trace)

    return optax.GradientTransformation(init_fn, update_fn)


def _quant_labels(accounting: Accounting):
    """``params -> labels``: ``"quant"`` on every learned θ leaf, ``"rest"`` elsewhere."""
    learned = set(accounting.learned_paths())

    def labels(params):
        return jax.tree_util.tree_map_with_path(
            lambda kp, _: "quant" if dotted_path(kp) in learned else "rest", params
        )

    return labels


def budget_chain(
    accounting: Accounting,
    budgets: Sequence[Budget],
    learning_rate: float | optax.Schedule,
    *,
    method: str = "penalty",
    momentum: float = 0.9,
    weight_decay: float = 2e-4,
    margin: float = 1e-5,
    dual_learning_rate: float | optax.Schedule = DUAL_LEARNING_RATE,
    initial_multiplier: float = 0.0,
    clip: bool = True,
    quant_learning_rate_scale: float = 1.0,
    quant_momentum: float | None = None,
    quant_update: str = "linear",
    freeze_step: int | None = None,
) -> optax.GradientTransformation:
    """The whole update of a run as one chain, budgets checked up front.

    With the defaults it is the authors' update (module docstring): budget term (penalty or
    Lagrangian) → weight decay on every parameter → the ±d / ±qmin clip of θ gradients
    (only with a budget) → NNabla momentum SGD → projection of θ into their boxes. Without
    budgets: weight decay → SGD → projection (the authors project θ in every run). A model
    without learned θ gets no clip and no projection.

    Ours, beyond the paper (docs/method.md §13):

    * ``clip=False`` drops the clip;
    * ``quant_learning_rate_scale``, ``quant_momentum`` (None: ``momentum``) and
      ``quant_update`` (``"linear"``: SGD on raw θ; ``"log"``: :func:`sgd_log_space`) give
      θ an update of their own (``optax.partition`` by path), the weights keeping theirs;
    * ``freeze_step``: :func:`freeze_quantizer_params` last, from that update count;
    * a :class:`Budget`'s ``margin`` moves its transform's target below its limit; a budget
      on ``"act_kb"`` penalises every activation tensor (sizes from
      :meth:`Accounting.with_tensors`).

    ``method``: ``"penalty"`` (the paper) or ``"lagrangian"``. ``margin`` here is the
    projection's distance from the box edges. Raises ValueError for a budget below
    :meth:`Accounting.min_sizes` (the message gives the minimum) and for unknown options.
    """
    if method not in ("penalty", "lagrangian"):
        raise ValueError(f"method must be 'penalty' or 'lagrangian', got {method!r}")
    if quant_update not in ("linear", "log"):
        raise ValueError(f"quant_update must be 'linear' or 'log', got {quant_update!r}")
    if not quant_learning_rate_scale > 0:
        raise ValueError(f"quant_learning_rate_scale must be > 0, got {quant_learning_rate_scale}")
    budgets = tuple(Budget(*b) for b in budgets)
    learned = any(q.learned for q in accounting.quantizers)
    size_fn = accounting.with_tensors if any(b.size == "act_kb" for b in budgets) else accounting
    parts: list[optax.GradientTransformation] = []
    if budgets:
        check_feasible(accounting, budgets)
        if method == "penalty":
            parts.append(budget_penalty(size_fn, budgets))
        else:
            parts.append(
                budget_lagrangian(
                    size_fn,
                    budgets,
                    dual_learning_rate=dual_learning_rate,
                    initial_multiplier=initial_multiplier,
                )
            )
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay))
    if budgets and learned and clip:
        parts.append(clip_quantizer_gradients(accounting))
    quant_momentum = momentum if quant_momentum is None else quant_momentum
    own = quant_learning_rate_scale != 1.0 or quant_momentum != momentum or quant_update != "linear"
    if learned and own:
        quant_lr = _scaled(learning_rate, quant_learning_rate_scale)
        quant_tx = (
            sgd_log_space(quant_lr, quant_momentum)
            if quant_update == "log"
            else sgd_nnabla(quant_lr, quant_momentum)
        )
        parts.append(
            optax.partition(
                {"quant": quant_tx, "rest": sgd_nnabla(learning_rate, momentum)},
                _quant_labels(accounting),
            )
        )
    else:
        parts.append(sgd_nnabla(learning_rate, momentum))
    if learned:
        parts.append(project_quantizer_params(accounting, margin=margin))
        if freeze_step is not None:
            parts.append(
                freeze_quantizer_params(
                    accounting, budgets, start_step=freeze_step, size_fn=accounting.with_tensors
                )
            )
    return optax.chain(*parts)


def _scaled(learning_rate: float | optax.Schedule, scale: float) -> float | optax.Schedule:
    if scale == 1.0:
        return learning_rate
    if callable(learning_rate):
        return lambda count: scale * learning_rate(count)
    return scale * learning_rate
