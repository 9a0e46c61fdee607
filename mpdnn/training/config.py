"""The experiment configuration: every number of a run lives in one ``ConfigDict``.

:func:`base_config` holds the schema with docs/method.md §8's CIFAR-10 recipe as defaults;
experiment
files (``experiments/*.py``) start from it and change what their row of the paper changes.
:func:`check` turns every kind of bad input into one :class:`ConfigError` line before any
work starts (the command-line entry point prints it and exits with status 2).

Decisions where the paper is silent (written down here, as the brief asks):

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
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
from ml_collections import config_dict

from mpdnn import optim
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
    c.init = "float"  # weights: step from the current weights (docs/method.md §4) or "random"
    for name in RANGES:  # None: the authors' boxes (docs/method.md §2)
        setattr(c, name, config_dict.placeholder(tuple))
    return c


def base_config() -> ml_collections.ConfigDict:
    """docs/method.md §8's CIFAR-10 recipe with a float ResNet-20; experiments override from
    here.
    """
    c = ml_collections.ConfigDict()
    c.name = "cifar10_resnet20_float"
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.name = "resnet20"
    c.model.widths = config_dict.placeholder(tuple)  # None: the model's own
    # A learnable scalar on the logits (nn.LogitScale); None: exactly when a kind is pow2,
    # as the authors' code does (docs/method.md §6).
    c.model.logit_scale = config_dict.placeholder(bool)
    # Conv/linear operand dtype (nn.set_compute_dtype): None = float32, or "bfloat16"
    # (exact for quantized layers up to 8 bits; products accumulate in float32).
    c.model.compute_dtype = config_dict.placeholder(str)

    c.data = ml_collections.ConfigDict()
    c.data.name = "cifar10"
    c.data.dir = config_dict.placeholder(str)  # a directory, a .tar.gz or a tfds data_dir
    c.data.cache_dir = config_dict.placeholder(str)
    c.data.max_per_class = 0  # > 0: first N images per class and split (smoke runs)
    # Training images held out (stratified, a fixed seed: the same for every run) as the
    # validation split on which every "best" model is selected; 0: no validation split, and
    # the selection falls back to the test set, the authors' way (labelled as such).
    c.data.validation_size = 0
    c.data.train_size = 0  # > 0: train on this many of the remaining images (stratified)
    c.data.augment = True  # docs/method.md §8: pad 4, random crop, horizontal flip
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
    c.data.workers = 16  # host decoding threads (grain), in all
    # > 0: also decode in this many grain worker processes (spawned each epoch; for when
    # Python-level work per example, not Pillow's GIL-free decoding, limits the threads)
    c.data.worker_processes = 0

    c.quant = ml_collections.ConfigDict()
    c.quant.weights = quantizer_config("float", bits=4)
    c.quant.activations = quantizer_config("float", bits=4)
    # Per-layer exceptions, before the two kinds' rules (first match wins), in name order:
    # {name: {"pattern": regex on the layer path (full match), "kind": "weight" or
    # "activation", and any keys of quantizer_config overriding that kind's settings}},
    # e.g. {"ends": {"pattern": "blocks.0.conv|head", "kind": "weight", "bits": 8}}.
    c.quant.layer_rules = ml_collections.ConfigDict()

    c.budget = ml_collections.ConfigDict()
    for name in SIZES:
        setattr(c.budget, name, config_dict.placeholder(float))
    # The training recipe (docs/method.md §13): "paper" is exactly the authors' update and
    # selection;
    # "mpdnn" is ours. Every option below that is None takes its recipe's value (RECIPES).
    c.budget.recipe = "mpdnn"
    c.budget.method = "penalty"  # penalty | lagrangian
    # λ of the penalty, sizes in KB (docs/method.md §6); None: the recipe's (paper: 0.1; mpdnn:
    # RELATIVE_STRENGTH / limit², the same pull on a given relative violation at any size).
    c.budget.strength = config_dict.placeholder(float)
    # Per-size λ overriding ``strength``, e.g. {"weight_kb": 1.7e-4} (ImageNet scales λ).
    c.budget.strengths = ml_collections.ConfigDict()
    c.budget.dual_learning_rate = 0.01  # η of the Lagrangian's dual ascent
    # The authors' ±d (U3) / ±qmin (P3) clip of θ gradients while a budget is active.
    c.budget.clip_quantizer_gradients = config_dict.placeholder(bool)
    c.budget.projection_margin = 1e-5
    # Search with the budgets until this epoch, then freeze every quantizer θ at the first
    # step at which every budget is met and train the rest; < 0: never; None: the recipe's
    # (paper: never; mpdnn: the first learning-rate drop, in a run with a budget).
    c.budget.freeze_epoch = config_dict.placeholder(float)
    # "first": the max's gradient to its first argmax (authors); "all": every activation
    # tensor above the act-max limit is penalised (the same feasible set).
    c.budget.max_gradient = config_dict.placeholder(str)
    # ε ≥ 0: the penalty / multipliers aim at (1 − ε)·limit; feasibility is judged at limit.
    c.budget.margin = config_dict.placeholder(float)

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 0.1
    c.optim.momentum = 0.9
    c.optim.weight_decay = 2e-4  # on every parameter, quantizer θ and BatchNorm too
    c.optim.decay_epochs = (80, 120)  # lr divided by 10 after these epochs
    c.optim.decay_factor = 0.1
    # The quantizer parameters' own update (None: the recipe's): their learning rate as a
    # multiple of the weights', their momentum, and "linear" (SGD on raw θ, the authors') or
    # "log" (SGD on log θ: every step a relative change of θ, whatever its scale).
    c.optim.quant_lr_scale = config_dict.placeholder(float)
    c.optim.quant_momentum = config_dict.placeholder(float)
    c.optim.quant_update = config_dict.placeholder(str)
    # The update on vectors: weight decay, θ clip and momentum step on one vector for the θ
    # and one for the rest (mpdnn.optim.flat), the budget's sizes computed as vectors
    # (Accounting(vectorized=True)). Bit for bit the same run on CPU in fewer kernels
    # (ResNet-20 U3 with both budgets: scripts/count_kernels.py, results/kernel_counts.md).
    # Off by default until a GPU has timed it; the optimizer state holds vectors, so a run
    # resumes with the value it started with.
    c.optim.flat_update = False

    c.train = ml_collections.ConfigDict()
    c.train.epochs = 160
    c.train.batch_size = 128  # global; the last partial batch of an epoch is dropped
    c.train.eval_batch_size = 500
    c.train.eval_every_epochs = 1
    # The authors' selection (docs/method.md §6): > 0 evaluates the test set at every epoch end and
    # after calls that end within every budget, at most every this many steps; the minimum
    # is reported apart, labelled as the authors'. 0: off.
    c.train.eval_feasible_every = 0
    # Un-augmented training batches that re-estimate BatchNorm's statistics before every
    # evaluation and before a model is saved; 0: off; None: the recipe's.
    c.train.bn_recalibration = config_dict.placeholder(int)
    c.train.checkpoint_every_epochs = 1
    c.train.steps_per_call = 10
    # Steps of a call (and test batches) in one lax.scan, or a Python loop of jitted steps.
    # None: scan except on CPU, where XLA runs convolutions inside a loop ~15x slower.
    c.train.scan = config_dict.placeholder(bool)
    c.train.max_steps = 0  # > 0: stop after this many steps (smoke runs)
    c.train.num_devices = 0  # 0: every device (of every host)
    c.train.progress = True
    # A workdir belongs to one config: resuming with another is refused, except for these
    # comma-separated keys (e.g. "train.epochs" to extend a run). See check_resume.
    c.train.resume_changes = ""

    c.init = ml_collections.ConfigDict()
    c.init.from_workdir = config_dict.placeholder(str)
    # A torchvision float state_dict (.pth/.npz) loaded before quantization (ImageNet nets).
    c.init.torchvision = config_dict.placeholder(str)

    c.variants = ml_collections.ConfigDict()
    c.run_variants = ""  # comma-separated subset of variants ("" = all)
    return c


def _fail(message: str) -> None:
    raise ConfigError(message)


# ----------------------------------------------------------------------------- recipes


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The resolved training-recipe options of one run (docs/method.md §13): every option the config
    leaves at None takes the value of its ``budget.recipe`` (:data:`RECIPES`).

    ``freeze_epoch`` None means never; ``quant_momentum`` is resolved against
    ``optim.momentum``.
    """

    name: str
    clip_quantizer_gradients: bool
    freeze_epoch: float | None
    max_gradient: str
    margin: float
    quant_lr_scale: float
    quant_momentum: float
    quant_update: str
    bn_recalibration: int


