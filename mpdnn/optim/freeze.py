"""Freezing the quantizer parameters θ once the budgets are met (ours, beyond the paper:
``budget.freeze_epoch`` of docs/method.md §13).

With ``t*`` the first update count ``t ≥ start_step`` whose params meet every budget at its
limit (``S_j(θ_t) ≤ L_j``, margins ignored, as :func:`~mpdnn.optim.feasible` judges)::

    updates_θ ← 0   for every update t ≥ t*

so θ, and the bits they set, stay at values that meet every budget while the weights train on,
and the final model is a delivered one that meets every budget (docs/method.md §6, "ours").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mpdnn.optim._base import SizeFn, find_state, map_by_path, require_params
from mpdnn.optim.accounting import Accounting
from mpdnn.optim.constraints import Budget, feasible


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
    :func:`~mpdnn.optim.project_quantizer_params`). With no budgets θ freeze at ``start_step``.

    The budget transforms earlier in the chain still run after the freeze but reach only θ,
    whose updates this zeroes: the update of every other leaf is exactly that of the same
    chain without budgets.

    Args:
      accounting: which leaves are θ.
      budgets: the :class:`~mpdnn.optim.Budget` s to meet before freezing.
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
        require_params(params)
        ok = feasible(size_fn, budgets, params) if budgets else jnp.bool_(True)
        now = (~state.frozen) & (state.count >= start_step) & ok
        frozen_at = jnp.where(now, state.count, state.frozen_at)
        frozen = frozen_at >= 0

        def zero(path, u):
            if path not in learned:
                return u
            return jnp.where(frozen, jnp.zeros_like(u), u)

        updates = map_by_path(zero, updates)
        return updates, FreezeState(optax.safe_increment(state.count), frozen_at)

    return optax.GradientTransformation(init_fn, update_fn)


def freeze_values(opt_state: Any) -> FreezeState | None:
    """The :class:`FreezeState` inside ``opt_state``, or None (no freeze in the chain)."""
    return find_state(opt_state, FreezeState)
