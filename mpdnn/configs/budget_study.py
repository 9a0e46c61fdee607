"""The budget study: does a learned mixed precision beat uniform precision at equal memory?

The arms of ``scripts/budget_study.py`` (results in ``results/budget_study.md``), every one a
config of this registry, run as ``experiments/budget_study.py:<arm>,seed=<s>``. The setting
is sized for a 2-core CPU (the whole study in well under 75 minutes) and for differences of
a point or two to show above the noise of three seeds:

* **data**: the CIFAR-10 JPEG copy (docs/method.md §11); 5,000 training images held out as the
  validation split (stratified, a fixed seed), 20,000 of the rest trained on, the **full
  10,000 test images** for every reported error;
* **model**: :class:`mpdnn.models.SmallCNN` with widths 16/32/64/128 (four conv blocks, the
  last three at stride 2, and a linear head): 98,490 weights in six tensors of 432 to 73,728
  values, so a bit costs 0.05 KB in the first conv and 9 KB in the last: a real allocation
  problem. Four activation tensors of 16,384 / 8,192 / 4,096 / 2,048 values;
* **float**: 15 epochs at lr 0.1 (÷ 10 after 8 and 12), batch 64; one per seed;
* **quantized arms**: from their seed's float net, 10 epochs at lr 0.03 (÷ 10 after 5 and
  8; docs/method.md §8's quantized learning rate), batch 64, BatchNorm recalibrated on 20 training
  batches before every evaluation (every arm, so that no arm's error carries stale
  statistics), best models selected on the validation split;
* **budgets** (the paper's ratios, docs/method.md §8): weights 1.07 × the 2-bit network (70.1 / 65.5
  KB in the paper): 25.729 KB; max activation 1.0125 × the 4-bit maximum (8.1 / 8 KB):
  8.1 KB.

Arms (``ARMS``): ``fixed_w2`` (every weight 2 bits, steps from the float weights),
``tqt_w2`` (2 bits, learned range), ``heuristic_w`` (the usual hand-made mixed precision:
first conv and classifier at 8 bits, the rest fixed at 2; 25.30 KB, within the budget),
``paper_w`` / ``mpdnn_w`` (U3 learned from 4 bits under the weight budget, the authors'
recipe / ours); ``fixed_w2a4``, ``tqt_w2a4`` (4-bit activations), ``paper_w_amax`` /
``mpdnn_w_amax`` (weights and activations learned under both budgets), and the
heuristic with 4-bit activations, ``heuristic_w2a4``. Every arm also
records the authors' selection (the lowest test error among evaluations within every
budget, docs/method.md §6), labelled as theirs and never used to choose anything.

``:<arm>,seed=<s>`` picks one run; ``smoke`` (added to the argument) shrinks it to two
steps on 30 images per class (tests).
"""

from __future__ import annotations

import ml_collections

from mpdnn.configs.common import set_quantizers, two_steps
from mpdnn.training.config import base_config

WIDTHS = (16, 32, 64, 128)
CHANNELS, NUM_CLASSES, KERNEL = 3, 10, 3


def _num_weights() -> int:
    """Conv kernels 3×3×in×out, the head's kernel and bias: 98,490 for WIDTHS."""
    total, inputs = 0, CHANNELS
    for width in WIDTHS:
        total += KERNEL * KERNEL * inputs * width
        inputs = width
    return total + inputs * NUM_CLASSES + NUM_CLASSES