#: What each ``budget.recipe`` sets for the options a config leaves at None.
#:
#: ``paper`` is the authors' code exactly (docs/method.md §6): the ±d clip while a budget is active,
#: θ trained like the weights, the max's gradient to its first argmax, no margin, no freeze,
#: BatchNorm statistics as training left them.
#:
#: ``mpdnn`` (ours) was chosen in the budget study (``scripts/budget_study.py``): the
#: candidates on seed 0's validation split are in ``results/budget_study_exploration.json``,
#: the three-seed result in ``results/budget_study.md``.
#:
#: * ``quant_update = "log"``, ``quant_lr_scale = 0.3``, ``quant_momentum = 0``,
#:   ``clip_quantizer_gradients = False``: θ take SGD steps on log θ at 0.3× the weights'
#:   learning rate, without momentum (:func:`mpdnn.optim.sgd_log_space`). The authors' ±d
#:   clip saturates as soon as a budget is violated by a few bytes, so every layer moves at
#:   the same rate whatever its size or the violation: a sign-only controller, which before
#:   the freeze flipped bits ~340 times an epoch and sat within budget in 22 % of the steps.
#:   A step on log θ is relative like the clipped one but proportional to the gradient, so
#:   the penalty pulls hardest on the layers that cost most per bit: 65 flips an epoch,
#:   within budget in 87 % of the steps, validation error 30.98 % against 31.92 % (the same
#:   freeze and margin); 31.60 % at scale 1.0. Momentum would carry θ across the bit
#:   boundaries it should stop at. A run without a budget keeps the paper's θ update.
#: * ``method`` stays ``"penalty"``: the Lagrangian with the same update tied it on
#:   validation (30.98 %) and flipped bits 4.6× as often before the freeze. Its λ is
#:   ``RELATIVE_STRENGTH / L²`` (``budget.strength`` unset): the paper's 0.1 at the study's
#:   25.7 KB budget.
#: * ``freeze_epoch = "first_decay"``: search at the high learning rate, freeze θ at the
#:   first feasible step once the learning rate first drops (the first of
#:   ``optim.decay_epochs`` within the run; half the run without one), then fine-tune the
#:   weights on a grid that no longer moves. The final model is the delivered one and
#:   meets every budget by construction. Only runs with a budget freeze by default. Ranges
#:   freeze with the bits: with a power-of-two step a range change at fixed bits is a jump
#:   of d by an octave, as disruptive as a bit flip.
#: * ``margin = 0.02``: the penalty aims 2 % below each limit, so a search that settles
#:   chatters inside the feasible set and a feasible step to freeze at comes at once (not
#:   measured apart from the rest: every candidate above had it).
#: * ``max_gradient = "all"``: every activation tensor over the act-max limit is pushed
#:   down at once; with ``"first"`` one tensor at a time is, while the cross-entropy pushes
#:   all of them up.
#: * ``bn_recalibration = 20`` batches: a bit flip changes a layer's grid at once while
#:   BatchNorm's running statistics still describe the old one.
RECIPES: dict[str, dict[str, object]] = {
    "paper": dict(
        clip_quantizer_gradients=True,
        freeze_epoch=None,
        max_gradient="first",
        margin=0.0,
        quant_lr_scale=1.0,
        quant_momentum=None,
        quant_update="linear",
        bn_recalibration=0,
        strength=0.1,
    ),
    "mpdnn": dict(
        clip_quantizer_gradients=False,
        freeze_epoch="first_decay",
        max_gradient="all",
        margin=0.02,
        quant_lr_scale=0.3,
        quant_momentum=0.0,
        quant_update="log",
        bn_recalibration=20,
        strength="relative",
    ),
}
#: mpdnn's λ·L² (``budget.strength`` None): the penalty λ·max(0, S − L)² in KB pulls on θ
#: as λ·L²·(violation / L) · (share of L per bit), so λ·L² fixed gives the same pull on a
#: relative violation whatever the model's size; the paper's λ = 0.1 does at 70 KB only
#: (their ImageNet λ, scaled by the squared size ratio, is the same rule). 64 is λ = 0.1 at
#: the budget study's 25.7 KB, where the update was chosen.
RELATIVE_STRENGTH = 64.0
MAX_GRADIENTS = ("first", "all")

