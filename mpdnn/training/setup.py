"""Setting a run up: its data, its model, its accounting and its optimizer.

* data (:mod:`mpdnn.data`): in memory, with ``data.validation_size`` images held out of
  the training split, or streamed from the host (:mod:`mpdnn.training.streaming`);
* the model (:data:`mpdnn.models.MODELS`), optionally started from a finished float run
  (``init.from_workdir``) or torchvision weights, quantized by the config's rules
  (:func:`mpdnn.training.config.rules`); the same function rebuilds a finished run's model
  (:func:`load_run_model`) for ``mpdnn.export`` and ``mpdnn.report``;
* the optimizer: :func:`mpdnn.optim.budget_chain` with the options of ``budget.recipe``
  (docs/method.md §6, §13).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, NamedTuple

import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh

from mpdnn import data as mdata
from mpdnn import optim
from mpdnn.models import build, load_torchvision
from mpdnn.nn import LogitScale, quantize_model, set_compute_dtype
from mpdnn.training import config as cfg
from mpdnn.training.checkpoint import Checkpointer, CheckpointError
from mpdnn.training.placement import make_mesh
from mpdnn.training.rundir import RunDir, RunDirError
from mpdnn.training.streaming import StreamingData, streaming_data


class DataShape(NamedTuple):
    """What the model is built from: one image's shape and the number of classes."""

    image_shape: tuple[int, ...]
    num_classes: int


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


def run_data(config: ml_collections.ConfigDict) -> mdata.ArrayDataset | StreamingData:
    """The run's data: ImageNet (and ``data.stream``) streamed, anything else in memory."""
    if config.data.name == "imagenet":
        return streaming_data(config)
    dataset = load_data(config)
    if config.data.get("stream"):
        if config.data.validation_size or config.data.train_size:
            raise cfg.ConfigError(
                "data.validation_size and data.train_size are not supported for streamed "
                "data yet: hold a validation split out of the tfds data instead"
            )
        return streaming_data(config, dataset)
    return dataset


def _resolve(path: str, workdir: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else workdir.parent / p


def build_model(config: ml_collections.ConfigDict, data: DataShape | Any, workdir: Path):
    """The float model, loaded from ``init.from_workdir`` if set, quantized by rules and,
    for pow2 runs, wrapped in :class:`~mpdnn.nn.LogitScale` (docs/method.md §6). ``data``
    is anything with ``image_shape`` and ``num_classes`` (a dataset, a :class:`DataShape`).
    """
    kwargs: dict[str, Any] = {"input_shape": tuple(data.image_shape)}
    if config.model.widths is not None:
        kwargs["widths"] = tuple(config.model.widths)
    try:
        model = build(
            config.model.name,
            rngs=nnx.Rngs(config.seed),
            num_classes=data.num_classes,
            **kwargs,
        )
    except (TypeError, ValueError) as err:
        raise cfg.ConfigError(f"model {config.model.name!r}: {err}") from None
    if config.init.from_workdir:
        load_final_model(model, RunDir(_resolve(config.init.from_workdir, workdir)))
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


def restore_model(model: nnx.Module, directory: Path) -> int:
    """Load the parameters and statistics of the checkpoint in ``directory`` (``best/`` or
    ``final/`` of a run) into ``model``; returns its step. :class:`RunDirError` if none."""
    _, params, rest = nnx.split(model, nnx.Param, ...)
    with Checkpointer(directory, max_to_keep=1, async_save=False) as ckpt:
        try:
            restored = ckpt.restore({"params": params, "rest": rest})
        except CheckpointError as err:
            raise RunDirError(f"{directory}: {err}") from None
    if restored is None:
        raise RunDirError(f"{directory} holds no checkpoint")
    step, state, _ = restored
    nnx.update(model, state["params"], state["rest"])
    return int(step)


def load_final_model(model: nnx.Module, run: RunDir) -> None:
    """Load a finished run's final float parameters and statistics into ``model``."""
    if not run.final.is_dir():
        raise cfg.ConfigError(
            f"init.from_workdir: no final model in {run.final}; train that run first"
        )
    try:
        restore_model(model, run.final)
    except RunDirError as err:
        raise cfg.ConfigError(f"init.from_workdir: {err}") from None


def run_data_shape(run: RunDir, summary: dict[str, Any]) -> DataShape:
    """The data shape a run's model was built for: its summary's, or for runs of older
    mpdnn versions, the input shape and head of its ``report.json``."""
    if summary.get("input_shape") and summary.get("num_classes"):
        return DataShape(tuple(summary["input_shape"]), int(summary["num_classes"]))
    report = run.read_report() or {}
    kernels = [r for r in report.get("layers", []) if r.get("tensor") == "kernel"]
    if not report.get("input_shape") or not kernels:
        raise RunDirError(f"{run.path}: neither summary.json nor report.json gives its data shape")
    return DataShape(tuple(report["input_shape"]), int(kernels[-1]["shape"][-1]))


class LoadedRun(NamedTuple):
    """A completed run's delivered model (eval mode) and where it came from."""

    model: nnx.Module
    config: ml_collections.ConfigDict
    summary: dict[str, Any]
    checkpoint: Path  # best/ or final/
    step: int


def load_run_model(run: RunDir | str | Path) -> LoadedRun:
    """The delivered model of a completed run, rebuilt and restored.

    The model is rebuilt from ``config.json`` by :func:`build_model`, with nothing loaded
    from elsewhere (``init.*`` cleared: the checkpoint holds every parameter), and restored
    from ``best/`` or ``final/``, whichever the summary says was delivered. Raises
    :class:`RunDirError` (one line) for anything that is not a completed, delivering run.
    """
    run = run if isinstance(run, RunDir) else RunDir(run)
    config = run.read_config()
    directory = run.delivered_checkpoint()
    summary = run.read_summary()
    shape = run_data_shape(run, summary)
    built = ml_collections.ConfigDict(config.to_dict())
    built.init.from_workdir = None
    if "torchvision" in built.init:
        built.init.torchvision = None
    try:
        model = build_model(built, shape, run.path)
    except cfg.ConfigError as err:
        raise RunDirError(f"{run.config_file}: {err}") from None
    step = restore_model(model, directory)
    model.eval()
    return LoadedRun(model, config, summary, directory, step)


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
    """The run's update, :func:`mpdnn.optim.budget_chain`: the authors' order
    (docs/method.md §6), budget term → weight decay → quantizer-gradient clipping (while a
    budget is active) → NNabla momentum SGD → projection of θ, with the recipe's options
    (docs/method.md §13). A budget no model can meet is a :class:`ConfigError`."""
    o = config.optim
    recipe = cfg.recipe(config)
    boundaries = {int(e) * steps_per_epoch: o.decay_factor for e in o.decay_epochs if int(e) > 0}
    piecewise = optax.piecewise_constant_schedule(o.learning_rate, boundaries)

    def lr(count):  # optax compares its int32 count with floats; cast it (exact to 2^24 steps)
        return piecewise(jnp.asarray(count, jnp.float32))

    try:
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
            flat=bool(o.get("flat_update", False)),  # setup() vectorizes the accounting too
        )
    except ValueError as err:
        raise cfg.ConfigError(str(err)) from None


