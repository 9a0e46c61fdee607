"""The experiment configuration: every number of a run lives in one ``ConfigDict``.

:func:`base_config` holds the schema with SPEC §8's CIFAR-10 recipe as defaults; experiment
files (``experiments/*.py``) start from it and change what their row of the paper changes.
:func:`check` turns every kind of bad input into one :class:`ConfigError` line before any
work starts (the command-line entry point prints it and exits with status 2).

Decisions where SPEC is silent (written down here, as the brief asks):

* ``budget.*_kb = None`` means "no budget"; a number must be > 0.
* ``budget.method = "penalty"`` is the paper's λ·max(0, g)² with ``budget.strength`` = λ;
  ``"lagrangian"`` learns λ by dual ascent (``budget.dual_learning_rate``).
* ``init.from_workdir``: a finished run whose final float model starts this one (the paper's
  "float-net init"); relative paths are resolved against the parent of the run's workdir,
  so the variants of one experiment can point at each other (``"../float"`` style is not
  needed: write ``"float"``).
* ``train.steps_per_call``: steps fused into one jitted ``lax.scan``; the progress bar and
  the non-finite-loss check advance per call.
* ``variants``: optional ``{name: overrides}``; each variant is its own run in
  ``<workdir>/<name>`` and the entry point prints them side by side.
"""

from __future__ import annotations

import dataclasses

import ml_collections
from ml_collections import config_dict

from mpdnn.models import MODELS
from mpdnn.nn import QuantConfig, Rule
from mpdnn.quantizers import PARAMETRIZATIONS

DATASETS = ("digits", "cifar10", "synthetic", "imagenet")
MODES = ("learned", "tqt", "fixed", "float")
SIZES = ("weight_kb", "act_max_kb", "act_sum_kb")
RANGES = ("b_range", "d_range", "qmax_range", "qmin_range")


class ConfigError(ValueError):
    """Bad input in a configuration; the message is one line that says what to change."""


def quantizer_config(mode: str = "float", bits: int = 4) -> ml_collections.ConfigDict:
    """One kind's quantizer settings (weights or activations); see :class:`QuantConfig`."""
    c = ml_collections.ConfigDict()
    c.mode = mode  # learned | tqt | fixed | float
    c.family = "uniform"  # uniform | pow2
    c.parametrization = config_dict.placeholder(str)  # None: U3 (d_qmax) / P3 (qmin_qmax)
    c.bits = bits  # initial (learned) or fixed bits
    c.init = "float"  # weights: step from the current weights (SPEC §4) or "random"
    for name in RANGES:  # None: the authors' boxes (SPEC §2)
        setattr(c, name, config_dict.placeholder(tuple))
    return c