#: Activation sites: the output of every conv block, 32×32 at stride 1, then halved.
ACTIVATION_SIZES = tuple((32 // 2**i) ** 2 * w for i, w in enumerate(WIDTHS))
NUM_WEIGHTS = _num_weights()
WEIGHT_BUDGET_KB = round(1.07 * NUM_WEIGHTS * 2 / 8192, 3)  # 1.07 × the 2-bit network
ACT_MAX_BUDGET_KB = round(1.0125 * max(ACTIVATION_SIZES) * 4 / 8192, 3)  # 1.0125 × 4-bit max

HEURISTIC_LAYERS = "blocks.0.conv|head"  # first conv and classifier (kernel and bias)

SEEDS = (0, 1, 2)
FLOAT_EPOCHS, FLOAT_DECAYS = 15, (8, 12)
EPOCHS, DECAYS = 10, (5, 8)

ARMS: dict[str, dict] = {
    "fixed_w2": {"weights": {"mode": "fixed", "bits": 2}},
    "tqt_w2": {"weights": {"mode": "tqt", "bits": 2}},
    "heuristic_w": {
        "weights": {"mode": "fixed", "bits": 2},
        "layer_rules": {
            "ends": {"pattern": HEURISTIC_LAYERS, "kind": "weight", "mode": "fixed", "bits": 8}
        },
    },
    "paper_w": {
        "weights": {"mode": "learned", "bits": 4},
        "budgets": {"weight_kb": WEIGHT_BUDGET_KB},
        "recipe": "paper",
    },
    "mpdnn_w": {
        "weights": {"mode": "learned", "bits": 4},
        "budgets": {"weight_kb": WEIGHT_BUDGET_KB},
        "recipe": "mpdnn",
    },
    "fixed_w2a4": {
        "weights": {"mode": "fixed", "bits": 2},
        "activations": {"mode": "fixed", "bits": 4},
    },
    "tqt_w2a4": {
        "weights": {"mode": "tqt", "bits": 2},
        "activations": {"mode": "tqt", "bits": 4},
    },
    "heuristic_w2a4": {
        "weights": {"mode": "fixed", "bits": 2},
        "activations": {"mode": "fixed", "bits": 4},
        "layer_rules": {
            "ends": {"pattern": HEURISTIC_LAYERS, "kind": "weight", "mode": "fixed", "bits": 8}
        },
    },
    "paper_w_amax": {
        "weights": {"mode": "learned", "bits": 4},
        "activations": {"mode": "learned", "bits": 4},
        "budgets": {"weight_kb": WEIGHT_BUDGET_KB, "act_max_kb": ACT_MAX_BUDGET_KB},
        "recipe": "paper",
    },
    "mpdnn_w_amax": {
        "weights": {"mode": "learned", "bits": 4},
        "activations": {"mode": "learned", "bits": 4},
        "budgets": {"weight_kb": WEIGHT_BUDGET_KB, "act_max_kb": ACT_MAX_BUDGET_KB},
        "recipe": "mpdnn",
    },
}


#: The arms with quantized activations: judged against both budgets.
AMAX_ARMS = tuple(a for a, spec in ARMS.items() if spec.get("activations"))

#: One line for the results table.
SETTING = (
    f"SmallCNN {'/'.join(map(str, WIDTHS))} ({NUM_WEIGHTS:,} weights), 20,000 training "
    f"images, 5,000 held out for validation, the full 10,000 test images; float "
    f"{FLOAT_EPOCHS} epochs at lr 0.1, quantized arms {EPOCHS} epochs at lr 0.03 from it, "
    f"batch 64; budgets {WEIGHT_BUDGET_KB} KB of weights (1.07 × 2 bits) and "
    f"{ACT_MAX_BUDGET_KB} KB max activation (1.0125 × 4 bits); BatchNorm recalibrated on "
    "20 batches before every evaluation, in every arm."
)


def parse(arg: str | None) -> tuple[str, int, bool]:
    """``"<arm>[,seed=<s>][,smoke]"`` → (arm, seed, smoke)."""
    words = [w.strip() for w in (arg or "float").split(",") if w.strip()]
    if words[0] == "smoke":  # ":smoke" alone: the float run (tests/test_experiments.py)
        words.insert(0, "float")
    arm, seed, smoke = words[0], 0, False
    for word in words[1:]:
        if word == "smoke":
            smoke = True
        elif word.startswith("seed="):
            seed = int(word.removeprefix("seed="))
        else:
            raise ValueError(f"budget study argument {word!r}: expected seed=<n> or smoke")
    if arm != "float" and arm not in ARMS:
        raise ValueError(f"unknown budget-study arm {arm!r}; known: float, {', '.join(ARMS)}")
    return arm, seed, smoke


def arm_config(arm: str, seed: int = 0, *, smoke: bool = False) -> ml_collections.ConfigDict:
    """The config of one run of the study (``arm`` one of ``"float"`` or :data:`ARMS`)."""
    c = base_config()
    c.name = f"budget_study/{arm}/seed{seed}"
    c.seed = seed
    c.model.name = "small_cnn"
    c.model.widths = WIDTHS
    c.data.name = "cifar10"
    c.data.validation_size = 5000
    c.data.train_size = 20000
    c.train.batch_size = 64
    c.train.eval_batch_size = 1000
    c.train.steps_per_call = 50
    c.train.checkpoint_every_epochs = 5
    c.train.bn_recalibration = 20
    c.budget.recipe = "paper"
    if arm == "float":
        c.train.epochs, c.optim.decay_epochs = FLOAT_EPOCHS, FLOAT_DECAYS
        c.optim.learning_rate = 0.1
    else:
        spec = ARMS[arm]
        c.init.from_workdir = "float"
        c.train.epochs, c.optim.decay_epochs = EPOCHS, DECAYS
        c.optim.learning_rate = 0.03
        set_quantizers(
            c,
            weights=spec.get("weights"),
            activations=spec.get("activations"),
            budgets=spec.get("budgets"),
            recipe=spec.get("recipe", "paper"),
        )
        c.quant.layer_rules = spec.get("layer_rules", {})
        # The authors' selection, reported apart: the test set at every epoch end and at
        # feasible steps, at most once more an epoch (312 steps of 64).
        c.train.eval_feasible_every = 312
    if smoke:
        c.data.validation_size = 100
        c.data.train_size = 100
        c.data.max_per_class = 30  # 300 train (100 held out, 100 kept) and 300 test images
        two_steps(c, batch_size=50, eval_batch_size=100, steps_per_call=2)
        c.train.bn_recalibration = 2
        if arm != "float":
            c.train.eval_feasible_every = 1
    return c
