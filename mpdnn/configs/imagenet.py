"""ImageNet rows of the paper's Table 4 (docs/method.md §9): ResNet-18 and MobileNetV2, as configs.

Five rows per network — float, fixed 4/4, TQT 4/4, ours under a weight + max-activation
budget, ours without a budget — run as ``experiments/imagenet.py:row=<row>``.

**The recipe is ours**: the paper never published its ImageNet one (docs/method.md §8). What it
states, and what we decided from it:

* *Start from pretrained float nets*: every row starts from torchvision's float weights
  (``init.torchvision``, a ``state_dict`` file on disk; :mod:`mpdnn.models.convert`). The
  float row only fine-tunes them with the same schedule (a control for the schedule itself);
  ``train.epochs=0`` evaluates them as they are.
* *λ scaled by the square of the size ratio to CIFAR-10*: the penalty is λ·max(0, g)² with
  sizes in KB, so a violation of the same *relative* size costs the same when
  λ_ImageNet = λ_CIFAR · (budget_CIFAR / budget_ImageNet)², per budget: λ_CIFAR = 0.1,
  budget_CIFAR = 70.1 KB (weights) and 8.1 KB (max activation). MobileNetV2: λ_w = 1.7e-4,
  λ_a = 1.9e-5; ResNet-18: λ_w = 1.5e-5, λ_a = 4.3e-5 (computed below, not typed).
* *Budgets*: the fixed 4/4 network's sizes, exactly (docs/method.md §9 rounds them to 1.65 MB /
  0.57 MB and 5.57 MB / 0.38 MB): MobileNetV2 1694.71 KB of weights and 588 KB for its
  largest activation (96×112×112 at 4 bits), ResNet-18 5703.08 KB and 392 KB (64×112×112).
  Ours must be no larger than the fixed 4-bit network; the paper's learned models came out
  at 1.55 MB and 5.40 MB.
* *Schedule*: 30 epochs of SGD (NNabla momentum 0.9), lr 0.01 at a global batch of 256
  (scaled linearly with the batch), ÷10 after epochs 15 and 23 — the CIFAR-10 recipe's shape
  (drops at 50 % and 75 % of training) over a fine-tuning length. Quantized nets learn from
  4 bits. At the paper's 37 min per MobileNetV2 epoch on four V100s, 30 epochs is 18.5 h.
* *Weight decay*: torchvision's own for each net (1e-4 ResNet-18, 4e-5 MobileNetV2), applied
  to every parameter as the authors do on CIFAR-10 (docs/method.md §6).
* *Data*: ``imagenet2012`` from a prepared tfds data_dir (``data.dir``); Inception-style
  random-resized crop + flip for training, resize-256/center-crop-224 for evaluation,
  torchvision's mean/std (:mod:`mpdnn.data.imagenet`).
* *Compute*: bfloat16 conv/linear operands with float32 accumulation
  (``model.compute_dtype``): exact for the quantized layers (≤ 8 bits, see
  :func:`mpdnn.nn.set_compute_dtype`), the usual mixed precision for float ones.
* Evaluation every epoch; checkpoints every epoch (an epoch is long).

Protocols (``protocol=<p>`` in the config argument): ``full`` (the default, as above) and
``smoke`` (synthetic 64×64 images, 10 classes, batch 8, 2 steps; no pretrained file), which
checks a row end to end on any machine.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from mpdnn.configs.common import parse_options, set_quantizers, two_steps
from mpdnn.training.config import ConfigError, base_config

CIFAR_LAMBDA = 0.1
CIFAR_BUDGETS_KB = {"weight_kb": 70.1, "act_max_kb": 8.1}
PROTOCOLS = ("full", "smoke")

#: Per network: the fixed 4/4 sizes in KB (our accounting, docs/method.md §5 units), the paper's
#: Table 4 errors (float, fixed, TQT, ours with budget, ours without), weight decay.
NETWORKS = {
    "mobilenet_v2": {
        "budgets_kb": {"weight_kb": 1694.70703125, "act_max_kb": 588.0},
        "paper": (29.82, 36.27, 32.21, 30.26, 29.41),
        "paper_sizes": (
            "13.23 MB / 4.59 MB",
            "1.65 / 0.57",
            "1.65 / 0.57",
            "1.55 / 0.57",
            "3.14 / 1.58",
        ),
        "weight_decay": 4e-5,
    },
    "resnet18": {
        "budgets_kb": {"weight_kb": 5703.08203125, "act_max_kb": 392.0},
        "paper": (29.72, 34.15, 30.49, 29.92, 29.34),
        "paper_sizes": (
            "44.56 MB / 3.04 MB",
            "5.57 / 0.38",
            "5.57 / 0.38",
            "5.40 / 0.38",
            "10.50 / 1.05",
        ),
        "weight_decay": 1e-4,
    },
}
METHODS = ("float", "fixed_w4a4", "tqt_w4a4", "ours_budget", "ours_nobudget")
TITLES = {
    "float": "float32",
    "fixed_w4a4": "fixed 4/4",
    "tqt_w4a4": "TQT 4/4 (learned range, fixed bits)",
    "ours_budget": "ours, weight + max-activation budget",
    "ours_nobudget": "ours, no budget",
}


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    network: str
    method: str
    paper_error: float
    paper_sizes: str

    @property
    def title(self) -> str:
        return f"{self.network}, {TITLES[self.method]}"


ROWS: dict[str, Row] = {
    f"{net}_{method}": Row(f"{net}_{method}", net, method, spec["paper"][i], spec["paper_sizes"][i])
    for net, spec in NETWORKS.items()
    for i, method in enumerate(METHODS)
}


def strengths(network: str) -> dict[str, float]:
    """λ per budget: λ_CIFAR · (budget_CIFAR / budget)² (docs/method.md §8's statement, our
    reading).
    """
    budgets = NETWORKS[network]["budgets_kb"]
    return {k: CIFAR_LAMBDA * (CIFAR_BUDGETS_KB[k] / v) ** 2 for k, v in budgets.items()}


def row_config(name: str, protocol: str = "full") -> ml_collections.ConfigDict:
    """The config of row ``name`` (see :data:`ROWS`) under ``protocol`` (:data:`PROTOCOLS`)."""
    if name not in ROWS:
        raise ConfigError(f"unknown ImageNet row {name!r}; known: {', '.join(ROWS)}")
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown ImageNet protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    row = ROWS[name]
    net = NETWORKS[row.network]
    c = base_config()
    c.name = f"imagenet/{name}"
    c.model.name = row.network
    c.model.compute_dtype = "bfloat16"
    c.data.name = "imagenet"
    c.data.augment = True  # Inception crop + flip on the host (mpdnn.data.imagenet)
    c.init.torchvision = f"pretrained/{row.network}.pth"
    c.optim.learning_rate = 0.01
    c.optim.weight_decay = net["weight_decay"]
    c.optim.decay_epochs = (15, 23)
    c.train.epochs = 30
    c.train.batch_size = 256
    c.train.eval_batch_size = 250
    c.train.steps_per_call = 8  # host-decoded batches: a call stacks this many
    c.train.checkpoint_every_epochs = 1
    # The authors' update (their λ rule); --config.budget.recipe=mpdnn for ours.
    if row.method == "float":
        set_quantizers(c)
    else:
        mode = "learned" if row.method.startswith("ours") else row.method.split("_")[0]
        q = {"mode": mode, "bits": 4}
        budgets = net["budgets_kb"] if row.method == "ours_budget" else {}
        set_quantizers(c, weights=q, activations=q, budgets=budgets)
        if budgets:
            c.budget.strengths = strengths(row.network)
    if protocol == "smoke":
        c.data.name = "synthetic"
        c.data.synthetic_shape = (64, 64, 3)
        c.data.synthetic_train = 32
        c.data.synthetic_test = 16
        c.data.augment = False
        c.init.torchvision = None
        two_steps(c, batch_size=8, eval_batch_size=8)
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """``experiments/imagenet.py:row=<row>[,protocol=full|smoke]``."""
    options = parse_options(
        arg, "experiments/imagenet.py", {"row": ROWS, "protocol": PROTOCOLS}, {"protocol": "full"}
    )
    return row_config(options["row"], options["protocol"])


def command(name: str) -> str:
    """The command that trains row ``name`` (the data and the pretrained file are yours)."""
    return (
        f"python -m mpdnn.train --config experiments/imagenet.py:row={name} "
        f"--workdir runs/imagenet/{name} --config.data.dir=<tfds data_dir> "
        f"--config.init.torchvision=<torchvision {ROWS[name].network} state_dict .pth>"
    )


def listing() -> str:
    """Every row: its title, the paper's Table 4 numbers and the command that trains it.

    No ImageNet row has been trained by mpdnn yet (it needs the data and an accelerator);
    ``results/perf.md`` holds what was measured of these networks (throughput)."""
    lines = []
    for row in ROWS.values():
        lines += [
            f"{row.name}  (Table 4) {row.title}",
            f"  paper    {row.paper_error:.2f} % top-1 error, weights / max activation "
            f"{row.paper_sizes}",
            f"  command  {command(row.name)}",
            "  ours     not trained yet",
        ]
    return "\n".join(lines)
