"""``train_and_evaluate(config, workdir)``: memory-constrained training (SPEC §6–8).

One run, from a :mod:`mpdnn.training.config` ``ConfigDict``:

1. data (:mod:`mpdnn.data`) kept on the accelerators, replicated on every device; each step
   gathers its batch by index and augments it on device (SPEC §8), so input never waits on
   the host;
2. the model (:data:`mpdnn.models.MODELS`), optionally started from a finished float run
   (``init.from_workdir``), quantized by the config's rules;
3. the optimizer: an ``optax.chain`` of the budget transforms (:mod:`mpdnn.optim.budget`),
   weight decay on every parameter, the authors' quantizer-gradient clipping while a budget
   is active, SGD with NNabla's momentum and the projection of θ into their boxes;
4. data parallel over a ``Mesh`` of every device (of every host after
   ``jax.distributed.initialize``): the batch is sharded on the ``data`` axis, parameters
   and optimizer state are replicated; the same code runs on 1 device or many;
5. ``train.steps_per_call`` steps per jitted ``lax.scan``; evaluation, checkpoint (orbax,
   automatic resume from the latest readable one) and logging at epoch boundaries.

At the end ``workdir`` holds ``summary.json`` (final and best-feasible test error, the verdict
of every budget, provenance), ``report.json`` (per-layer bits and memory of the delivered
model), ``bitwidths.png``, ``metrics.jsonl``, TensorBoard events, ``checkpoints/`` (the
latest states), ``best/`` (the best evaluation that met every budget: the delivered model)
and ``final/`` (the final parameters, for float-net init of other runs).

The delivered model meets every budget or the run says loudly that none did (SPEC §6): a
run with budgets and no feasible evaluation returns ``feasible=False`` and logs an error,
and ``python -m mpdnn.train`` exits with status 3.
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
    """What a run delivered; ``summary.json`` holds the same as JSON."""

    name: str  # the config's name
    workdir: str
    status: str  # "completed" or "stopped" (checkpointed, resumable)
    step: int
    total_steps: int
    steps_per_epoch: int
    final_test_error: float | None
    best_test_error: float | None  # best evaluation, budgets ignored (the authors' pick)
    best_feasible_test_error: float | None  # best evaluation that met every budget
    best_feasible_step: int | None
    feasible: bool | None  # None: no budget
    delivered: str | None  # "best_feasible", "final" (no budget) or None (none met budgets)
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
    d = config.data
    extra = {}
    if d.name == "synthetic":
        extra = dict(
            image_shape=tuple(d.synthetic_shape),
            num_train=d.synthetic_train,
            num_test=d.synthetic_test,
            num_classes=d.get("synthetic_classes", 10),
        )
    return mdata.load_dataset(
        d.name,
        data_dir=d.dir,
        cache_dir=d.cache_dir,
        max_per_class=d.max_per_class or None,
        seed=config.seed,
        **extra,
    )


def _resolve(path: str, workdir: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else workdir.parent / p


def build_model(config: ml_collections.ConfigDict, dataset: mdata.ArrayDataset, workdir: Path):
    """The float model, loaded from ``init.from_workdir`` if set, quantized by rules and,
    for pow2 runs, wrapped in :class:`~mpdnn.nn.LogitScale` (SPEC §6)."""
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
        # weight quantizers start from them (SPEC §4's float-net init).
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


def make_optimizer(
    config: ml_collections.ConfigDict,
    accounting: optim.Accounting,
    budgets: dict[str, float],
    steps_per_epoch: int,
) -> optax.GradientTransformation:
    """The authors' update order (SPEC §6): budget term → weight decay → quantizer-gradient
    clipping (while a budget is active) → NNabla momentum SGD → projection of θ."""
    o = config.optim
    boundaries = {int(e) * steps_per_epoch: o.decay_factor for e in o.decay_epochs if int(e) > 0}
    lr = optax.piecewise_constant_schedule(o.learning_rate, boundaries)
    parts = []
    learned = any(q.learned for q in accounting.quantizers)
    if budgets:
        terms = [optim.Budget(k, v, cfg.strength(config, k)) for k, v in budgets.items()]
        if config.budget.method == "penalty":
            parts.append(optim.budget_penalty(accounting, terms))
        else:
            parts.append(
                optim.budget_lagrangian(
                    accounting, terms, dual_learning_rate=config.budget.dual_learning_rate
                )
            )
    if o.weight_decay:
        parts.append(optax.add_decayed_weights(o.weight_decay))
    if budgets and learned and config.budget.clip_quantizer_gradients:
        parts.append(optim.clip_quantizer_gradients(accounting))
    parts.append(optim.sgd_nnabla(lr, o.momentum))
    if learned:
        margin = config.budget.projection_margin
        parts.append(optim.project_quantizer_params(accounting, margin=margin))
    return optax.chain(*parts)


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
):
    """The jitted training chunk (``lax.scan`` over steps) and the jitted evaluation.

    Device-resident data: a chunk is ``(state, idx [k, B], images, labels)`` and gathers,
    normalises and augments on device. Streamed data (:mod:`mpdnn.training.streaming`): a
    chunk is ``(state, xs [k, B, H, W, C], ys [k, B])`` of host-prepared batches, and the
    evaluation reads the test split batch by batch."""
    batch = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())
    stream = isinstance(dataset, StreamingData)
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
        sizes = accounting(params)
        metrics = {
            "loss": loss,
            "accuracy": jnp.mean(jnp.argmax(logits, -1) == y),
            **sizes,
        }
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
    return train_chunk, evaluate


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


def _test_arrays(dataset: mdata.ArrayDataset, eval_batch: int):
    """The test set padded to whole batches, shaped ``[batches, batch, ...]``, and its mask."""
    n = len(dataset.test_labels)
    batches = math.ceil(n / eval_batch)
    pad = batches * eval_batch - n
    images = np.concatenate([dataset.test_images, np.zeros((pad, *dataset.image_shape), np.uint8)])
    labels = np.concatenate([dataset.test_labels, np.zeros(pad, np.int32)])
    mask = np.arange(batches * eval_batch) < n
    shape = (batches, eval_batch)
    return images.reshape(*shape, *dataset.image_shape), labels.reshape(shape), mask.reshape(shape)


# ----------------------------------------------------------------------------- loop


def make_inspect(accounting: optim.Accounting):
    """A jitted ``params -> (sizes, {tensor: bits}, {tensor: KB})`` for logging (eager, the
    bitwidth graph would compile op by op at every evaluation)."""
    from mpdnn.optim.accounting import KB, grouped_bits

    names = [f"{q.site}.{q.tensor}" for q in accounting.quantizers]
    numels = [q.numel for q in accounting.quantizers]

    @jax.jit
    def inspect(params):
        thetas = [(q.spec, accounting.theta(params, q)) for q in accounting.quantizers]
        bits = [jnp.mean(b) for b in grouped_bits(thetas)]
        return accounting(params), bits

    def host(params, *, per_tensor: bool = False):
        sizes, bits = inspect(_local(params))
        sizes = {k: float(v) for k, v in sizes.items()}
        if not per_tensor:
            return sizes
        bits = [float(b) for b in bits]
        kb = {n: m * b / KB for n, m, b in zip(names, numels, bits, strict=True)}
        return sizes, dict(zip(names, bits, strict=True)), kb

    return host


def _feasible(sizes: dict[str, float], budgets: dict[str, float]) -> bool:
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

    if config.data.name == "imagenet":
        dataset = streaming_data(config)
    else:
        dataset = load_data(config)
        if config.data.get("stream"):
            dataset = streaming_data(config, dataset)
    stream = isinstance(dataset, StreamingData)
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
    model.eval()
    eval_graphdef = nnx.split(model, nnx.Param, ...)[0]
    model.train()
    replicated = NamedSharding(mesh, P())
    state = _put(
        {"step": jnp.int32(0), "params": params, "rest": rest, "opt_state": tx.init(params)},
        replicated,
    )
    if stream:  # batches come from the host, call by call
        images = labels = None
        test = ()
    else:
        images, labels = _put((dataset.train_images, dataset.train_labels), replicated)
        test = _put(_test_arrays(dataset, eval_batch), replicated)
    train_chunk, evaluate = make_steps(
        graphdef, eval_graphdef, tx, accounting, dataset, config, mesh
    )

    inspect = make_inspect(accounting)
    ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=2)
    best_ckpt = Checkpointer(workdir / "best", max_to_keep=1)
    meta: dict[str, Any] = {"best_error": None, "best_feasible": None}
    restored = ckpt.restore(state)
    if restored is not None:
        _, state, meta = restored
        if chief:
            print(f"resuming {workdir} from step {int(_local(state['step']))}", file=sys.stderr)
    step = int(_local(state["step"]))

    writer = MetricsWriter(workdir, enabled=chief)
    progress = Progress(
        plan.total_steps, step, enabled=chief, desc=config.name, bar=config.train.progress
    )
    status = "completed"
    last_eval = None

    def run_eval(state, step: int, *, save_best: bool = True) -> dict[str, Any]:
        return _evaluate(
            state,
            step,
            evaluate=evaluate,
            test=test,
            num_test=num_test,
            inspect=inspect,
            budgets=budgets,
            meta=meta,
            writer=writer,
            progress=progress,
            best_ckpt=best_ckpt,
            steps_per_epoch=plan.steps_per_epoch,
            save_best=save_best,
        )

    shares = None  # streamed data: this epoch's batches
    stream_sharding = NamedSharding(mesh, P(None, "data"))  # [steps, batch, ...]
    try:
        while step < plan.total_steps:
            epoch, offset = divmod(step, plan.steps_per_epoch)
            next_stop = min(
                plan.total_steps,
                (epoch + 1) * plan.steps_per_epoch,
                step + config.train.steps_per_call,
            )
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
            means = {k: float(v.mean()) for k, v in host.items()}
            writer.write("train", step, means)
            progress.update(step, {"loss": means["loss"], "acc": means["accuracy"]})

            at_epoch_end = step % plan.steps_per_epoch == 0 or step == plan.total_steps
            if at_epoch_end and (step % plan.eval_every_steps == 0 or step == plan.total_steps):
                last_eval = run_eval(state, step)
            elif budgets and config.train.eval_when_feasible:
                # The authors evaluate whenever the budgets are met, to keep the best
                # feasible model; bits flip often near the budget, so epoch ends miss most.
                if _feasible(inspect(state["params"]), budgets):
                    last_eval = run_eval(state, step)
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
        if status == "completed" and last_eval is None:
            # Resumed a finished run: evaluate again for the summary.
            last_eval = run_eval(state, step, save_best=False)
    finally:
        progress.close()
        ckpt.close()
        best_ckpt.close()

    if status == "completed":
        with Checkpointer(workdir / "final", max_to_keep=1, async_save=False) as final:
            final.save(
                step,
                {"params": state["params"], "rest": state["rest"]},
                metadata={"test_error": last_eval["test_error"]},
                force=True,
            )
    # The delivered model: the best evaluation that met every budget, or the final one when
    # there is no budget. With budgets and no feasible evaluation nothing is delivered, and
    # the report shows the final (over-budget) model, marked as such.
    delivered = {"params": state["params"], "rest": state["rest"]}
    delivered_error = last_eval["test_error"] if last_eval else None
    if budgets:
        delivered_error = (meta["best_feasible"] or {}).get("test_error")
        if meta["best_feasible"] is not None:
            with Checkpointer(workdir / "best", max_to_keep=1, async_save=False) as best:
                delivered = best.restore(delivered)[1]
    layer_report = report(
        nnx.merge(graphdef, *_local((delivered["params"], delivered["rest"]))),
        name=config.model.name,
    )
    final_sizes = inspect(state["params"])
    delivered_sizes = inspect(delivered["params"])
    result = RunResult(
        name=config.name,
        workdir=str(workdir),
        status=status,
        step=step,
        total_steps=plan.total_steps,
        steps_per_epoch=plan.steps_per_epoch,
        final_test_error=last_eval["test_error"] if last_eval else None,
        best_test_error=meta["best_error"],
        best_feasible_test_error=(meta["best_feasible"] or {}).get("test_error"),
        best_feasible_step=(meta["best_feasible"] or {}).get("step"),
        feasible=(meta["best_feasible"] is not None) if budgets else None,
        delivered=("best_feasible" if meta["best_feasible"] else None) if budgets else "final",
        delivered_test_error=delivered_error,
        delivered_sizes=delivered_sizes,
        budgets=budgets,
        final_sizes=final_sizes,
        verdicts=_verdicts(budgets, final_sizes, meta["best_feasible"]),
        layers=layer_report["layers"],
        wall_time_s=time.perf_counter() - start,
    )
    writer.write("summary", step, {k: v for k, v in result.to_json().items() if k != "layers"})
    writer.close()
    if chief and status == "completed":
        _write_outputs(workdir, config, result, layer_report, command)
    if budgets and status == "completed" and not result.feasible:
        log.error(
            "NO evaluation of %s met every budget %s: there is no deliverable model",
            workdir,
            budgets,
        )
    return result


def _evaluate(
    state,
    step: int,
    *,
    evaluate,
    test,
    num_test: int,
    inspect,
    budgets,
    meta,
    writer,
    progress,
    best_ckpt,
    steps_per_epoch: int,
    save_best: bool,
) -> dict[str, Any]:
    """Test error, sizes, feasibility and per-tensor bits; keeps the best feasible model."""
    wrong, ce = evaluate(state["params"], state["rest"], *test)
    error = float(_local(wrong)) / num_test
    sizes, bits, kb = inspect(state["params"], per_tensor=True)
    feasible = _feasible(sizes, budgets)
    record = {
        "epoch": step / steps_per_epoch,
        "test_error": error,
        "test_loss": float(_local(ce)) / num_test,
        **sizes,
        "feasible": feasible,
        "bits": bits,
        "kb": kb,
    }
    budget_state = optim.budget_values(state["opt_state"])
    if budget_state is not None:
        record["multipliers"] = np.asarray(_local(budget_state.multipliers)).tolist()
    if meta["best_error"] is None or error < meta["best_error"]:
        meta["best_error"] = error
    best = meta["best_feasible"]
    if save_best and feasible and (best is None or error < best["test_error"]):
        meta["best_feasible"] = {"step": step, "test_error": error, **sizes}
        best_ckpt.save(
            step,
            {"params": state["params"], "rest": state["rest"]},
            metadata=meta["best_feasible"],
            force=True,
        )
    writer.write("eval", step, record)
    sizes_text = " ".join(f"{k}={v:.2f}" for k, v in sizes.items())
    progress.write(
        f"step {step} epoch {record['epoch']:.1f}: test error {error:.4f} {sizes_text}"
        + ("" if not budgets else (" feasible" if feasible else " over budget"))
    )
    return record


def _verdicts(budgets, final_sizes, best_feasible) -> dict[str, dict[str, Any]]:
    out = {}
    for name, limit in budgets.items():
        final = final_sizes[name]
        out[name] = {
            "limit_kb": limit,
            "final_kb": final,
            "final_met": final <= limit,
            "delivered_kb": None if best_feasible is None else best_feasible[name],
            "delivered_met": best_feasible is not None,
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
        from mpdnn.plots import plot_bitwidths

        plot_bitwidths(layer_report, workdir / "bitwidths.png", title=config.name)
    except ImportError:  # matplotlib is in the "train" extra; the numbers still count
        log.warning("matplotlib not installed: no bitwidths.png")
