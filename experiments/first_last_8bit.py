r"""ResNet-20 on CIFAR-10 with the first conv and the classifier fixed at 8 bits, the rest
learned: the README's rules ("Quantizing a network") as a training config.

The README's Python rules, first match wins::

    nn.Rule("stem|head", nn.QuantConfig(mode="fixed", bits=8)),
    nn.Rule(".*", nn.QuantConfig(bits=2), kind="weight"),
    nn.Rule(".*", nn.QuantConfig(bits=4), kind="activation"),

are ``quant.layer_rules`` ``ends_w`` and ``ends_a`` (the first rule, which has no kind, for
each kind; in ResNet-20 only the stem conv and the head linear match it: the activation
after the stem is ``stem_act``), then ``quant.weights`` (U3 learned from 2 bits, step from the
float weights, docs/method.md §4) and ``quant.activations`` (U3 learned from 4 bits,
unsigned). ``tests/test_report.py`` checks that both give the same quantizer per tensor.

Sizes at the start (docs/method.md §5): 432 + 650 weights at 8 bits and 267,264 at 2 bits,
66.31 KB; activations at 4 bits, 8 KB max and 92 KB summed. No budget: the learned bits
move where the loss takes them. The rest is docs/method.md §8's CIFAR-10 recipe
(:func:`mpdnn.training.config.base_config`: 160 epochs, lr ÷ 10 after 80 and 120, batch 128)
started from the float ResNet-20 beside the workdir (``init.from_workdir = "float"``) at the
quantized learning rate 0.03, as the float-net init rows of Table 1; ``budget.recipe`` is the
default, mpdnn's (without a budget only its BatchNorm recalibration before every evaluation
differs from the paper's). Not trained yet: no result is recorded for it.

    python -m mpdnn.train --config experiments/cifar10.py:row=float --workdir runs/cifar10/float
    python -m mpdnn.train --config experiments/first_last_8bit.py \
        --workdir runs/cifar10/first_last_8bit
    python -m mpdnn.report --config experiments/first_last_8bit.py   # the initial bits

``:smoke``: 2 steps on 10 images per class from a fresh float net (tests).
"""

import ml_collections

from mpdnn.configs.common import two_steps
from mpdnn.training.config import ConfigError, base_config, quantizer_config

ENDS = "stem|head"  # the first conv and the classifier (kernel and bias)


def get_config(arg=None) -> ml_collections.ConfigDict:
    if arg not in (None, "", "smoke"):
        raise ConfigError(f"unknown argument {arg!r} for first_last_8bit; expected smoke")
    c = base_config()
    c.name = "cifar10/first_last_8bit"
    c.quant.weights = quantizer_config("learned", bits=2)
    c.quant.activations = quantizer_config("learned", bits=4)
    c.quant.layer_rules = {
        f"ends_{kind[0]}": {"pattern": ENDS, "kind": kind, "mode": "fixed", "bits": 8}
        for kind in ("weight", "activation")
    }
    c.init.from_workdir = "float"
    c.optim.learning_rate = 0.03
    c.train.steps_per_call = 390  # one epoch per jitted call (capped at epoch ends)
    c.train.checkpoint_every_epochs = 10
    if arg == "smoke":
        c.init.from_workdir = None  # no float run beside a test's workdir
        c.data.max_per_class = 10
        two_steps(c, batch_size=32, eval_batch_size=100)
    return c
