"""ResNet-20 on CIFAR-10 with SPEC §8's recipe: the float net and two budgeted U3 rows.

``:arg`` is a comma-separated list: at most one setting and any modifiers (``:smoke`` alone
is the float setting's smoke run).

Settings (SPEC §9 Table 3, uniform column; the paper's errors are on the original images,
ours on the lossy JPEG copy of ../shared/data, SPEC §11: compare methods, not absolutes):

* ``float`` (default): float ResNet-20, lr 0.1, 160 epochs. Paper: 7.29 % error.
* ``ours_w``: U3 weights learned under a 70.1 KB weight budget, activations float, from the
  float net (``init.from_workdir``, default ``float`` beside this run's workdir), lr 0.03.
  Paper: 8.59 %.
* ``ours_w_amax``: U3 weights (70.1 KB) and U3 activations started at 4 bits under an 8.1 KB
  max-activation budget. Paper: 8.58 %.

Modifiers:

* ``smoke``: 10 images per class, batch 32, 2 steps: checks the pipeline end to end (CI).
* ``reduced``: 500 images per class (10 % of the training set), 15 epochs with the lr drops
  at 8 and 12: minutes on a CPU, for orderings only.

Data: the shared copy (``--config.data.dir=../shared/data/cifar10-jpeg.tar.gz``, found
automatically when it sits there) or a prepared tfds data_dir. Commands::

    python -m mpdnn.train --config experiments/cifar10_resnet20.py:float --workdir runs/c10/float
    python -m mpdnn.train --config experiments/cifar10_resnet20.py:ours_w --workdir runs/c10/ours_w
    python -m mpdnn.train --config experiments/cifar10_resnet20.py:float,smoke --workdir /tmp/s

A full 160-epoch run is GPU work (about 11 h on a 2-core CPU); see issue 5 for the tables.
"""

from __future__ import annotations

import ml_collections

from mpdnn.training.config import base_config

SETTINGS = ("float", "ours_w", "ours_w_amax")
MODIFIERS = ("smoke", "reduced")
WEIGHT_BUDGET_KB = 70.1  # SPEC §8
ACT_MAX_BUDGET_KB = 8.1


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    words = [w for w in (arg or "").split(",") if w]
    modifiers = [w for w in words if w in MODIFIERS]
    settings = [w for w in words if w not in MODIFIERS] or ["float"]
    setting = settings[0]
    if len(settings) > 1 or setting not in SETTINGS:
        raise ValueError(
            f"unknown argument {arg!r}; expected one of {SETTINGS} then any of {MODIFIERS}"
        )
    c = base_config()  # SPEC §8: ResNet-20, batch 128, 160 epochs, lr/10 at 80 and 120
    c.name = f"cifar10_resnet20_{setting}"
    if setting != "float":
        c.init.from_workdir = "float"
        c.optim.learning_rate = 0.03
        c.quant.weights.mode = "learned"
        c.quant.weights.bits = 4
        c.budget.weight_kb = WEIGHT_BUDGET_KB
    if setting == "ours_w_amax":
        c.quant.activations.mode = "learned"
        c.quant.activations.bits = 4
        c.budget.act_max_kb = ACT_MAX_BUDGET_KB
    if "reduced" in modifiers:
        c.data.max_per_class = 500
        c.train.epochs = 15
        c.optim.decay_epochs = (8, 12)
    if "smoke" in modifiers:
        c.data.max_per_class = 10
        c.train.batch_size = 32
        c.train.eval_batch_size = 100
        c.train.epochs = 1
        c.train.max_steps = 2
        c.train.steps_per_call = 1
    return c
