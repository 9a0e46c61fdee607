"""The whole update of a run as one optax chain: :func:`budget_chain` (docs/method.md §6, §13).

The authors' update, in order (docs/method.md §6): loss gradients (penalty included) → weight
decay 2e-4 added to every gradient (quantizer parameters and BatchNorm too) → quantizer gradients
clipped (only with a budget) → momentum step → raw θ projected into their boxes. As one chain::

    accounting = Accounting.from_model(model)
    budgets = [Budget("weight_kb", 70.1), Budget("act_max_kb", 8.1)]
    tx = optax.chain(
        budget_penalty(accounting, budgets),        # or budget_lagrangian(...)
        optax.add_decayed_weights(2e-4),
        clip_quantizer_gradients(accounting),
        sgd_nnabla(learning_rate, momentum=0.9),
        project_quantizer_params(accounting),
    )

:func:`budget_chain` builds exactly this (and rejects budgets that no model can meet), plus
the options of docs/method.md §13. Inside the loss the trainer then keeps only the
cross-entropy: the penalty ``Σ_j λ_j · max(0, g_j)²`` comes from here.
"""

from __future__ import annotations

from collections.abc import Sequence

import optax

from mpdnn.optim._base import OptionError, map_by_path
from mpdnn.optim.accounting import Accounting
from mpdnn.optim.constraints import (
    DUAL_LEARNING_RATE,
    Budget,
    budget_lagrangian,
    budget_penalty,
    check_budgets,
    check_feasible,
)
from mpdnn.optim.flat import clip_flat, flat_update
from mpdnn.optim.freeze import freeze_quantizer_params
from mpdnn.optim.sgd import sgd_log_space, sgd_nnabla
from mpdnn.optim.stabilisers import (
    clip_bounds,
    clip_quantizer_gradients,
    project_quantizer_params,
)


def _quant_label(accounting: Accounting):
    """``path -> label``: ``"quant"`` for every learned θ leaf, ``"rest"`` elsewhere."""
    learned = set(accounting.learned_paths())
    return lambda path: "quant" if path in learned else "rest"


def _quant_labels(accounting: Accounting):
    """``params -> labels`` (``optax.partition``'s) of :func:`_quant_label`."""
    label = _quant_label(accounting)
    return lambda params: map_by_path(lambda path, _: label(path), params)


def _scaled(learning_rate: float | optax.Schedule, scale: float) -> float | optax.Schedule:
    if scale == 1.0:
        return learning_rate
    if callable(learning_rate):
        return lambda count: scale * learning_rate(count)
    return scale * learning_rate


METHODS = ("penalty", "lagrangian")
QUANT_UPDATES = ("linear", "log")


def check_options(
    budgets: Sequence[Budget] = (),
    *,
    method: str = "penalty",
    quant_learning_rate_scale: float = 1.0,
    quant_momentum: float | None = None,
    quant_update: str = "linear",
) -> None:
    """Raise :class:`OptionError` for the first option of :func:`budget_chain` that breaks
    its rule (the budgets' limits, strengths and margins included); the one home of these
    rules, which a training config's check calls too."""
    if method not in METHODS:
        raise OptionError("method", method, " or ".join(map(repr, METHODS)))
    if quant_update not in QUANT_UPDATES:
        raise OptionError("quant_update", quant_update, " or ".join(map(repr, QUANT_UPDATES)))
    if not quant_learning_rate_scale > 0:
        raise OptionError("quant_learning_rate_scale", quant_learning_rate_scale, "> 0")
    if quant_momentum is not None and not 0.0 <= quant_momentum < 1.0:
        raise OptionError("quant_momentum", quant_momentum, "in [0, 1)")
    if budgets:
        check_budgets(budgets)


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
    flat: bool = False,
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
      :meth:`Accounting.with_tensors`);
    * ``flat=True`` runs weight decay, clip and momentum step on one vector for the θ and one
      for the rest (:func:`~mpdnn.optim.flat.flat_update`): the same numbers (bit for bit on
      CPU) in fewer kernels; the optimizer state then holds vectors, so a checkpoint resumes
      only with the same ``flat``.

    ``method``: ``"penalty"`` (the paper) or ``"lagrangian"``. ``margin`` here is the
    projection's distance from the box edges. Raises ValueError for a budget below
    :meth:`Accounting.min_sizes` (the message gives the minimum) and for unknown options.
    """
    check_options(
        budgets,
        method=method,
        quant_learning_rate_scale=quant_learning_rate_scale,
        quant_momentum=quant_momentum,
        quant_update=quant_update,
    )
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
    clips = bool(budgets) and learned and clip
    quant_momentum = momentum if quant_momentum is None else quant_momentum
    own = quant_learning_rate_scale != 1.0 or quant_momentum != momentum or quant_update != "linear"
    rest_tx = sgd_nnabla(learning_rate, momentum)
    quant_tx = rest_tx
    if learned and own:
        quant_lr = _scaled(learning_rate, quant_learning_rate_scale)
        quant_tx = (
            sgd_log_space(quant_lr, quant_momentum)
            if quant_update == "log"
            else sgd_nnabla(quant_lr, quant_momentum)
        )
    decay = [optax.add_decayed_weights(weight_decay)] if weight_decay else []
    if flat:
        parts.append(
            flat_update(
                {
                    "quant": optax.chain(*decay, *([clip_flat()] if clips else []), quant_tx),
                    "rest": optax.chain(*decay, rest_tx),
                },
                _quant_label(accounting),
                bounds=clip_bounds(accounting) if clips else None,
                bounded="quant",
            )
        )
    else:
        parts += decay
        if clips:
            parts.append(clip_quantizer_gradients(accounting))
        if learned and own:
            parts.append(
                optax.partition({"quant": quant_tx, "rest": rest_tx}, _quant_labels(accounting))
            )
        else:
            parts.append(rest_tx)
    if learned:
        parts.append(project_quantizer_params(accounting, margin=margin))
        if freeze_step is not None:
            parts.append(
                freeze_quantizer_params(
                    accounting, budgets, start_step=freeze_step, size_fn=accounting.with_tensors
                )
            )
    return optax.chain(*parts)
