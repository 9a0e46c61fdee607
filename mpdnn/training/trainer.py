"""``train_and_evaluate(config, workdir)``: memory-constrained training (docs/method.md §6–8, §13).

One run of a :mod:`mpdnn.training.config` ``ConfigDict``, read top to bottom:

1. :func:`mpdnn.training.setup.setup`: data, schedule, device mesh, the quantized model,
   its accounting and the optimizer (:func:`mpdnn.optim.budget_chain` with the options of
   ``budget.recipe``);
2. the state placed on the mesh (data parallel: batches sharded on ``data``, everything
   else replicated) and resumed from the latest readable checkpoint;
3. the loop: ``train.steps_per_call`` steps per jitted call (:mod:`mpdnn.training.steps`),
   evaluation (:class:`~mpdnn.training.evaluation.Evaluator`: BatchNorm re-estimated first
   when ``train.bn_recalibration`` asks), checkpoint and logging at epoch boundaries;
4. delivery: the frozen final model (θ frozen within every budget), else the selected
   evaluation that met every budget, else the final one when there is no budget; with
   budgets and no feasible model nothing is delivered and ``python -m mpdnn.train`` exits
   with status 3 (docs/method.md §6);
5. the run directory (:mod:`mpdnn.training.rundir`, which says what each file holds):
   ``summary.json`` with its ``status``, ``report.json``, the plots, ``best/``, ``final/``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shlex
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mpdnn import optim
from mpdnn.provenance import provenance
from mpdnn.training import config as cfg
from mpdnn.training.checkpoint import Checkpointer, CheckpointError
from mpdnn.training.evaluation import Diagnostics, Evaluator, Inspector, Split, frozen_at
from mpdnn.training.metrics import MetricsWriter, Progress
from mpdnn.training.placement import any_process, local, put
from mpdnn.training.rundir import RunBusyError, RunDir, RunDirError
from mpdnn.training.setup import (  # noqa: F401  (re-exported: the trainer's public helpers)
    Setup,
    build_model,
    freeze_step,
    load_data,
    make_optimizer,
    setup,
)
from mpdnn.training.steps import (
    Steps,
    epoch_indices,
    eval_arrays,
    make_steps,
    recalibration_graphdef,
    recalibration_indices,
)
from mpdnn.training.streaming import put_local

#: Set (e.g. by a SIGTERM handler) to make a running loop checkpoint and return.
STOP_REQUESTED = threading.Event()


class TrainingError(RuntimeError):
    """A run that cannot go on (e.g. a non-finite loss); one line saying what was kept."""


@dataclasses.dataclass
class RunResult:
    """What a run delivered; ``summary.json`` holds the same as JSON.

    ``selection`` says how ``best_feasible_*`` was chosen: on the validation split
    (``data.validation_size``), or on the test set, the authors' way, labelled as such.
    ``authors_test_error`` is the authors' selection (docs/method.md §6: the lowest test error among
    evaluations within every budget; with a validation split only when
    ``train.eval_feasible_every`` asks for it). Test errors of a run with a validation
    split are of the final and the selected model, each evaluated once at the end.
    """

    name: str  # the config's name
    workdir: str
    status: str  # "completed" or "stopped" (checkpointed, resumable)
    step: int
    total_steps: int
    steps_per_epoch: int
    recipe: str  # budget.recipe: "paper" or "mpdnn"
    budgets: dict[str, float]
    wall_time_s: float
    # What was delivered: a stopped run leaves these at their defaults (nothing delivered).
    selection: str = ""  # "validation" or "test (the authors')"
    final_test_error: float | None = None
    final_validation_error: float | None = None
    best_test_error: float | None = None  # lowest test error of any evaluation, budgets ignored
    best_feasible_test_error: float | None = None  # the selected evaluation within every budget
    best_feasible_validation_error: float | None = None
    best_feasible_step: int | None = None
    authors_test_error: float | None = None  # the authors' selection, labelled as theirs
    authors_step: int | None = None
    frozen_step: int | None = None  # θ frozen at this step's values (budget.freeze_epoch)
    feasible: bool | None = None  # None: no budget
    # "final" (no budget, or θ frozen within every budget), "best_feasible" or None (no
    # model met every budget)
    delivered: str | None = None
    delivered_test_error: float | None = None
    delivered_sizes: dict[str, float] = dataclasses.field(default_factory=dict)  # final if none
    final_sizes: dict[str, float] = dataclasses.field(default_factory=dict)
    verdicts: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    layers: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    should_stop: Callable[[int], bool] | None = None,
    command: str | None = None,
) -> RunResult:
    """Train and evaluate one run of ``config`` in ``workdir`` (resuming if it holds
    checkpoints). ``should_stop(step)`` is asked after every jitted call; when it (or
    :data:`STOP_REQUESTED`) says stop, the run checkpoints and returns ``status="stopped"``;
    in a multi-process run, every process does as soon as one is asked to.
    """
    cfg.check(config)
    run = RunDir(workdir)
    command = command or shlex.join(["python", *sys.argv])
    if jax.process_index() != 0:  # process 0 holds the lock for every process
        return _train_and_evaluate(config, run, should_stop, command)
    try:
        with run.lock():
            return _train_and_evaluate(config, run, should_stop, command)
    except RunBusyError as err:
        raise TrainingError(str(err)) from None


def _train_and_evaluate(config, run: RunDir, should_stop, command: str) -> RunResult:
    start = time.perf_counter()
    chief = jax.process_index() == 0
    changes: list[str] = []
    if run.started():
        try:
            saved = run.read_config().to_dict()
        except RunDirError as err:
            raise cfg.ConfigError(f"cannot resume: {err}") from None
        changes = cfg.check_resume(saved, config)
    s = setup(config, run.path)
    if chief:  # only now: a refused or failing rerun leaves the run's config as it was
        run.write_config(config)
        if changes:
            logging.warning("resuming %s with changed %s", run.path, ", ".join(changes))
    plan, budgets, mesh = s.plan, s.budgets, s.mesh

    # The state and the data on the mesh.
    model = s.model
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    recal_graphdef = recalibration_graphdef(model) if s.recipe.bn_recalibration else None
    model.eval()
    eval_graphdef = nnx.split(model, nnx.Param, ...)[0]
    model.train()
    replicated = NamedSharding(mesh, P())
    state = put(
        {"step": jnp.int32(0), "params": params, "rest": rest, "opt_state": s.tx.init(params)},
        replicated,
    )
    images = labels = None
    test, validation = Split((), s.num_test), None
    if not s.stream:  # streamed batches come from the host, call by call
        d = s.dataset
        images, labels = put((d.train_images, d.train_labels), replicated)
        test = Split(
            put(eval_arrays(d.test_images, d.test_labels, s.eval_batch), replicated), test.count
        )
        if d.num_validation:
            arrays = eval_arrays(d.validation_images, d.validation_labels, s.eval_batch)
            validation = Split(put(arrays, replicated), d.num_validation)
    steps = make_steps(
        graphdef,
        eval_graphdef,
        s.tx,
        s.accounting,
        s.dataset,
        config,
        mesh,
        recal_graphdef,
        images=images,
        labels=labels,
    )

    ckpt = Checkpointer(run.checkpoints, max_to_keep=2)
    # The last two selected models: a corrupt newest one falls back to the one before.
    best_ckpt = Checkpointer(run.best, max_to_keep=2)
    meta: dict[str, Any] = {"best_error": None, "best_feasible": None, "authors": None}
    restored = ckpt.restore(state)
    if restored is not None:
        _, state, meta = restored
        meta.setdefault("authors", None)
    step = int(local(state["step"]))

    writer = MetricsWriter(run, enabled=chief, resume_step=step)
    progress = Progress(
        plan.total_steps, step, enabled=chief, desc=config.name, bar=config.train.progress
    )
    if restored is not None:
        progress.write(f"resuming {run.path} from step {step}")
    inspect = Inspector(s.accounting)
    evaluator = Evaluator(
        evaluate=steps.evaluate,
        recalibrate=_recalibration(s, steps, images, replicated),
        test=test,
        validation=validation,
        inspect=inspect,
        budgets=budgets,
        meta=meta,
        writer=writer,
        progress=progress,
        best=best_ckpt,
        steps_per_epoch=plan.steps_per_epoch,
        authors=config.train.eval_feasible_every > 0,
    )
    diagnostics = Diagnostics(inspect.names, budgets, inspect.tensors(state["params"])[1])

    # The loop.
    status, last_eval = "completed", None
    frozen = frozen_at(state)
    feasible_every = config.train.eval_feasible_every if budgets else 0
    last_feasible_eval = step
    batches = _Batches(s, replicated)
    try:
        while step < plan.total_steps:
            epoch = step // plan.steps_per_epoch
            call = config.train.steps_per_call
            if feasible_every:  # the authors' selection checks the budgets at call ends
                call = min(call, feasible_every)
            next_stop = min(plan.total_steps, (epoch + 1) * plan.steps_per_epoch, step + call)
            state, metrics = steps.train(state, batches(step, next_stop))
            host = {k: np.asarray(local(v)) for k, v in metrics.items()}
            bad = np.flatnonzero(~np.isfinite(host["loss"]))
            if bad.size:
                ckpt.wait()
                kept = ckpt.latest_step()
                message = (
                    f"loss is not finite at step {step + int(bad[0]) + 1}; training stopped. "
                    + (
                        f"The last good checkpoint (step {kept}) is kept in {ckpt.directory}"
                        if kept is not None
                        else "No checkpoint had been written yet"
                    )
                )
                if chief:
                    run.write_failure(step, message, name=config.name)
                raise TrainingError(message)
            step = next_stop
            diagnostics.add(host)
            means = {k: float(v.mean()) for k, v in host.items() if k != "bits"}
            writer.write("train", step, means)
            progress.update(step, {"loss": means["loss"], "acc": means["accuracy"]})
            if frozen is None and (frozen := frozen_at(state)) is not None:
                progress.write(
                    f"step {step}: every quantizer frozen at step {frozen}, within every "
                    "budget; the weights train on"
                )

            at_epoch_end = step % plan.steps_per_epoch == 0 or step == plan.total_steps
            if at_epoch_end and (step % plan.eval_every_steps == 0 or step == plan.total_steps):
                state, last_eval = evaluator(state, step, diagnostics=diagnostics.flush())
            elif feasible_every and step - last_feasible_eval >= feasible_every:
                # The authors evaluate whenever the budgets are met, to keep the best
                # feasible model; bits flip often near the budget, so epoch ends miss most.
                if optim.within_limits(inspect.sizes(state["params"]), budgets):
                    state, last_eval = evaluator(state, step, authors_only=True)
                    last_feasible_eval = step
            stop = any_process(
                STOP_REQUESTED.is_set() or (should_stop is not None and should_stop(step))
            )
            if (
                step == plan.total_steps
                or stop
                or (at_epoch_end and step % plan.checkpoint_every_steps == 0)
            ):
                # With several processes orbax ends each async save at a barrier named after
                # the step alone: a best/ save of this same step still in flight would meet
                # this one's barrier ("already ongoing") and fail the run. One at a time.
                best_ckpt.wait()
                ckpt.save(step, state, metadata=meta, force=True)
            if stop and step < plan.total_steps:
                status = "stopped"
                progress.write(f"stopping at step {step}: checkpoint saved in {ckpt.directory}")
                break
        if status == "completed" and (last_eval is None or last_eval["step"] != step):
            # Resumed a finished run (or ended on an authors' evaluation): evaluate again.
            state, last_eval = evaluator(state, step, save_best=False)
    finally:
        # Each closes even when one before it raises (a full disk fails them all): orbax's
        # save threads end, and the error raised is the last one, chained to the others.
        with contextlib.ExitStack() as closing:
            for close in (best_ckpt.close, ckpt.close, progress.close):
                closing.callback(close)

    if status == "stopped":
        writer.close()
        if chief:
            run.write_summary({"status": "stopped", "step": step, "name": config.name})
        return RunResult(  # nothing delivered yet: the delivery fields keep their defaults
            name=config.name,
            workdir=str(run.path),
            status="stopped",
            step=step,
            total_steps=s.plan.total_steps,
            steps_per_epoch=s.plan.steps_per_epoch,
            recipe=s.recipe.name,
            budgets=s.budgets,
            wall_time_s=time.perf_counter() - start,
        )

    # Delivery.
    with Checkpointer(run.final, max_to_keep=1, async_save=False) as final:
        final.save(
            step,
            {"params": state["params"], "rest": state["rest"]},
            metadata={"test_error": last_eval.get("test_error")},
            force=True,
        )
    final_sizes = inspect.sizes(state["params"])
    freezes = freeze_step(config, plan.steps_per_epoch) is not None and budgets
    final_error = last_eval.get("test_error")
    best, best_model = meta["best_feasible"], None
    selected = best is not None and not freezes
    if selected:
        best, best_model = _restore_best(run, state, best)
        meta["best_feasible"] = best
    if validation is not None:
        # Selection on the validation split: the test set sees the final model and the
        # selected one, once each.
        final_error = evaluator.test_error(state)
        if best_model is not None:
            best = {**best, "test_error": evaluator.test_error(best_model)}
            meta["best_feasible"] = best
    delivered = {"params": state["params"], "rest": state["rest"]}
    if not budgets:
        kind, delivered_error, feasible = "final", final_error, None
    elif freezes:
        feasible = frozen is not None and optim.within_limits(final_sizes, budgets)
        if frozen is not None and not feasible:  # a frozen θ cannot leave the budget
            raise TrainingError(f"{run.path}: frozen at step {frozen} but over budget")
        kind, delivered_error = ("final", final_error) if feasible else (None, None)
    elif best_model is not None:
        feasible, kind, delivered_error = True, "best_feasible", best.get("test_error")
        delivered = best_model
    elif selected and optim.within_limits(final_sizes, budgets):  # best/ lost: final, if it fits
        feasible, kind, delivered_error = True, "final", final_error
    else:
        feasible, kind, delivered_error = False, None, None
    # With budgets and no feasible model the report shows the final (over-budget) model.
    layer_report = optim.memory(
        nnx.merge(graphdef, *local((delivered["params"], delivered["rest"])))
    ).to_json(name=config.model.name)
    delivered_sizes = inspect.sizes(delivered["params"])
    authors = meta.get("authors") if (config.train.eval_feasible_every or not validation) else None
    result = RunResult(
        name=config.name,
        workdir=str(run.path),
        status=status,
        step=step,
        total_steps=plan.total_steps,
        steps_per_epoch=plan.steps_per_epoch,
        recipe=s.recipe.name,
        selection="validation" if validation is not None else "test (the authors')",
        final_test_error=final_error,
        final_validation_error=last_eval.get("validation_error"),
        best_test_error=meta["best_error"],
        best_feasible_test_error=(best or {}).get("test_error"),
        best_feasible_validation_error=(best or {}).get("validation_error"),
        best_feasible_step=(best or {}).get("step"),
        authors_test_error=(authors or {}).get("test_error"),
        authors_step=(authors or {}).get("step"),
        frozen_step=frozen,
        feasible=feasible,
        delivered=kind,
        delivered_test_error=delivered_error,
        delivered_sizes=delivered_sizes,
        budgets=budgets,
        final_sizes=final_sizes,
        verdicts=_verdicts(budgets, final_sizes, delivered_sizes if feasible else None),
        layers=layer_report["layers"],
        wall_time_s=time.perf_counter() - start,
    )
    writer.write("summary", step, {k: v for k, v in result.to_json().items() if k != "layers"})
    writer.close()
    if chief:
        _write_outputs(run, config, s, result, layer_report, command)
    if budgets and not result.feasible:
        logging.error(
            "NO %s of %s met every budget %s: there is no deliverable model",
            f"step after epoch {s.recipe.freeze_epoch:g}" if freezes else "evaluation",
            run.path,
            budgets,
        )
    return result


class _Batches:
    """``(step, stop) -> xs`` of one jitted training call: indices into the device-resident
    images, or the host's next streamed batches (this epoch's iterator, restarted at each
    epoch and at the right batch on resume)."""

    def __init__(self, s: Setup, replicated: NamedSharding):
        self.s, self.replicated = s, replicated
        self.shares = None
        self.sharding = NamedSharding(s.mesh, P(None, "data"))  # [steps, batch, ...]

    def __call__(self, step: int, stop: int):
        s, config = self.s, self.s.config
        epoch, offset = divmod(step, s.plan.steps_per_epoch)
        batch = config.train.batch_size
        if not s.stream:
            idx = epoch_indices(config.seed, epoch, s.num_train, s.plan.steps_per_epoch, batch)
            return put(idx[offset : offset + stop - step], self.replicated)
        if offset == 0 or self.shares is None:  # an epoch starts (or a run resumes)
            self.shares = s.dataset.batches(
                train=True, batch=batch, epoch=epoch, seed=config.seed
            ).iterate(start=offset)
        chunk = [next(self.shares) for _ in range(stop - step)]
        xs = np.stack([c[0] for c in chunk])
        ys = np.stack([c[1] for c in chunk])
        return put_local(self.sharding, xs), put_local(self.sharding, ys)


def _recalibration(s: Setup, steps: Steps, images, replicated):
    """``(params, rest) -> (rest, stat_error)`` on the run's recalibration batches, or None."""
    if steps.recalibrate is None:
        return None
    count, batch, seed = s.recipe.bn_recalibration, s.config.train.batch_size, s.config.seed
    if s.stream:
        sharding = NamedSharding(s.mesh, P("data"))

        def recal(params, rest):
            batches = s.dataset.recalibration_batches(batch=batch, count=count, seed=seed)
            return steps.recalibrate.over(
                params, rest, (put_local(sharding, x) for x, _ in batches)
            )

        return recal
    idx = put(recalibration_indices(seed, s.num_train, batch, count), replicated)
    return lambda params, rest: steps.recalibrate.indexed(params, rest, idx, images)