# The options of the budget search: a run without a budget takes the paper's.
_SEARCH_KEYS = ("clip_quantizer_gradients", "quant_lr_scale", "quant_momentum", "quant_update")

# (config section, key) of each recipe option.
_RECIPE_KEYS = {
    "clip_quantizer_gradients": "budget",
    "freeze_epoch": "budget",
    "max_gradient": "budget",
    "margin": "budget",
    "quant_lr_scale": "optim",
    "quant_momentum": "optim",
    "quant_update": "optim",
    "bn_recalibration": "train",
}


def recipe(config: ml_collections.ConfigDict) -> Recipe:
    """The recipe options of ``config``: its own where set, else its ``budget.recipe``'s."""
    name = config.budget.get("recipe", "paper")
    if name not in RECIPES:
        _fail(f"budget.recipe={name!r} is unknown; expected {' or '.join(RECIPES)}")
    values = {}
    budgeted = bool(budgets(config))
    for key, section in _RECIPE_KEYS.items():
        value = config[section].get(key)
        if value is None:
            # θ's own update is for the budget search: without a budget, the paper's.
            own = budgeted or key not in _SEARCH_KEYS
            value = RECIPES[name if own else "paper"][key]
        values[key] = value
    freeze = values["freeze_epoch"]
    if freeze == "first_decay":
        # Only a run with a budget has something to search for before it freezes.
        epochs = config.train.epochs
        decays = [int(e) for e in config.optim.decay_epochs if 0 < int(e) < epochs]
        if not budgets(config):
            freeze = None
        else:
            freeze = float(min(decays)) if decays else epochs / 2
    elif freeze is not None and float(freeze) < 0:
        freeze = None
    if values["quant_momentum"] is None:
        values["quant_momentum"] = config.optim.momentum
    return Recipe(
        name=name,
        clip_quantizer_gradients=bool(values["clip_quantizer_gradients"]),
        freeze_epoch=None if freeze is None else float(freeze),
        max_gradient=str(values["max_gradient"]),
        margin=float(values["margin"]),
        quant_lr_scale=float(values["quant_lr_scale"]),
        quant_momentum=float(values["quant_momentum"]),
        quant_update=str(values["quant_update"]),
        bn_recalibration=int(values["bn_recalibration"]),
    )


