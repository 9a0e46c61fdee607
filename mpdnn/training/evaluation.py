"""Evaluating a run while it trains: sizes, errors, the selected model and the diagnostics.

:class:`Inspector` reads sizes and bits off the parameters (jitted), :class:`Diagnostics`
condenses every step's metrics between two evaluations, and :class:`Evaluator` runs one
evaluation: BatchNorm recalibrated first, the selection metric (validation error, else test
error: the authors' way), the best feasible model kept in ``best/``, the authors' selection
tracked, one record logged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mpdnn import optim
from mpdnn.optim.accounting import KB
from mpdnn.training.checkpoint import Checkpointer
from mpdnn.training.metrics import MetricsWriter, Progress
from mpdnn.training.placement import local


def _step_ratios(accounting: optim.Accounting, params) -> dict[str, jax.Array]:
    """q/d of every learned U3 tensor: ``qmax`` over its power-of-two step, whose distance
    to the nearest ``k + ½`` shows how close a tensor sits to a bit flip."""
    out = {}
    for q in accounting.quantizers:
        if q.spec is None or (q.spec.family, q.spec.parametrization) != ("uniform", "d_qmax"):
            continue
        if "d" not in q.learned:
            continue
        theta = accounting.theta(params, q)
        d = jnp.exp2(jnp.round(jnp.log2(theta["d"]))) if q.spec.pow2_step else theta["d"]
        out[f"{q.site}.{q.tensor}"] = jnp.mean(theta["qmax"] / d)
    return out


class Inspector:
    """Sizes (and per-tensor bits, KB and q/d) of parameters, jitted once: eager, the
    bitwidth graph would compile op by op at every evaluation."""

    def __init__(self, accounting: optim.Accounting):
        self.names = [f"{q.site}.{q.tensor}" for q in accounting.quantizers]
        self._numels = [q.numel for q in accounting.quantizers]

        @jax.jit
        def inspect(params):
            bits = accounting.tensor_bits(params)
            sizes = accounting.sizes_of_bits(bits)._asdict()
            return sizes, bits, _step_ratios(accounting, params)

        self._inspect = inspect

    def sizes(self, params) -> dict[str, float]:
        """``{"weight_kb", "act_max_kb", "act_sum_kb"}`` of ``params``."""
        return {k: float(v) for k, v in self._inspect(local(params))[0].items()}

    def tensors(self, params):
        """``(sizes, {tensor: bits}, {tensor: KB}, {tensor: q/d})`` of ``params``."""
        sizes, bits, q_over_d = self._inspect(local(params))
        bits = [float(b) for b in np.asarray(bits)]
        kb = {n: m * b / KB for n, m, b in zip(self.names, self._numels, bits, strict=True)}
        return (
            {k: float(v) for k, v in sizes.items()},
            dict(zip(self.names, bits, strict=True)),
            kb,
            {k: float(v) for k, v in q_over_d.items()},
        )


class Diagnostics:
    """Per-epoch diagnostics from every step's metrics: the fraction of steps within every
    budget and how often each tensor's bits changed (:meth:`flush` at each evaluation)."""

    def __init__(self, names: list[str], budgets: dict[str, float], bits: dict[str, float]):
        self.names = names
        self.budgets = budgets
        self.previous = np.asarray([bits[n] for n in names], np.float32)
        self._reset()

    def _reset(self) -> None:
        self.steps = 0
        self.within = 0
        self.changes = np.zeros(len(self.names), np.int64)

    def add(self, host: dict[str, np.ndarray]) -> None:
        n = len(host["loss"])
        self.steps += n
        if self.budgets:
            ok = np.ones(n, bool)
            for size, limit in self.budgets.items():
                ok &= host[size] <= limit
            self.within += int(ok.sum())
        if "bits" in host:
            bits = host["bits"]
            history = np.concatenate([self.previous[None], bits])
            self.changes += np.sum(history[1:] != history[:-1], axis=0)
            self.previous = bits[-1]

    def flush(self) -> dict[str, Any]:
        out: dict[str, Any] = {"steps": self.steps}
        if self.budgets:
            out["within_budget"] = self.within / max(self.steps, 1)
        out["bit_changes"] = {n: int(c) for n, c in zip(self.names, self.changes, strict=True) if c}
        self._reset()
        return out


@dataclasses.dataclass
class Split:
    """An evaluation split on the devices (``(images, labels, mask)`` batched, or ``()``
    for streamed data) and its number of images."""

    arrays: tuple
    count: int


def frozen_at(state) -> int | None:
    """The step at whose parameters every quantizer θ froze, or None."""
    frozen = optim.freeze_values(state["opt_state"])
    if frozen is None:
        return None
    at = int(np.asarray(local(frozen.frozen_at)))
    return at if at >= 0 else None