def _restore_best(run: RunDir, like, best: dict[str, Any]) -> tuple[dict | None, dict | None]:
    """``(record, {"params", "rest"})`` of the newest readable model in ``best/``, shaped like
    ``like``: the selected one, or the one selected before it when that is unreadable (said
    in a warning). ``(None, None)`` when ``best/`` holds nothing readable (deleted during
    the run, or every copy corrupt): the run still finishes, without that model."""
    try:
        with Checkpointer(run.best, max_to_keep=2, async_save=False) as saved:
            restored = saved.restore({"params": like["params"], "rest": like["rest"]})
    except CheckpointError as err:
        restored, why = None, str(err)
    else:
        why = f"{run.best} holds no checkpoint"
    if restored is None:
        logging.warning("the selected model (step %s) is lost: %s", best.get("step"), why)
        return None, None
    step, model, metadata = restored
    if step != best.get("step"):
        logging.warning(
            "the selected model of step %s is unreadable; delivering the one selected before "
            "it, of step %d",
            best.get("step"),
            step,
        )
        best = {**metadata, "step": step}
    return best, model


def _verdicts(budgets, final_sizes, delivered_sizes) -> dict[str, dict[str, Any]]:
    out = {}
    for name, limit in budgets.items():
        final = final_sizes[name]
        out[name] = {
            "limit_kb": limit,
            "final_kb": final,
            "final_met": final <= limit,
            "delivered_kb": None if delivered_sizes is None else delivered_sizes[name],
            "delivered_met": delivered_sizes is not None,
        }
    return out


def _write_outputs(
    run: RunDir, config, s: Setup, result: RunResult, layer_report: dict, command: str
) -> None:
    from mpdnn.plots import plot_bitwidths, plot_diagnostics

    summary = result.to_json()
    summary.pop("layers")
    summary["input_shape"] = [int(n) for n in s.dataset.image_shape]
    summary["num_classes"] = int(s.dataset.num_classes)
    summary["provenance"] = provenance(command, wall_time_s=result.wall_time_s, seed=config.seed)
    run.write_report(layer_report)
    plot_bitwidths(layer_report, run.bitwidths_plot, title=config.name)
    if result.budgets:
        evals = run.metrics("eval")
        if evals:
            plot_diagnostics(evals, run.diagnostics_plot, budgets=result.budgets, title=config.name)
    run.write_summary(summary)  # last: a summary says every other output is there