def _check_recipe(config: ml_collections.ConfigDict) -> Recipe:
    r = recipe(config)
    if r.max_gradient not in MAX_GRADIENTS:
        _fail(f"budget.max_gradient={r.max_gradient!r} is unknown; expected first or all")
    _check_optim_options(config, r)
    if r.bn_recalibration < 0:
        _fail(f"train.bn_recalibration={r.bn_recalibration} must be >= 0 batches (0: off)")
    explicit = config.budget.get("freeze_epoch")
    if explicit is not None and explicit > config.train.epochs:
        _fail(
            f"budget.freeze_epoch={explicit:g} is after the last epoch "
            f"({config.train.epochs}); a negative value never freezes"
        )
    return r


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
    """Quantization rules: ``quant.layer_rules`` first (in name order), then one per kind
    matching every site (float kinds get none)."""
    out = []
    kinds = {"weight": config.quant.weights, "activation": config.quant.activations}
    for name, r in sorted(config.quant.get("layer_rules", {}).items()):
        r = dict(r)
        pattern, kind = r.pop("pattern", None), r.pop("kind", None)
        if kind not in kinds or not isinstance(pattern, str):
            _fail(
                f"quant.layer_rules.{name} needs a 'pattern' (a regex) and a 'kind' "
                "(weight or activation)"
            )
        c = ml_collections.ConfigDict(kinds[kind].to_dict())
        try:
            c.update(r)
        except (KeyError, AttributeError, TypeError) as err:
            _fail(f"quant.layer_rules.{name}: {err}")
        qc = quant_config(c, f"layer_rules.{name}")
        try:
            out.append(Rule(pattern, qc, kind=kind))
        except ValueError as err:
            _fail(f"quant.layer_rules.{name}: {err}")
    for kind, c in kinds.items():
        qc = quant_config(c, f"{kind}s")
        if qc.quantized:
            out.append(Rule(".*", qc, kind=kind))
    return out


def logit_scale(config: ml_collections.ConfigDict) -> bool:
    """Whether the run wraps its model in :class:`~mpdnn.nn.LogitScale`."""
    if config.model.logit_scale is not None:
        return bool(config.model.logit_scale)
    return any(r.config.family == "pow2" for r in rules(config))


