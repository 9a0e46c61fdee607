"""Momentum SGD as the authors' NNabla solver, and our SGD on ``log θ``.

* :func:`sgd_nnabla`, the optimizer of the authors' code (docs/method.md §8): the learning
  rate inside the velocity, ``v ← m·v + lr·g``, ``p ← p − v``;
* :func:`sgd_log_space`, ours (``quant_update="log"`` of
  :func:`~mpdnn.optim.budget_chain`, docs/method.md §13): the same on ``u = log θ`` for the
  positive quantizer parameters, ``v ← m·v + lr·θ·g``, ``θ ← θ·exp(−v)``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mpdnn.optim._base import require_params


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
        require_params(params)
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