@dataclasses.dataclass
class Evaluator:
    """The evaluations of one run (see the module docstring).

    ``meta`` (checkpointed with the state) holds ``best_error`` (lowest test error, budgets
    ignored), ``best_feasible`` (the selected model) and ``authors`` (the lowest test error
    among evaluations that met every budget: the authors' selection, docs/method.md §6).
    ``authors``: also test evaluations that met every budget when there is a validation
    split (``train.eval_feasible_every``).
    """

    evaluate: Callable  # (params, rest, *split.arrays) -> (wrong, summed cross-entropy)
    recalibrate: Callable | None  # (params, rest) -> (rest, stat_error)
    test: Split
    validation: Split | None
    inspect: Inspector
    budgets: dict[str, float]
    meta: dict[str, Any]
    writer: MetricsWriter
    progress: Progress
    best: Checkpointer
    steps_per_epoch: int
    authors: bool = False

    def _error(self, model, split: Split) -> tuple[float, float]:
        wrong, ce = self.evaluate(model["params"], model["rest"], *split.arrays)
        return float(local(wrong)) / split.count, float(local(ce)) / split.count

    def test_error(self, model) -> float:
        """Test error of ``model`` (``{"params", "rest"}``), as it is."""
        return self._error(model, self.test)[0]

    def __call__(
        self,
        state,
        step: int,
        *,
        diagnostics=None,
        save_best: bool = True,
        authors_only: bool = False,
    ):
        """Evaluate ``state`` at ``step``; returns the (recalibrated) state and the record.

        ``authors_only``: an evaluation for the authors' selection (a feasible step between
        epoch ends): the test set; with a validation split it selects nothing.
        """
        record: dict[str, Any] = {"epoch": step / self.steps_per_epoch, "step": step}
        if self.recalibrate is not None:
            rest, error = self.recalibrate(state["params"], state["rest"])
            state = {**state, "rest": rest}
            shift, ratio = (float(v) for v in np.asarray(local(error)))
            record["bn_stat_error"] = {"mean_shift": shift, "log_var_ratio": ratio}
        sizes, bits, kb, ratios = self.inspect.tensors(state["params"])
        feasible = optim.within_limits(sizes, self.budgets)
        meta = self.meta
        on_validation = self.validation is not None
        selected = None
        if on_validation and not authors_only:
            selected, record["validation_loss"] = self._error(state, self.validation)
            record["validation_error"] = selected
        if not on_validation or (self.authors and (feasible or not self.budgets)):
            record["test_error"], record["test_loss"] = self._error(state, self.test)
            if not on_validation:  # the authors' selection is the only one there is
                selected = record["test_error"]
        test_error = record.get("test_error")
        if test_error is not None:
            if meta["best_error"] is None or test_error < meta["best_error"]:
                meta["best_error"] = test_error
            authors = meta.get("authors")
            if feasible and (authors is None or test_error < authors["test_error"]):
                meta["authors"] = {"step": step, "test_error": test_error}
        best = meta["best_feasible"]
        key = "validation_error" if on_validation else "test_error"
        if (
            save_best
            and selected is not None
            and feasible
            and (best is None or selected < best[key])
        ):
            meta["best_feasible"] = {
                "step": step,
                "test_error": test_error,
                "validation_error": record.get("validation_error"),
                **sizes,
            }
            self.best.save(
                step,
                {"params": state["params"], "rest": state["rest"]},
                metadata=meta["best_feasible"],
                force=True,
            )
        record.update(sizes)
        record.update(feasible=feasible, bits=bits, kb=kb)
        if ratios:
            record["q_over_d"] = ratios
        budget_state = optim.budget_values(state["opt_state"])
        if budget_state is not None:
            record["multipliers"] = np.asarray(local(budget_state.multipliers)).tolist()
        frozen = frozen_at(state)
        if frozen is not None:
            record["frozen_step"] = frozen
        if diagnostics:
            record.update(diagnostics)
        # An evaluation that selects nothing (the authors' alone) is logged apart.
        kind = "authors_eval" if authors_only and on_validation else "eval"
        self.writer.write(kind, step, record)
        sizes_text = " ".join(f"{k}={v:.2f}" for k, v in sizes.items())
        errors = " ".join(
            f"{name} error {record[k]:.4f}"
            for name, k in (("validation", "validation_error"), ("test", "test_error"))
            if k in record
        )
        self.progress.write(
            f"step {step} epoch {record['epoch']:.1f}: {errors} {sizes_text}"
            + ("" if not self.budgets else (" feasible" if feasible else " over budget"))
        )
        return state, record