def strength(config: ml_collections.ConfigDict, size: str, limit_kb: float) -> float:
    """λ of one budget: ``budget.strengths[size]`` when set, else ``budget.strength``, else
    the recipe's: the paper's 0.1, or ours, ``RELATIVE_STRENGTH / limit_kb²``."""
    if size in config.budget.strengths:
        return float(config.budget.strengths[size])
    if config.budget.get("strength") is not None:
        return float(config.budget.strength)
    default = RECIPES[recipe(config).name]["strength"]
    return float(default) if default != "relative" else RELATIVE_STRENGTH / limit_kb**2


def budgets(config: ml_collections.ConfigDict) -> dict[str, float]:
    """``{size: limit_kb}`` of the budgets set (none: empty); :func:`check` judges them."""
    return {
        n: float(getattr(config.budget, n)) for n in SIZES if getattr(config.budget, n) is not None
    }


def _check_optim_options(config: ml_collections.ConfigDict, r: Recipe) -> None:
    """The optimizer's options, judged by :func:`mpdnn.optim.check_options` (the one home of
    their rules) and reported under the config's own keys."""
    limits = budgets(config)
    terms = [
        optim.Budget(s, v, strength(config, s, v) if v > 0 else 0.0, r.margin)
        for s, v in limits.items()
    ]
    try:
        optim.check_options(
            terms,
            method=config.budget.method,
            quant_learning_rate_scale=r.quant_lr_scale,
            quant_momentum=r.quant_momentum,
            quant_update=r.quant_update,
        )
    except optim.OptionError as e:
        size = e.subject
        keys = {
            "method": "budget.method",
            "quant_update": "optim.quant_update",
            "quant_learning_rate_scale": "optim.quant_lr_scale",
            "quant_momentum": "optim.quant_momentum",
            "margin": "budget.margin",
            "limit_kb": f"budget.{size}",
            "strength": f"budget.strengths.{size}"
            if size in config.budget.strengths
            else "budget.strength",
        }
        hint = " (leave it unset for no budget)" if e.name == "limit_kb" else ""
        _fail(f"{keys[e.name]}={e.value!r} must be {e.rule}{hint}")


def check(config: ml_collections.ConfigDict) -> None:
    """Reject bad input with one :class:`ConfigError` line, before any work starts."""
    if config.model.name not in MODELS:
        _fail(f"model.name={config.model.name!r} is unknown; known: {', '.join(sorted(MODELS))}")
    if config.data.name not in DATASETS:
        _fail(f"data.name={config.data.name!r} is unknown; known: {', '.join(DATASETS)}")
    rules(config)
    if config.init.from_workdir and config.init.get("torchvision"):
        _fail("init.from_workdir and init.torchvision both start the model: set one")
    _check_recipe(config)
    for key in ("validation_size", "train_size"):
        value = config.data.get(key, 0)
        if not (isinstance(value, int) and value >= 0):
            _fail(f"data.{key}={value!r} must be an integer >= 0")
    every = config.train.eval_feasible_every
    if not (isinstance(every, int) and every >= 0):
        _fail(f"train.eval_feasible_every={every!r} must be an integer >= 0 steps (0: off)")
    for name in config.budget.strengths:  # their values: with the budgets, in _check_recipe
        if name not in SIZES:
            _fail(f"budget.strengths.{name} is not a size; expected one of {', '.join(SIZES)}")
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


def key_meanings() -> dict[str, str]:
    """``{dotted key: one-line meaning}`` of the schema, read from the comments beside (or
    above) each key in :func:`base_config` and :func:`quantizer_config`: the comments are
    the documentation, so ``--help`` cannot drift from them."""
    import inspect
    import re

    out = {f"budget.{s}": "a budget on this size in KB; None: no budget" for s in SIZES}
    for kind in ("weights", "activations"):
        for r in RANGES:
            out[f"quant.{kind}.{r}"] = "the box of this θ; None: the authors' (docs/method.md §2)"
    sources = ((base_config, ("",)), (quantizer_config, ("quant.weights.", "quant.activations.")))
    for fn, prefixes in sources:
        above: list[str] = []
        for line in inspect.getsource(fn).splitlines():
            text = line.strip()
            if text.startswith("#"):
                above.append(text.lstrip("#").strip())
                continue
            m = re.match(r"c\.([\w.]+) = [^#]*(?:#\s*(.*))?$", text)
            if m and not m.group(1).endswith(("weights", "activations")):
                meaning = m.group(2) or " ".join(above)
                for prefix in prefixes:
                    out.setdefault(prefix + m.group(1), meaning)
            above = []
    return out