def base_config() -> ml_collections.ConfigDict:
    """SPEC §8's CIFAR-10 recipe with a float ResNet-20; experiments override from here."""
    c = ml_collections.ConfigDict()
    c.name = "cifar10_resnet20_float"
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.name = "resnet20"
    c.model.widths = config_dict.placeholder(tuple)  # None: the model's own
    # A learnable scalar on the logits (nn.LogitScale); None: exactly when a kind is pow2,
    # as the authors' code does (SPEC §6).
    c.model.logit_scale = config_dict.placeholder(bool)
    # Conv/linear operand dtype (nn.set_compute_dtype): None = float32, or "bfloat16"
    # (exact for quantized layers up to 8 bits; products accumulate in float32).
    c.model.compute_dtype = config_dict.placeholder(str)

    c.data = ml_collections.ConfigDict()
    c.data.name = "cifar10"
    c.data.dir = config_dict.placeholder(str)  # a directory, a .tar.gz or a tfds data_dir
    c.data.cache_dir = config_dict.placeholder(str)
    c.data.max_per_class = 0  # > 0: first N images per class and split (smoke runs)
    c.data.augment = True  # SPEC §8: pad 4, random crop, horizontal flip
    c.data.pad = 4
    c.data.flip = True
    c.data.synthetic_shape = (32, 32, 3)  # only for name == "synthetic"
    c.data.synthetic_train = 512
    c.data.synthetic_test = 128
    c.data.synthetic_classes = 10
    # Streamed input (mpdnn.training.streaming): ImageNet always; any dataset with stream.
    c.data.stream = False
    c.data.image_size = 224  # random-resized crop / center crop size of streamed images
    c.data.eval_resize = 256  # shorter side before the center crop (evaluation)
    c.data.workers = 16  # host decoding threads

    c.quant = ml_collections.ConfigDict()
    c.quant.weights = quantizer_config("float", bits=4)
    c.quant.activations = quantizer_config("float", bits=4)

    c.budget = ml_collections.ConfigDict()
    for name in SIZES:
        setattr(c.budget, name, config_dict.placeholder(float))
    c.budget.method = "penalty"  # penalty | lagrangian
    c.budget.strength = 0.1  # λ of the penalty, sizes in KB (SPEC §6)
    # Per-size λ overriding ``strength``, e.g. {"weight_kb": 1.7e-4} (ImageNet scales λ).
    c.budget.strengths = ml_collections.ConfigDict()
    c.budget.dual_learning_rate = 0.01  # η of the Lagrangian's dual ascent
    c.budget.clip_quantizer_gradients = True  # authors' stabiliser while a budget is active
    c.budget.projection_margin = 1e-5

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 0.1
    c.optim.momentum = 0.9
    c.optim.weight_decay = 2e-4  # on every parameter, quantizer θ and BatchNorm too
    c.optim.decay_epochs = (80, 120)  # lr divided by 10 after these epochs
    c.optim.decay_factor = 0.1

    c.train = ml_collections.ConfigDict()
    c.train.epochs = 160
    c.train.batch_size = 128  # global; the last partial batch of an epoch is dropped
    c.train.eval_batch_size = 500
    c.train.eval_every_epochs = 1
    c.train.eval_when_feasible = False  # also after every call whose end meets the budgets
    c.train.checkpoint_every_epochs = 1
    c.train.steps_per_call = 10
    # Steps of a call (and test batches) in one lax.scan, or a Python loop of jitted steps.
    # None: scan except on CPU, where XLA runs convolutions inside a loop ~15x slower.
    c.train.scan = config_dict.placeholder(bool)
    c.train.max_steps = 0  # > 0: stop after this many steps (smoke runs)
    c.train.num_devices = 0  # 0: every device (of every host)
    c.train.progress = True

    c.init = ml_collections.ConfigDict()
    c.init.from_workdir = config_dict.placeholder(str)
    # A torchvision float state_dict (.pth/.npz) loaded before quantization (ImageNet nets).
    c.init.torchvision = config_dict.placeholder(str)

    c.variants = ml_collections.ConfigDict()
    c.run_variants = ""  # comma-separated subset of variants ("" = all)
    return c


def _fail(message: str) -> None:
    raise ConfigError(message)


def quant_config(c: ml_collections.ConfigDict, kind: str) -> QuantConfig:
    """The :class:`QuantConfig` one kind's settings describe (validated, one-line errors)."""
    if c.mode not in MODES:
        _fail(f"quant.{kind}.mode={c.mode!r} is unknown; expected one of {', '.join(MODES)}")
    if c.family not in PARAMETRIZATIONS:
        _fail(f"quant.{kind}.family={c.family!r} is unknown; expected uniform or pow2")
    options = PARAMETRIZATIONS[c.family]
    if c.parametrization is not None and c.parametrization not in options:
        _fail(
            f"quant.{kind}.parametrization={c.parametrization!r} is unknown for {c.family}; "
            f"expected one of {', '.join(options)}"
        )
    overrides = tuple(
        (name, tuple(getattr(c, name))) for name in RANGES if getattr(c, name) is not None
    )
    try:
        return QuantConfig(
            mode=c.mode,
            family=c.family,
            parametrization=c.parametrization,
            bits=int(c.bits),
            init=c.init,
            spec_overrides=overrides,
        )
    except (ValueError, TypeError) as err:
        _fail(f"quant.{kind}: {err}")
    raise AssertionError  # unreachable


def rules(config: ml_collections.ConfigDict) -> list[Rule]:
    """Quantization rules: one per kind, matching every site (float kinds get none)."""
    out = []
    for kind, c in (("weight", config.quant.weights), ("activation", config.quant.activations)):
        qc = quant_config(c, f"{kind}s")
        if qc.quantized:
            out.append(Rule(".*", qc, kind=kind))
    return out


def logit_scale(config: ml_collections.ConfigDict) -> bool:
    """Whether the run wraps its model in :class:`~mpdnn.nn.LogitScale`."""
    if config.model.logit_scale is not None:
        return bool(config.model.logit_scale)
    return any(r.config.family == "pow2" for r in rules(config))


def strength(config: ml_collections.ConfigDict, size: str) -> float:
    """λ of one budget: ``budget.strengths[size]`` when set, else ``budget.strength``."""
    return float(config.budget.strengths.get(size, config.budget.strength))


