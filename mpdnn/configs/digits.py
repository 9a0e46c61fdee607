"""The default experiment: float vs fixed 2-bit vs learned mixed precision on real digits.

What ``python -m mpdnn.train`` runs with no flags. scikit-learn's 8×8 digits (1,797 real
images; 1,437 train / 360 test), a small CNN (:class:`mpdnn.models.SmallCNN`: three conv
blocks 16/32/32 and a linear head, 14,298 weights), three runs side by side, as the paper's
Table 3 does for ResNet-20:

* ``float``: the float network (lr 0.1, 30 epochs);
* ``fixed``: every weight tensor fixed at 2 bits (uniform, step from the float weights,
  docs/method.md §4), fine-tuned from ``float``;
* ``learned``: U3 (d, qmax) weights started at 4 bits from ``float``, bits learned under a
  weight budget of 3.75 KB, 7% above the fixed 2-bit network's 3.49 KB (the paper's 70 KB
  vs 65.5 KB), enforced by the penalty λ·max(0, g)² (docs/method.md §6).

Activations stay float (Table 3's "/32" rows). Expected: the learned network meets its
budget and is at least as accurate as the fixed one, both a little below float.

    python -m mpdnn.train                               # all three, about a minute on a CPU
    python -m mpdnn.train --config mpdnn/configs/digits.py:smoke --workdir /tmp/d
    python -m mpdnn.train --config.run_variants=learned --config.budget.weight_kb=4

The last reruns only ``learned`` (from ``runs/digits/float``) under a 4 KB budget: a
``--config.<key>`` on the command line wins over what a variant sets, for every variant run;
``--config.variants.learned.budget.weight_kb=4`` changes that variant alone.
"""

from __future__ import annotations

import ml_collections

from mpdnn.configs.common import two_steps
from mpdnn.training.config import base_config

#: 2 bits × 14,298 weights = 3.4907 KB; the budget leaves the learned run 7% more.
WEIGHT_BUDGET_KB = 3.75


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = base_config()
    c.name = "digits"
    c.model.name = "small_cnn"
    c.model.widths = (16, 32, 32)
    c.data.name = "digits"
    c.data.augment = False  # 8×8 images: a 4-pixel crop would remove half of every digit
    c.train.epochs = 30
    c.train.batch_size = 64
    c.train.eval_batch_size = 360
    c.train.steps_per_call = 4
    c.train.eval_every_epochs = 5
    c.train.checkpoint_every_epochs = 5
    c.optim.learning_rate = 0.1
    c.optim.decay_epochs = (20, 25)

    # Both quantized runs start from the float one; docs/method.md §8: quantized nets fine-tune at
    # 0.03.
    quantized = {
        "init": {"from_workdir": "float"},
        "optim": {"learning_rate": 0.03, "decay_epochs": (12, 16)},
    }
    c.variants = {
        "float": {},
        "fixed": {
            **quantized,
            "quant": {"weights": {"mode": "fixed", "bits": 2}},
            "train": {"epochs": 20},
        },
        "learned": {
            **quantized,
            "quant": {"weights": {"mode": "learned", "bits": 4}},
            "budget": {"weight_kb": WEIGHT_BUDGET_KB},
            "train": {"epochs": 20},
        },
    }
    if arg == "smoke":
        two_steps(c)
        for name in ("fixed", "learned"):
            c.variants[name].train.epochs = 1
    elif arg:
        raise ValueError(f"unknown digits config argument {arg!r}; expected 'smoke' or none")
    return c