def describe(config: ml_collections.ConfigDict, width: int = 100) -> str:
    """Every key of ``config`` (variants aside) with its value and meaning, a line each."""
    import json
    import textwrap

    meanings = key_meanings()
    values = _flat(json.loads(config.to_json()))
    lines = []
    for key, value in values.items():
        if key.startswith("variants."):
            continue
        head = f"  {key} = {json.dumps(value)}"
        meaning = meanings.get(key, "")
        if meaning:
            room = max(30, width - len(head) - 4)
            head += "  # " + textwrap.shorten(meaning, room, placeholder=" …")
        lines.append(head)
    return "\n".join(lines)


#: Keys that may differ between a run and its resumption: they change no number it computes.
RESUME_FREE = ("train.progress", "train.resume_changes", "data.dir", "variants", "run_variants")

#: Keys that lay out the saved state, so a run cannot resume under another value even when
#: ``train.resume_changes`` allows it; the value a config saved before the key existed had.
RESUME_FIXED = {"optim.flat_update": False}


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def check_resume(saved: Mapping[str, Any], config: ml_collections.ConfigDict) -> list[str]:
    """Refuse (one :class:`ConfigError` line naming the keys) to continue a run saved with
    config ``saved`` (its ``config.json``) under a different ``config``, but for
    :data:`RESUME_FREE` keys and those ``train.resume_changes`` lists; returns the keys that
    changed and were allowed. Keys only one side has (another mpdnn version) are not
    compared, but for the :data:`RESUME_FIXED` ones, which never change."""
    import json

    old, new = _flat(dict(saved)), _flat(json.loads(config.to_json()))
    for key, before in RESUME_FIXED.items():
        if old.get(key, before) != new.get(key, before):
            _fail(
                f"{key} cannot change when a run resumes ({old.get(key, before)!r} -> "
                f"{new.get(key, before)!r}): the saved optimizer state is laid out by it; "
                "rerun with its value or use another --workdir"
            )
    allowed = [k.strip() for k in config.train.get("resume_changes", "").split(",") if k.strip()]

    def under(key: str, prefixes: Sequence[str]) -> bool:
        return any(key == p or key.startswith(p + ".") for p in prefixes)

    changed = sorted(
        k for k in old.keys() & new.keys() if old[k] != new[k] and not under(k, RESUME_FREE)
    )
    refused = [k for k in changed if not under(k, allowed)]
    if refused:
        shown = "; ".join(f"{k}: {old[k]!r} -> {new[k]!r}" for k in refused[:4])
        more = f" (and {len(refused) - 4} more)" if len(refused) > 4 else ""
        _fail(
            f"this workdir holds a run of another config ({shown}{more}): rerun with its "
            f"config, use another --workdir, or allow it with "
            f"--config.train.resume_changes={','.join(refused)}"
        )
    return changed


def _get_path(config: ml_collections.ConfigDict, key: str) -> Any:
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def _set_path(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[last] = value


def _variant_names(config: ml_collections.ConfigDict) -> list[str]:
    return [n.strip() for n in config.run_variants.split(",") if n.strip()]


def variants(
    config: ml_collections.ConfigDict, pinned: Sequence[str] = ()
) -> dict[str, ml_collections.ConfigDict]:
    """``{name: config}`` of every run a config asks for: its variants (each the base with
    the variant's overrides merged in), or the config itself as ``{"": config}``.

    ``pinned``: dotted keys whose value in ``config`` wins over every variant's, the keys a
    command line set (``--config.budget.weight_kb=4`` reaches the variants that set their
    own budget too). One variant alone: ``--config.variants.<name>.<key>=``.

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
        for key in pinned:
            if not key.startswith(("variants", "run_variants")):
                _set_path(run, key, _get_path(config, key))
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


def schedule_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
    """Total training steps: every epoch's, or ``train.max_steps`` when it is fewer."""
    total = steps_per_epoch * config.train.epochs
    if config.train.max_steps > 0:
        total = min(total, config.train.max_steps)
    return total


def schedule(config: ml_collections.ConfigDict, num_train: int) -> Schedule:
    steps_per_epoch = num_train // config.train.batch_size
    if steps_per_epoch < 1:
        _fail(
            f"train.batch_size={config.train.batch_size} is larger than the training set "
            f"({num_train} images)"
        )
    total = schedule_steps(config, steps_per_epoch)
    return Schedule(
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        eval_every_steps=steps_per_epoch * max(1, config.train.eval_every_epochs),
        checkpoint_every_steps=steps_per_epoch * max(1, config.train.checkpoint_every_epochs),
    )