@dataclasses.dataclass
class Setup:
    """Everything a run is made of before its first step."""

    config: ml_collections.ConfigDict
    recipe: cfg.Recipe
    dataset: mdata.ArrayDataset | StreamingData
    plan: cfg.Schedule
    mesh: Mesh
    eval_batch: int
    model: nnx.Module
    accounting: optim.Accounting
    budgets: dict[str, float]
    tx: optax.GradientTransformation

    @property
    def stream(self) -> bool:
        return isinstance(self.dataset, StreamingData)

    @property
    def num_train(self) -> int:
        return self.dataset.num_train if self.stream else len(self.dataset.train_labels)

    @property
    def num_test(self) -> int:
        return self.dataset.num_test if self.stream else len(self.dataset.test_labels)


def setup(config: ml_collections.ConfigDict, workdir: Path) -> Setup:
    """Data, schedule, mesh, model, accounting, budgets and optimizer of ``config``."""
    dataset = run_data(config)
    num_train = (
        dataset.num_train if isinstance(dataset, StreamingData) else len(dataset.train_labels)
    )
    plan = cfg.schedule(config, num_train)
    mesh = make_mesh(config.train.num_devices)
    if config.train.batch_size % mesh.size:
        raise cfg.ConfigError(
            f"train.batch_size={config.train.batch_size} must be a multiple of the "
            f"{mesh.size} devices"
        )
    model = build_model(config, dataset, workdir)
    # optim.flat_update: the budget's sizes on vectors too (the same numbers, fewer kernels)
    flat = bool(config.optim.get("flat_update", False))
    accounting = optim.Accounting.from_model(model, vectorized=flat)
    budgets = cfg.budgets(config)
    return Setup(
        config=config,
        recipe=cfg.recipe(config),
        dataset=dataset,
        plan=plan,
        mesh=mesh,
        eval_batch=math.ceil(config.train.eval_batch_size / mesh.size) * mesh.size,
        model=model,
        accounting=accounting,
        budgets=budgets,
        tx=make_optimizer(config, accounting, budgets, plan.steps_per_epoch),
    )
