"""Memory budgets as optax transforms: the paper's penalty and our Lagrangian (docs/method.md §6).

A budget j asks ``S_j(θ) ≤ L_j``: ``S_j`` one of the sizes of docs/method.md §5 (``weight_kb``,
``act_max_kb``, ``act_sum_kb``, or every activation tensor, ``act_kb``; in KB), ``L_j`` its
limit. The transforms aim at ``(1 − ε_j)·L_j`` (ε the margin, 0 in the paper, docs/method.md
§13), with the violation ``g_j = S_j − (1 − ε_j)·L_j``:

* :func:`budget_penalty` (the paper): adds ``∇_θ Σ_j λ_j · max(0, g_j)²`` to the updates, the
  gradient of the paper's loss term ``CE + Σ_j λ_j · max(0, g_j)²``, λ = 0.1 on CIFAR-10;
* :func:`budget_lagrangian` (ours, beyond the paper): adds ``∇_θ Σ_j λ_j · g_j`` with
  multipliers learned by projected dual ascent, ``λ_j ← max(0, λ_j + η · g_j)``.

Both read the sizes from a ``size_fn(params) -> {name: KB}``, usually an
:class:`~mpdnn.optim.accounting.Accounting`; their gradients reach θ through the inferred
bitwidth (straight-through, docs/method.md §3). :func:`budget_values` finds their state in an
optimizer state for logging.

Whether a model meets its budgets is judged at ``L_j`` itself, margins playing no part:
:func:`feasible` under ``jit`` on params, :func:`within_limits` on the host on sizes.
:func:`check_feasible` rejects, before training, a limit below the smallest model possible.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mpdnn.optim._base import OptionError, SizeFn, find_state, require_params
from mpdnn.optim.accounting import Accounting

#: Default dual step size η of :func:`budget_lagrangian`, per KB of violation per step.
DUAL_LEARNING_RATE = 0.01


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
        :func:`~mpdnn.optim.freeze_quantizer_params` judge the budget at ``limit_kb``. A
        controller that chatters around its target then chatters inside the feasible set.
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


def check_budgets(budgets: Sequence[Budget]) -> tuple[Budget, ...]:
    """``budgets`` as :class:`Budget` s; :class:`OptionError` for a bad limit, strength or
    margin, ValueError for none or a size that is not a name."""
    budgets = tuple(Budget(*b) for b in budgets)
    if not budgets:
        raise ValueError("no budgets given: leave the budget transform out of the chain")
    for b in budgets:
        if not isinstance(b.size, str):
            raise ValueError(f"budget size must be a size name such as 'weight_kb', got {b}")
        if not 0 < float(b.limit_kb) < math.inf:
            raise OptionError("limit_kb", b.limit_kb, "a finite number > 0 KB", b.size)
        if not callable(b.strength) and not float(b.strength) >= 0:
            raise OptionError("strength", b.strength, ">= 0", b.size)
        if not 0.0 <= float(b.margin) < 1.0:
            raise OptionError("margin", b.margin, "in [0, 1)", b.size)
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
    usable under ``jit``. A vector size meets its budget when every element does.

    The same verdict as :func:`within_limits`, on params instead of host-side sizes."""
    budgets = check_budgets(budgets)
    sizes = _sizes_of(size_fn, budgets, params)
    ok = [jnp.all(s <= b.limit_kb) for s, b in zip(sizes, budgets, strict=True)]
    return jnp.all(jnp.stack(ok))


def within_limits(sizes: Mapping[str, float], limits: Mapping[str, float]) -> bool:
    """Whether a model's sizes meet every limit: ``sizes[name] ≤ limits[name]`` for every
    ``name`` in ``limits`` (KB), at the limit itself.

    The host-side feasibility verdict (docs/method.md §6: a delivered model must meet every
    budget) on sizes already computed, e.g. ``accounting(params)`` fetched to the host.
    Margins play no part: they move only what the transforms aim at (docs/method.md §13).
    Sizes without a limit are not judged; no limits at all is ``True``. Under ``jit``, on
    params, use :func:`feasible`.

    Raises:
      ValueError: a limited size is missing from ``sizes``.
    """
    missing = sorted(name for name in limits if name not in sizes)
    if missing:
        raise ValueError(f"sizes give {sorted(sizes)}, no {missing} to judge against a limit")
    return all(float(sizes[name]) <= float(limit) for name, limit in limits.items())


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
    budgets = check_budgets(budgets)

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
        require_params(params)
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
    :func:`~mpdnn.optim.clip_quantizer_gradients`) needs to move a qmax by one bit, so the
    multipliers neither lag the bitwidths by epochs nor jump faster than θ can answer.

    Args:
      size_fn: ``params -> {size name: KB}``, e.g. an Accounting.
      budgets: the :class:`Budget` s.
      dual_learning_rate: η, a float or a schedule of the step count.
      initial_multiplier: λ_j at init (≥ 0).

    Returns:
      An ``optax.GradientTransformation`` (needs ``params``) with a :class:`BudgetState`.
    """
    budgets = check_budgets(budgets)
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
        require_params(params)
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
    return find_state(opt_state, BudgetState)


def check_feasible(accounting: Accounting, budgets: Sequence[Budget]) -> None:
    """Raise ValueError when a budget is below the smallest model training can reach.

    The minimum is :meth:`Accounting.min_sizes`: every learned bitwidth at its ``b_min``,
    fixed, TQT and float tensors at their bits. It is printed in the message.
    """
    smallest = accounting.min_sizes()
    smallest["act_kb"] = smallest["act_max_kb"]  # every tensor within L iff the max is
    for b in check_budgets(budgets):
        if b.size in smallest and b.limit_kb < smallest[b.size]:
            raise ValueError(
                f"budget {b.size} ≤ {b.limit_kb:g} KB cannot be met: the smallest model "
                f"possible (every learned bitwidth at its minimum, fixed and float tensors "
                f"as they are) has {b.size} = {smallest[b.size]:.4f} KB"
            )