def budgets(config: ml_collections.ConfigDict) -> dict[str, float]:
    """``{size: limit_kb}`` of the budgets set (none: empty)."""
    out = {}
    for name in SIZES:
        value = getattr(config.budget, name)
        if value is None:
            continue
        if not value > 0:
            _fail(f"budget.{name}={value} must be > 0 KB (leave it unset for no budget)")
        out[name] = float(value)
    return out


def check(config: ml_collections.ConfigDict) -> None:
    """Reject bad input with one :class:`ConfigError` line, before any work starts."""
    if config.model.name not in MODELS:
        _fail(f"model.name={config.model.name!r} is unknown; known: {', '.join(sorted(MODELS))}")
    if config.data.name not in DATASETS:
        _fail(f"data.name={config.data.name!r} is unknown; known: {', '.join(DATASETS)}")
    rules(config)
    budgets(config)
    if config.init.from_workdir and config.init.get("torchvision"):
        _fail("init.from_workdir and init.torchvision both start the model: set one")
    if config.budget.method not in ("penalty", "lagrangian"):
        _fail(f"budget.method={config.budget.method!r} is unknown; expected penalty or lagrangian")
    if not config.budget.strength >= 0:
        _fail(f"budget.strength={config.budget.strength} must be >= 0")
    for name, value in config.budget.strengths.items():
        if name not in SIZES:
            _fail(f"budget.strengths.{name} is not a size; expected one of {', '.join(SIZES)}")
        if not value >= 0:
            _fail(f"budget.strengths.{name}={value} must be >= 0")
    if config.model.compute_dtype not in (None, "float32", "bfloat16", "float16"):
        _fail(
            f"model.compute_dtype={config.model.compute_dtype!r} is unknown; expected "
            "float32, bfloat16 or float16"
        )
    for key in ("epochs", "batch_size", "eval_batch_size", "steps_per_call"):
        value = getattr(config.train, key)
        if not (isinstance(value, int) and value > 0):
            _fail(f"train.{key}={value!r} must be a positive integer")
    if not config.optim.learning_rate > 0:
        _fail(f"optim.learning_rate={config.optim.learning_rate} must be > 0")
    unknown = [n for n in _variant_names(config) if n not in config.variants]
    if unknown:
        _fail(
            f"run_variants names {', '.join(unknown)}, not among the variants "
            f"({', '.join(config.variants) or 'none'})"
        )


def _variant_names(config: ml_collections.ConfigDict) -> list[str]:
    return [n.strip() for n in config.run_variants.split(",") if n.strip()]


def variants(config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
    """``{name: config}`` of every run a config asks for: its variants (each the base with
    the variant's overrides merged in), or the config itself as ``{"": config}``.

    Variants run in name order, except that a variant whose ``init.from_workdir`` names
    another variant runs after it (``ConfigDict`` keeps no insertion order).
    """
    if not config.variants:
        return {"": config}
    wanted = _variant_names(config) or sorted(config.variants)
    runs = {}
    for name in wanted:
        run = ml_collections.ConfigDict(config.to_dict())
        overrides = config.variants[name]
        run.variants = ml_collections.ConfigDict()
        run.run_variants = ""
        try:
            run.update(overrides)
        except (KeyError, AttributeError, TypeError) as err:
            _fail(f"variant {name!r} overrides a key the config lacks: {err}")
        run.name = f"{config.name}/{name}"
        runs[name] = run
    ordered: dict[str, ml_collections.ConfigDict] = {}

    def visit(name: str, seen: tuple[str, ...]) -> None:
        if name in ordered:
            return
        if name in seen:
            _fail(f"variants {' -> '.join((*seen, name))} start from each other in a cycle")
        parent = runs[name].init.from_workdir
        if parent in runs:
            visit(parent, (*seen, name))
        ordered[name] = runs[name]

    for name in runs:
        visit(name, ())
    return ordered


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Steps of a run, derived from the config and the dataset size."""

    steps_per_epoch: int
    total_steps: int
    eval_every_steps: int
    checkpoint_every_steps: int


def schedule(config: ml_collections.ConfigDict, num_train: int) -> Schedule:
    steps_per_epoch = num_train // config.train.batch_size
    if steps_per_epoch < 1:
        _fail(
            f"train.batch_size={config.train.batch_size} is larger than the training set "
            f"({num_train} images)"
        )
    total = steps_per_epoch * config.train.epochs
    if config.train.max_steps > 0:
        total = min(total, config.train.max_steps)
    return Schedule(
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        eval_every_steps=steps_per_epoch * max(1, config.train.eval_every_epochs),
        checkpoint_every_steps=steps_per_epoch * max(1, config.train.checkpoint_every_epochs),
    )
