"""``train_and_evaluate(config, workdir)``: memory-constrained training (docs/method.md §6–8, §13).

One run, from a :mod:`mpdnn.training.config` ``ConfigDict``:

1. data (:mod:`mpdnn.data`) kept on the accelerators, replicated on every device; each step
   gathers its batch by index and augments it on device (docs/method.md §8), so input never waits on
   the host; ``data.validation_size`` holds a validation split out of the training images;
2. the model (:data:`mpdnn.models.MODELS`), optionally started from a finished float run
   (``init.from_workdir``), quantized by the config's rules;
3. the optimizer (:func:`mpdnn.optim.budget_chain`): the budget transforms, weight decay on
   every parameter, NNabla's momentum SGD and the projection of θ into their boxes, with
   the options of ``budget.recipe``: the authors' (``"paper"``: the ±d clip of θ gradients
   while a budget is active) or ours (``"mpdnn"``: SGD on log θ, a margin under each limit,
   every activation tensor over the act-max limit penalised, and θ frozen at the first
   feasible step after ``budget.freeze_epoch``, after which the weights train on);
4. data parallel over a ``Mesh`` of every device (of every host after
   ``jax.distributed.initialize``): the batch is sharded on the ``data`` axis, parameters
   and optimizer state are replicated; the same code runs on 1 device or many;
5. ``train.steps_per_call`` steps per jitted ``lax.scan``; evaluation (BatchNorm statistics
   re-estimated first when ``train.bn_recalibration`` asks), checkpoint (orbax, automatic
   resume from the latest readable one) and logging at epoch boundaries.

At the end ``workdir`` holds ``summary.json`` (final and selected errors, the verdict of
every budget, provenance), ``report.json`` (per-layer bits and memory of the delivered
model), ``bitwidths.png``, ``diagnostics.png`` (the budget search: sizes, steps within
budget, bit changes, bits per tensor), ``metrics.jsonl``, TensorBoard events,
``checkpoints/`` (the latest states), ``best/`` (the selected evaluation that met every
budget: on the validation split when there is one, else on the test set, the authors' way)
and ``final/`` (the final parameters, for float-net init of other runs).

The delivered model meets every budget or the run says loudly that none did (docs/method.md §6): the
final model when θ froze within every budget, else the selected one; a run with budgets
and no feasible model returns ``feasible=False`` and logs an error, and
``python -m mpdnn.train`` exits with status 3.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import shlex
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mpdnn import data as mdata
from mpdnn import optim
from mpdnn.models import build, load_torchvision
from mpdnn.nn import LogitScale, quantize_model, set_compute_dtype
from mpdnn.provenance import provenance
from mpdnn.report import report
from mpdnn.training import config as cfg
from mpdnn.training.checkpoint import Checkpointer, CheckpointError
from mpdnn.training.metrics import MetricsWriter, Progress
from mpdnn.training.streaming import StreamingData, padded, put_local, streaming_data

log = logging.getLogger("mpdnn.training")

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
    selection: str  # "validation" or "test (the authors')"
    final_test_error: float | None
    final_validation_error: float | None
    best_test_error: float | None  # lowest test error of any evaluation, budgets ignored
    best_feasible_test_error: float | None  # the selected evaluation that met every budget
    best_feasible_validation_error: float | None
    best_feasible_step: int | None
    authors_test_error: float | None  # the authors' selection, labelled as theirs
    authors_step: int | None
    frozen_step: int | None  # θ frozen at this step's values (budget.freeze_epoch)
    feasible: bool | None  # None: no budget
    # "final" (no budget, or θ frozen within every budget), "best_feasible" or None (no
    # model met every budget)
    delivered: str | None
    delivered_test_error: float | None
    delivered_sizes: dict[str, float]  # of the delivered model (final when none)
    budgets: dict[str, float]
    final_sizes: dict[str, float]
    verdicts: dict[str, dict[str, Any]]
    layers: list[dict[str, Any]]
    wall_time_s: float

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- setup


def load_data(config: ml_collections.ConfigDict) -> mdata.ArrayDataset:
    """The in-memory dataset of ``config``, with its validation split held out when
    ``data.validation_size`` (or ``data.train_size``) asks for one."""
    d = config.data
    extra = {}
    if d.name == "synthetic":
        extra = dict(
            image_shape=tuple(d.synthetic_shape),
            num_train=d.synthetic_train,
            num_test=d.synthetic_test,
            num_classes=d.get("synthetic_classes", 10),
        )
    dataset = mdata.load_dataset(
        d.name,
        data_dir=d.dir,
        cache_dir=d.cache_dir,
        max_per_class=d.max_per_class or None,
        seed=config.seed,
        **extra,
    )
    return mdata.holdout(
        dataset, int(d.get("validation_size", 0)), train_size=int(d.get("train_size", 0))
    )


def _resolve(path: str, workdir: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else workdir.parent / p


def build_model(config: ml_collections.ConfigDict, dataset: mdata.ArrayDataset, workdir: Path):
    """The float model, loaded from ``init.from_workdir`` if set, quantized by rules and,
    for pow2 runs, wrapped in :class:`~mpdnn.nn.LogitScale` (docs/method.md §6)."""
    kwargs: dict[str, Any] = {"input_shape": dataset.image_shape}
    if config.model.widths is not None:
        kwargs["widths"] = tuple(config.model.widths)
    try:
        model = build(
            config.model.name,
            rngs=nnx.Rngs(config.seed),
            num_classes=dataset.num_classes,
            **kwargs,
        )
    except (TypeError, ValueError) as err:
        raise cfg.ConfigError(f"model {config.model.name!r}: {err}") from None
    if config.init.from_workdir:
        source = _resolve(config.init.from_workdir, workdir)
        load_final_model(model, source)
    if config.init.get("torchvision"):
        # torchvision's float weights (ImageNet nets), before quantization so that the
        # weight quantizers start from them (docs/method.md §4's float-net init).
        try:
            load_torchvision(model, Path(config.init.torchvision).expanduser())
        except (OSError, ImportError, TypeError, ValueError) as err:
            raise cfg.ConfigError(f"init.torchvision: {err}") from None
    quantize_model(model, cfg.rules(config))
    if config.model.get("compute_dtype") not in (None, "float32"):
        set_compute_dtype(model, jnp.dtype(config.model.compute_dtype))
    if cfg.logit_scale(config):
        model = LogitScale(model)
    return model


def load_final_model(model: nnx.Module, run_dir: Path) -> None:
    """Load a finished run's final float parameters and statistics into ``model``."""
    directory = run_dir / "final"
    if not directory.is_dir():
        raise cfg.ConfigError(
            f"init.from_workdir: no final model in {directory}; train that run first"
        )
    _, params, rest = nnx.split(model, nnx.Param, ...)
    target = {"params": params, "rest": rest}
    with Checkpointer(directory, max_to_keep=1, async_save=False) as ckpt:
        try:
            restored = ckpt.restore(target)
        except CheckpointError as err:
            raise cfg.ConfigError(f"init.from_workdir: {err}") from None
    if restored is None:
        raise cfg.ConfigError(f"init.from_workdir: {directory} holds no checkpoint")
    nnx.update(model, restored[1]["params"], restored[1]["rest"])


def make_mesh(num_devices: int) -> Mesh:
    devices = jax.devices()
    if num_devices:
        if num_devices > len(devices):
            raise cfg.ConfigError(
                f"train.num_devices={num_devices} but only {len(devices)} devices exist"
            )
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), ("data",))


def budget_terms(
    config: ml_collections.ConfigDict, budgets: dict[str, float], recipe: cfg.Recipe
) -> list[optim.Budget]:
    """The :class:`~mpdnn.optim.Budget` s of a run: its limits, λ and the recipe's margin; an
    act-max budget with ``max_gradient="all"`` becomes one on every activation tensor
    (``"act_kb"``), which has the same feasible set."""
    terms = []
    for size, limit in budgets.items():
        name = "act_kb" if size == "act_max_kb" and recipe.max_gradient == "all" else size
        terms.append(optim.Budget(name, limit, cfg.strength(config, size, limit), recipe.margin))
    return terms


def freeze_step(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int | None:
    """The step from which θ freeze at the first feasible update (None: never). The
    recipe's own epoch moves to the middle of a run that ``train.max_steps`` ends before it
    (a smoke run would never freeze, so never deliver); an epoch set in the config stays."""
    recipe = cfg.recipe(config)
    if recipe.freeze_epoch is None:
        return None
    step = int(round(recipe.freeze_epoch * steps_per_epoch))
    total = cfg.schedule_steps(config, steps_per_epoch)
    if config.budget.get("freeze_epoch") is None and step >= total:
        step = total // 2
    return step


def make_optimizer(
    config: ml_collections.ConfigDict,
    accounting: optim.Accounting,
    budgets: dict[str, float],
    steps_per_epoch: int,
) -> optax.GradientTransformation:
    """The run's update (:func:`mpdnn.optim.budget_chain`): the authors' order (docs/method.md §6),
    budget term → weight decay → quantizer-gradient clipping (while a budget is active) →
    NNabla momentum SGD → projection of θ, with the recipe's options (docs/method.md §13)."""
    o = config.optim
    recipe = cfg.recipe(config)
    boundaries = {int(e) * steps_per_epoch: o.decay_factor for e in o.decay_epochs if int(e) > 0}
    lr = optax.piecewise_constant_schedule(o.learning_rate, boundaries)
    return optim.budget_chain(
        accounting,
        budget_terms(config, budgets, recipe),
        lr,
        method=config.budget.method,
        momentum=o.momentum,
        weight_decay=o.weight_decay,
        margin=config.budget.projection_margin,
        dual_learning_rate=config.budget.dual_learning_rate,
        clip=recipe.clip_quantizer_gradients,
        quant_learning_rate_scale=recipe.quant_lr_scale,
        quant_momentum=recipe.quant_momentum,
        quant_update=recipe.quant_update,
        freeze_step=freeze_step(config, steps_per_epoch),
    )


def check_budgets(budgets: dict[str, float], accounting: optim.Accounting) -> None:
    """A budget below the smallest model possible can never be met: say so up front."""
    smallest = accounting.min_sizes()
    for name, limit in budgets.items():
        if limit < smallest[name]:
            raise cfg.ConfigError(
                f"budget.{name}={limit:g} KB is below the smallest model possible "
                f"({smallest[name]:.3f} KB with every learned quantizer at its minimum bits)"
            )


def _put(tree, sharding: NamedSharding):
    """Place host or device arrays with ``sharding`` (works with many processes too)."""
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def one(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(one, tree)


def _local(tree):
    """A replicated global array's local copy (host-side reports on any process)."""
    return jax.tree.map(lambda x: x.addressable_data(0) if isinstance(x, jax.Array) else x, tree)


def _any_process(flag: bool) -> bool:
    """Whether ``flag`` is set on any process. A stop asked of one process only (a SIGTERM
    that reaches one host first, ``should_stop``) must stop them all after the same step: a
    process that went on would wait forever in the next step's collectives for the others,
    which wait in the checkpoint's."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


# ----------------------------------------------------------------------------- steps


def make_steps(
    graphdef,
    eval_graphdef,
    tx: optax.GradientTransformation,
    accounting: optim.Accounting,
    dataset: mdata.ArrayDataset | StreamingData,
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    recal_graphdef=None,
):
    """The jitted training chunk (``lax.scan`` over steps), the jitted evaluation and, with
    ``recal_graphdef`` (:func:`recalibration_graphdef`), a :class:`Recalibrator`.

    Device-resident data: a chunk is ``(state, idx [k, B], images, labels)`` and gathers,
    normalises and augments on device. Streamed data (:mod:`mpdnn.training.streaming`): a
    chunk is ``(state, xs [k, B, H, W, C], ys [k, B])`` of host-prepared batches, and the
    evaluation reads the test split batch by batch. Every step's metrics hold the loss, the
    accuracy, the sizes and, when some bits are learned, every tensor's bits."""
    batch = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())
    stream = isinstance(dataset, StreamingData)
    track_bits = any(q.learns_bits for q in accounting.quantizers)
    # Streamed batches arrive normalised (ImageNet mean/std) and augmented on the host.
    scale, offset = (1.0, 0.0) if stream else (dataset.pixel_scale, dataset.pixel_offset)
    augment = config.data.augment
    aug_key = jax.random.fold_in(jax.random.key(config.seed), 1)

    def loss_fn(params, rest, x, y):
        model = nnx.merge(graphdef, params, rest, copy=True)
        logits = model(x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        _, _, new_rest = nnx.split(model, nnx.Param, ...)
        return loss, (logits, new_rest)

    def step(state, idx, images, labels):
        x = mdata.normalize(images[idx], scale, offset)
        y = labels[idx]
        if augment:
            key = jax.random.fold_in(aug_key, state["step"])
            x = mdata.random_crop_flip(key, x, pad=config.data.pad, flip=config.data.flip)
        return update(state, x, y)

    def update(state, x, y):
        x = jax.lax.with_sharding_constraint(x, batch)
        y = jax.lax.with_sharding_constraint(y, batch)
        params = state["params"]
        (loss, (logits, rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, state["rest"], x, y
        )
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        bits = accounting.tensor_bits(params)
        metrics = {
            "loss": loss,
            "accuracy": jnp.mean(jnp.argmax(logits, -1) == y),
            **accounting.sizes_of_bits(bits)._asdict(),
        }
        if track_bits:  # per-tensor bits of every step: the bit changes of the diagnostics
            metrics["bits"] = bits
        new_state = {
            "step": state["step"] + 1,
            "params": optax.apply_updates(params, updates),
            "rest": rest,
            "opt_state": opt_state,
        }
        return new_state, metrics

    @partial(jax.jit, donate_argnums=0, out_shardings=replicated)
    def scanned_chunk(state, idx, images, labels):
        return jax.lax.scan(lambda s, i: step(s, i, images, labels), state, idx)

    one_step = jax.jit(step, donate_argnums=0, out_shardings=replicated)

    def looped_chunk(state, idx, images, labels):
        metrics = []
        for i in range(idx.shape[0]):
            state, m = one_step(state, idx[i], images, labels)
            metrics.append(m)
        return state, jax.tree.map(lambda *xs: jnp.stack(xs), *metrics)

    @partial(jax.jit, donate_argnums=0, out_shardings=replicated)
    def scanned_stream_chunk(state, xs, ys):
        return jax.lax.scan(lambda s, b: update(s, *b), state, (xs, ys))

    one_update = jax.jit(update, donate_argnums=0, out_shardings=replicated)

    def looped_stream_chunk(state, xs, ys):
        metrics = []
        for i in range(xs.shape[0]):
            state, m = one_update(state, xs[i], ys[i])
            metrics.append(m)
        return state, jax.tree.map(lambda *v: jnp.stack(v), *metrics)

    # XLA:CPU runs convolutions inside a while loop (lax.scan) far slower than outside one
    # (measured here: a ResNet-20 gradient at batch 64, 0.71 s plain, 10.5 s per step
    # scanned), so on CPU a chunk is a Python loop of jitted steps; accelerators scan.
    scan = config.train.scan
    if scan is None:
        scan = mesh.devices.flat[0].platform != "cpu"
    if stream:
        train_chunk = scanned_stream_chunk if scan else looped_stream_chunk
    else:
        train_chunk = scanned_chunk if scan else looped_chunk

    def eval_batch(params, rest, x, y, m):
        """Wrong predictions and summed cross-entropy of one masked test batch."""
        x = jax.lax.with_sharding_constraint(mdata.normalize(x, scale, offset), batch)
        logits = nnx.merge(eval_graphdef, params, rest, copy=True)(x)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return jnp.sum((jnp.argmax(logits, -1) != y) & m), jnp.sum(ce * m)

    @partial(jax.jit, out_shardings=replicated)
    def scanned_eval(params, rest, images, labels, mask):
        def one(carry, xs):
            wrong, ce = eval_batch(params, rest, *xs)
            return (carry[0] + wrong, carry[1] + ce), None

        zero = (jnp.int32(0), jnp.float32(0.0))
        return jax.lax.scan(one, zero, (images, labels, mask))[0]

    one_eval = jax.jit(eval_batch, out_shardings=replicated)

    def looped_eval(params, rest, images, labels, mask):
        results = [one_eval(params, rest, images[i], labels[i], mask[i]) for i in range(len(mask))]
        return sum(r[0] for r in results), sum(r[1] for r in results)

    evaluate = scanned_eval if scan else looped_eval
    if stream:
        evaluate = partial(_streamed_eval, one_eval, dataset, config, mesh)
    recalibrate = None
    if recal_graphdef is not None:
        recalibrate = Recalibrator(graphdef, recal_graphdef, scale, offset, batch, scan)
    return train_chunk, evaluate, recalibrate


def recalibration_graphdef(model: nnx.Module):
    """The graph of ``model`` with every BatchNorm's momentum at 0 (for
    :class:`Recalibrator`); ``model`` itself is left as it was."""
    bns = [m for _, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.momentum = 0.0
    graphdef = nnx.split(model, nnx.Param, ...)[0]
    for bn, momentum in zip(bns, momenta, strict=True):
        bn.momentum = momentum
    return graphdef


class Recalibrator:
    """BatchNorm's running statistics re-estimated on un-augmented training batches, in
    train mode: ``(params, rest, ...) -> (rest, stat_error)``.

    Each batch runs with every BatchNorm's momentum at 0 (``recal_graphdef``), so its
    running statistics become exactly that batch's (mean and biased variance over batch and
    space, what BatchNorm normalises with); the new running statistics are their average
    over the batches, and every other leaf of ``rest`` is returned unchanged. ``stat_error``
    says how far the old statistics were from the new ones: the mean over BatchNorms of the
    mean over channels of ``|μ_old − μ| / sqrt(σ² + ε)`` and of
    ``|log((σ²_old + ε) / (σ² + ε))|``.

    :meth:`indexed` takes device-resident images and ``[n, B]`` indices (scanned on
    accelerators); :meth:`over` takes already normalised device batches (streamed data).
    """

    def __init__(self, graphdef, recal_graphdef, scale, offset, batch: NamedSharding, scan):
        self.scan = scan

        def batch_stats(params, rest, x):
            x = jax.lax.with_sharding_constraint(mdata.normalize(x, scale, offset), batch)
            model = nnx.merge(recal_graphdef, params, rest, copy=True)
            model(x)
            return nnx.state(model, nnx.BatchStat)

        def finish(params, rest, total, n: int):
            model = nnx.merge(graphdef, params, rest, copy=True)
            bns = [m for _, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)]
            old = [(bn.mean[...], bn.var[...]) for bn in bns]
            nnx.update(model, jax.tree.map(lambda t: t / n, total))
            errors = [jnp.zeros([2])]
            for bn, (mu_old, var_old) in zip(bns, old, strict=True):
                eps = bn.epsilon
                mu, var = bn.mean[...], bn.var[...]
                shift = jnp.mean(jnp.abs(mu_old - mu) / jnp.sqrt(var + eps))
                ratio = jnp.mean(jnp.abs(jnp.log((var_old + eps) / (var + eps))))
                errors.append(jnp.stack([shift, ratio]))
            error = jnp.sum(jnp.stack(errors), axis=0) / max(len(bns), 1)
            return nnx.split(model, nnx.Param, ...)[2], error

        @jax.jit
        def scanned(params, rest, idx, images):
            def one(total, i):
                return jax.tree.map(jnp.add, total, batch_stats(params, rest, images[i])), None

            first = batch_stats(params, rest, images[idx[0]])
            total = jax.lax.scan(one, first, idx[1:])[0]
            return finish(params, rest, total, idx.shape[0])

        self._scanned = scanned
        self._stats = jax.jit(batch_stats)
        self._indexed_stats = jax.jit(lambda p, r, i, images: batch_stats(p, r, images[i]))
        self._finish = jax.jit(finish, static_argnums=3)

    def _accumulate(self, params, rest, stats):
        total, n = None, 0
        for one in stats:
            total = one if total is None else jax.tree.map(jnp.add, total, one)
            n += 1
        return self._finish(params, rest, total, n)

    def indexed(self, params, rest, idx, images):
        if self.scan:
            return self._scanned(params, rest, idx, images)
        stats = (self._indexed_stats(params, rest, i, images) for i in idx)
        return self._accumulate(params, rest, stats)

    def over(self, params, rest, batches):
        return self._accumulate(params, rest, (self._stats(params, rest, x) for x in batches))


def _streamed_eval(one_eval, data: StreamingData, config, mesh: Mesh, params, rest):
    """Wrong predictions and summed cross-entropy over the streamed test split. Every process
    runs the same number of global batches (a short or absent last share is padded and
    masked), so the collectives line up."""
    sharding = NamedSharding(mesh, P("data"))
    global_batch = math.ceil(config.train.eval_batch_size / mesh.size) * mesh.size
    batches = data.batches(train=False, batch=global_batch, epoch=0, seed=config.seed)
    local = batches.local_batch_size
    shares = iter(batches)
    wrong, ce = 0, 0.0
    for _ in range(len(batches)):
        share = next(shares, None)
        if share is None:
            share = (np.zeros((0, *data.image_shape), np.float32), np.zeros(0, np.int32))
        x, y, m = padded(*share, local)
        w, c = one_eval(params, rest, *(put_local(sharding, a) for a in (x, y, m)))
        wrong, ce = wrong + w, ce + c
    return wrong, ce


@functools.lru_cache(maxsize=2)
def epoch_indices(seed: int, epoch: int, num_train: int, steps: int, batch: int) -> np.ndarray:
    """The shuffled ``[steps, batch]`` example indices of one epoch: a function of (seed,
    epoch) only, identical on every process, so a resumed run sees the same batches.
    Cached: every jitted call of the epoch slices the same permutation (read-only)."""
    order = np.random.default_rng([seed, epoch]).permutation(num_train)
    out = order[: steps * batch].reshape(steps, batch).astype(np.int32)
    out.flags.writeable = False
    return out


def _eval_arrays(images: np.ndarray, labels: np.ndarray, eval_batch: int):
    """An evaluation split padded to whole batches, shaped ``[batches, batch, ...]``, and
    its mask."""
    n = len(labels)
    batches = math.ceil(n / eval_batch)
    pad = batches * eval_batch - n
    shape = images.shape[1:]
    images = np.concatenate([images, np.zeros((pad, *shape), np.uint8)])
    labels = np.concatenate([labels, np.zeros(pad, np.int32)])
    mask = np.arange(batches * eval_batch) < n
    batched = (batches, eval_batch)
    return images.reshape(*batched, *shape), labels.reshape(batched), mask.reshape(batched)


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


def make_inspect(accounting: optim.Accounting):
    """A jitted ``params -> (sizes, {tensor: bits}, {tensor: KB})`` for logging (eager, the
    bitwidth graph would compile op by op at every evaluation); ``ratios=True`` adds
    :func:`_step_ratios`."""
    from mpdnn.optim.accounting import KB

    names = [f"{q.site}.{q.tensor}" for q in accounting.quantizers]
    numels = [q.numel for q in accounting.quantizers]

    @jax.jit
    def inspect(params):
        bits = accounting.tensor_bits(params)
        sizes = accounting.sizes_of_bits(bits)._asdict()
        return sizes, bits, _step_ratios(accounting, params)

    def host(params, *, per_tensor: bool = False, ratios: bool = False):
        sizes, bits, q_over_d = inspect(_local(params))
        sizes = {k: float(v) for k, v in sizes.items()}
        if not per_tensor:
            return sizes
        bits = [float(b) for b in np.asarray(bits)]
        kb = {n: m * b / KB for n, m, b in zip(names, numels, bits, strict=True)}
        out = (sizes, dict(zip(names, bits, strict=True)), kb)
        if ratios:
            out += ({k: float(v) for k, v in q_over_d.items()},)
        return out

    host.names = names
    return host


def _feasible(sizes: dict[str, float], budgets: dict[str, float]) -> bool:
    """Whether ``sizes`` meet every budget at its limit (margins play no part here)."""
    return all(sizes[k] <= v for k, v in budgets.items())


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
    workdir = Path(workdir)
    with _workdir_lock(workdir):
        command = command or shlex.join(["python", *sys.argv])
        return _train_and_evaluate(config, workdir, should_stop, command)


@contextlib.contextmanager
def _workdir_lock(workdir: Path):
    """One run per workdir: process 0 holds an exclusive ``flock`` on ``<workdir>/.lock``
    while it runs (two runs would overwrite each other's checkpoints). The OS drops the lock
    when the process dies, even by SIGKILL, so it never goes stale."""
    if jax.process_index() != 0:
        yield
        return
    import fcntl

    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise TrainingError(
                f"another run is using {workdir} (it holds {workdir / '.lock'}); wait for it "
                "to finish or choose another --workdir"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _train_and_evaluate(config, workdir: Path, should_stop, command: str) -> RunResult:
    start = time.perf_counter()
    chief = jax.process_index() == 0
    if chief:
        (workdir / "config.json").write_text(config.to_json(indent=1) + "\n")
    recipe = cfg.recipe(config)

    if config.data.name == "imagenet":
        dataset = streaming_data(config)
    else:
        dataset = load_data(config)
        if config.data.get("stream"):
            dataset = streaming_data(config, dataset)
    stream = isinstance(dataset, StreamingData)
    if stream and (config.data.validation_size or config.data.train_size):
        raise cfg.ConfigError(
            "data.validation_size and data.train_size are not supported for streamed data "
            "yet: hold a validation split out of the tfds data instead"
        )
    num_train = dataset.num_train if stream else len(dataset.train_labels)
    num_test = dataset.num_test if stream else len(dataset.test_labels)
    plan = cfg.schedule(config, num_train)
    mesh = make_mesh(config.train.num_devices)
    if config.train.batch_size % mesh.size:
        raise cfg.ConfigError(
            f"train.batch_size={config.train.batch_size} must be a multiple of the "
            f"{mesh.size} devices"
        )
    eval_batch = math.ceil(config.train.eval_batch_size / mesh.size) * mesh.size

    model = build_model(config, dataset, workdir)
    accounting = optim.Accounting.from_model(model)
    budgets = cfg.budgets(config)
    check_budgets(budgets, accounting)
    tx = make_optimizer(config, accounting, budgets, plan.steps_per_epoch)

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    recal_graphdef = recalibration_graphdef(model) if recipe.bn_recalibration else None
    model.eval()
    eval_graphdef = nnx.split(model, nnx.Param, ...)[0]
    model.train()
    replicated = NamedSharding(mesh, P())
    state = _put(
        {"step": jnp.int32(0), "params": params, "rest": rest, "opt_state": tx.init(params)},
        replicated,
    )
    validation = None
    if stream:  # batches come from the host, call by call
        images = labels = None
        test = ()
    else:
        images, labels = _put((dataset.train_images, dataset.train_labels), replicated)
        test = _put(_eval_arrays(dataset.test_images, dataset.test_labels, eval_batch), replicated)
        if dataset.num_validation:
            validation = _put(
                _eval_arrays(dataset.validation_images, dataset.validation_labels, eval_batch),
                replicated,
            )
    train_chunk, evaluate, recalibrate = make_steps(
        graphdef, eval_graphdef, tx, accounting, dataset, config, mesh, recal_graphdef
    )
    recal = None  # (params, rest) -> (rest, stat_error)
    if recalibrate is not None and stream:
        batch_sharding = NamedSharding(mesh, P("data"))
        recal_batches = partial(
            dataset.recalibration_batches,
            batch=config.train.batch_size,
            count=recipe.bn_recalibration,
            seed=config.seed,
        )

        def recal(params, rest):
            batches = (put_local(batch_sharding, x) for x, _ in recal_batches())
            return recalibrate.over(params, rest, batches)

    elif recalibrate is not None:
        recal_idx = _put(
            recalibration_indices(
                config.seed, num_train, config.train.batch_size, recipe.bn_recalibration
            ),
            replicated,
        )
        recal = partial(recalibrate.indexed, idx=recal_idx, images=images)

    inspect = make_inspect(accounting)
    ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=2)
    best_ckpt = Checkpointer(workdir / "best", max_to_keep=1)
    meta: dict[str, Any] = {"best_error": None, "best_feasible": None, "authors": None}
    restored = ckpt.restore(state)
    if restored is not None:
        _, state, meta = restored
        meta.setdefault("authors", None)
        if chief:
            print(f"resuming {workdir} from step {int(_local(state['step']))}", file=sys.stderr)
    step = int(_local(state["step"]))

    writer = MetricsWriter(workdir, enabled=chief)
    progress = Progress(
        plan.total_steps, step, enabled=chief, desc=config.name, bar=config.train.progress
    )
    evaluator = Evaluator(
        evaluate=evaluate,
        recalibrate=recal,
        test=(test, num_test),
        validation=None if validation is None else (validation, dataset.num_validation),
        authors=config.train.eval_feasible_every > 0,
        inspect=inspect,
        budgets=budgets,
        meta=meta,
        writer=writer,
        progress=progress,
        best_ckpt=best_ckpt,
        steps_per_epoch=plan.steps_per_epoch,
    )
    diagnostics = Diagnostics(inspect.names, budgets, inspect(state["params"], per_tensor=True)[1])
    status = "completed"
    last_eval = None
    frozen_at = _frozen_at(state)
    feasible_every = config.train.eval_feasible_every if budgets else 0
    last_feasible_eval = step

    shares = None  # streamed data: this epoch's batches
    stream_sharding = NamedSharding(mesh, P(None, "data"))  # [steps, batch, ...]
    try:
        while step < plan.total_steps:
            epoch, offset = divmod(step, plan.steps_per_epoch)
            call = config.train.steps_per_call
            if feasible_every:  # the authors' selection checks the budgets at call ends
                call = min(call, feasible_every)
            next_stop = min(plan.total_steps, (epoch + 1) * plan.steps_per_epoch, step + call)
            if stream:
                if offset == 0 or shares is None:  # an epoch starts (or a run resumes)
                    shares = dataset.batches(
                        train=True, batch=config.train.batch_size, epoch=epoch, seed=config.seed
                    ).iterate(start=offset)
                chunk = [next(shares) for _ in range(next_stop - step)]
                xs = np.stack([c[0] for c in chunk])
                ys = np.stack([c[1] for c in chunk])
                state, metrics = train_chunk(
                    state, put_local(stream_sharding, xs), put_local(stream_sharding, ys)
                )
            else:
                idx = epoch_indices(
                    config.seed,
                    epoch,
                    num_train,
                    plan.steps_per_epoch,
                    config.train.batch_size,
                )[offset : offset + next_stop - step]
                state, metrics = train_chunk(state, _put(idx, replicated), images, labels)
            host = {k: np.asarray(_local(v)) for k, v in metrics.items()}
            bad = np.flatnonzero(~np.isfinite(host["loss"]))
            if bad.size:
                ckpt.wait()
                kept = ckpt.latest_step()
                raise TrainingError(
                    f"loss is not finite at step {step + int(bad[0]) + 1}; training stopped. "
                    + (
                        f"The last good checkpoint (step {kept}) is kept in {ckpt.directory}"
                        if kept is not None
                        else "No checkpoint had been written yet"
                    )
                )
            step = next_stop
            diagnostics.add(host)
            means = {k: float(v.mean()) for k, v in host.items() if k != "bits"}
            writer.write("train", step, means)
            progress.update(step, {"loss": means["loss"], "acc": means["accuracy"]})
            if frozen_at is None and (frozen_at := _frozen_at(state)) is not None:
                progress.write(
                    f"step {step}: every quantizer frozen at step {frozen_at}, within every "
                    "budget; the weights train on"
                )

            at_epoch_end = step % plan.steps_per_epoch == 0 or step == plan.total_steps
            if at_epoch_end and (step % plan.eval_every_steps == 0 or step == plan.total_steps):
                state, last_eval = evaluator(state, step, diagnostics=diagnostics.flush())
            elif feasible_every and step - last_feasible_eval >= feasible_every:
                # The authors evaluate whenever the budgets are met, to keep the best
                # feasible model; bits flip often near the budget, so epoch ends miss most.
                if _feasible(inspect(state["params"]), budgets):
                    state, last_eval = evaluator(state, step, authors_only=True)
                    last_feasible_eval = step
            stop = _any_process(
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
        progress.close()
        ckpt.close()
        best_ckpt.close()

    if status == "completed":
        with Checkpointer(workdir / "final", max_to_keep=1, async_save=False) as final:
            final.save(
                step,
                {"params": state["params"], "rest": state["rest"]},
                metadata={"test_error": last_eval.get("test_error")},
                force=True,
            )
    final_sizes = inspect(state["params"])
    freezes = freeze_step(config, plan.steps_per_epoch) is not None and budgets
    final_error = last_eval.get("test_error") if last_eval else None
    best = meta["best_feasible"]
    if validation is not None and status == "completed":
        # Selection on the validation split: the test set sees the final model and the
        # selected one, once each.
        final_error = evaluator.test_error(state)
        if best is not None:
            with Checkpointer(workdir / "best", max_to_keep=1, async_save=False) as saved:
                chosen = saved.restore({"params": state["params"], "rest": state["rest"]})[1]
            best = {**best, "test_error": evaluator.test_error(chosen)}
            meta["best_feasible"] = best
    # The delivered model: the frozen final one, or the best evaluation that met every
    # budget, or the final one when there is no budget. With budgets and no feasible model
    # nothing is delivered, and the report shows the final (over-budget) model, marked so.
    delivered = {"params": state["params"], "rest": state["rest"]}
    if not budgets:
        kind, delivered_error, feasible = "final", final_error, None
    elif freezes:
        feasible = frozen_at is not None and _feasible(final_sizes, budgets)
        if frozen_at is not None and not feasible:  # a frozen θ cannot leave the budget
            raise TrainingError(f"{workdir}: frozen at step {frozen_at} but over budget")
        kind, delivered_error = ("final", final_error) if feasible else (None, None)
    else:
        feasible = best is not None
        kind = "best_feasible" if feasible else None
        delivered_error = best.get("test_error") if feasible else None
        if feasible:
            with Checkpointer(workdir / "best", max_to_keep=1, async_save=False) as saved:
                delivered = saved.restore(delivered)[1]
    layer_report = report(
        nnx.merge(graphdef, *_local((delivered["params"], delivered["rest"]))),
        name=config.model.name,
    )
    delivered_sizes = inspect(delivered["params"])
    authors = meta.get("authors") if (config.train.eval_feasible_every or not validation) else None
    result = RunResult(
        name=config.name,
        workdir=str(workdir),
        status=status,
        step=step,
        total_steps=plan.total_steps,
        steps_per_epoch=plan.steps_per_epoch,
        recipe=recipe.name,
        selection="validation" if validation is not None else "test (the authors')",
        final_test_error=final_error,
        final_validation_error=last_eval.get("validation_error") if last_eval else None,
        best_test_error=meta["best_error"],
        best_feasible_test_error=(best or {}).get("test_error"),
        best_feasible_validation_error=(best or {}).get("validation_error"),
        best_feasible_step=(best or {}).get("step"),
        authors_test_error=(authors or {}).get("test_error"),
        authors_step=(authors or {}).get("step"),
        frozen_step=frozen_at,
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
    if chief and status == "completed":
        _write_outputs(workdir, config, result, layer_report, command)
    if budgets and status == "completed" and not result.feasible:
        log.error(
            "NO %s of %s met every budget %s: there is no deliverable model",
            f"step after epoch {recipe.freeze_epoch:g}" if freezes else "evaluation",
            workdir,
            budgets,
        )
    return result


def _frozen_at(state) -> int | None:
    """The step at whose parameters every quantizer θ froze, or None."""
    frozen = optim.freeze_values(state["opt_state"])
    if frozen is None:
        return None
    at = int(np.asarray(_local(frozen.frozen_at)))
    return at if at >= 0 else None


def recalibration_indices(seed: int, num_train: int, batch: int, batches: int) -> np.ndarray:
    """``[n, batch]`` training-image indices for BatchNorm recalibration: the same ones at
    every recalibration of a run (a fixed function of the seed, so resumes agree), at most
    the whole training set (``n ≤ num_train // batch``)."""
    n = max(1, min(batches, num_train // batch))
    order = np.random.default_rng([seed, 0xB2]).permutation(num_train)
    return order[: n * batch].reshape(n, batch).astype(np.int32)


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


class Evaluator:
    """The evaluations of one run: BatchNorm recalibrated first, sizes and feasibility, the
    selection metric (validation error, else test error: the authors' way), the best
    feasible model kept in ``best/``, the authors' selection tracked, one record logged.

    ``meta`` (checkpointed with the state) holds ``best_error`` (lowest test error, budgets
    ignored), ``best_feasible`` (the selected model) and ``authors`` (the lowest test error
    among evaluations that met every budget: the authors' selection, docs/method.md §6).
    """

    def __init__(
        self,
        *,
        evaluate,
        recalibrate,
        test,
        validation,
        authors: bool,
        inspect,
        budgets,
        meta,
        writer,
        progress,
        best_ckpt,
        steps_per_epoch: int,
    ):
        self.evaluate = evaluate
        self.recalibrate = recalibrate
        self.test, self.num_test = test
        self.validation = validation
        self.authors = authors
        self.inspect = inspect
        self.budgets = budgets
        self.meta = meta
        self.writer = writer
        self.progress = progress
        self.best_ckpt = best_ckpt
        self.steps_per_epoch = steps_per_epoch

    def _error(self, model, arrays, count: int) -> tuple[float, float]:
        wrong, ce = self.evaluate(model["params"], model["rest"], *arrays)
        return float(_local(wrong)) / count, float(_local(ce)) / count

    def test_error(self, model) -> float:
        """Test error of ``model`` (``{"params", "rest"}``), as it is."""
        return self._error(model, self.test, self.num_test)[0]

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
            shift, ratio = (float(v) for v in np.asarray(_local(error)))
            record["bn_stat_error"] = {"mean_shift": shift, "log_var_ratio": ratio}
        sizes, bits, kb, ratios = self.inspect(state["params"], per_tensor=True, ratios=True)
        feasible = _feasible(sizes, self.budgets)
        meta = self.meta
        on_validation = self.validation is not None
        selected = None
        if on_validation and not authors_only:
            selected, record["validation_loss"] = self._error(state, *self.validation)
            record["validation_error"] = selected
        if not on_validation or (self.authors and (feasible or not self.budgets)):
            record["test_error"], record["test_loss"] = self._error(state, self.test, self.num_test)
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
        key = "validation_error" if self.validation is not None else "test_error"
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
            self.best_ckpt.save(
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
            record["multipliers"] = np.asarray(_local(budget_state.multipliers)).tolist()
        frozen = _frozen_at(state)
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
    workdir: Path, config, result: RunResult, layer_report: dict, command: str
) -> None:
    summary = result.to_json()
    summary.pop("layers")
    summary["provenance"] = provenance(command, wall_time_s=result.wall_time_s, seed=config.seed)
    (workdir / "summary.json").write_text(json.dumps(summary, indent=1, allow_nan=False) + "\n")
    (workdir / "report.json").write_text(json.dumps(layer_report, indent=1) + "\n")
    try:
        from mpdnn.plots import plot_bitwidths, plot_diagnostics

        plot_bitwidths(layer_report, workdir / "bitwidths.png", title=config.name)
        if result.budgets:
            evals = read_metrics(workdir, "eval")
            if evals:
                plot_diagnostics(
                    evals, workdir / "diagnostics.png", budgets=result.budgets, title=config.name
                )
    except ImportError:  # matplotlib is in the "train" extra; the numbers still count
        log.warning("matplotlib not installed: no bitwidths.png or diagnostics.png")


def read_metrics(workdir: Path, kind: str) -> list[dict[str, Any]]:
    """The ``kind`` records (``"train"``, ``"eval"``, ...) of ``<workdir>/metrics.jsonl``."""
    path = workdir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return [r for r in records if r.get("type") == kind]
