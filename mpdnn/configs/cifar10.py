"""The rows of the paper's CIFAR-10 tables (docs/method.md §9, Tables 1 and 3) as configs.

One :class:`Row` per cell the paper reports for ResNet-20: Table 1's float network and its
six parametrizations (weights only, weights and activations; random and float-net init),
and Table 3's fixed, TQT and learned ("ours") networks, uniform and pow2. ``ROWS`` is the
single source of truth; ``experiments/cifar10.py:row=<row>`` is its config file and
``scripts/reproduce_cifar10.py`` runs any of its rows.

Every row uses docs/method.md §8's recipe (:func:`mpdnn.training.config.base_config`): batch
128, 160 epochs, lr ÷ 10 after epochs 80 and 120, SGD momentum 0.9 with NNabla's update,
weight decay 2e-4 on everything, pad-4 crop and flip. Decisions where the paper is silent,
written down here:

* **Float-net init** rows start from the ``float`` row's final model (``init.from_workdir =
  "float"``, beside the row's workdir) at lr 0.03 (docs/method.md §8). **Random-init** rows train
  from scratch like the float net, at its lr 0.1, with weights' steps d0 = 2^-3 (docs/method.md §4).
* Table 1: initial bits 4 for every quantizer, no budget (docs/method.md §9). The b-parametrized
  quantizers (U1, U2, P1, P2) learn b; U3 and P3 infer it.
* Table 3: "fixed" and "TQT" keep the bitwidth of their row (2-bit weights, 4-bit
  activations); fixed takes its steps from the float weights (docs/method.md §4) and does not learn
  them, TQT learns qmax at fixed b (``b_qmax`` with b pinned). "Ours" are U3 / P3 started
  at 4 bits under the paper's budgets (70.1 KB weights, 8.1 KB max or 92.1 KB summed
  activation) with the penalty λ = 0.1.
* Pow2 networks get the authors' learnable logit scale (docs/method.md §6), automatically.
* Every row pins ``budget.recipe = "paper"`` (the authors' update and selection, docs/method.md §6);
  each "ours" row of Table 3 has a twin ``<row>_mpdnn`` with mpdnn's recipe (docs/method.md §13:
  freeze, margin, log-space θ steps, BatchNorm recalibration), reported beside it.
* Checkpoints every 10 epochs (and at the end and on SIGTERM); evaluation every epoch, so
  both the final-epoch and the best-epoch error are known (the authors report the best).

Protocols (``protocol=<p>`` in the config argument; :data:`PROTOCOLS`):

* ``full`` (the default): docs/method.md §8's, as above.
* ``reduced``: the protocol for any machine (docs/method.md §9's orderings on a CPU in well under an
  hour for every row): the first 150 images per class of each split (1,500 train / 1,500
  test), batch 32, the float net 25 epochs (lr ÷ 10 after 12 and 20), float-init rows 2
  epochs, random-init rows 5 epochs (÷ 10 after 4). All 39 paper rows with ``--jobs 2``
  took 56 minutes on a 2-core CPU shared with other jobs (results/cifar10.md). Batch 32
  because this CPU does a ResNet-20 image 1.8× faster at 32 than at 128, and the few
  epochs need the steps.
  Its numbers check orderings only; they are not the paper's protocol.
* ``smoke``: 10 images per class, batch 32, 2 steps: the pipeline end to end (tests).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import ml_collections

from mpdnn.configs.common import parse_options, set_quantizers, two_steps
from mpdnn.training.config import ConfigError, base_config

WEIGHT_BUDGET_KB = 70.1  # docs/method.md §8
ACT_MAX_BUDGET_KB = 8.1
ACT_SUM_BUDGET_KB = 92.1
PROTOCOLS = ("full", "reduced", "smoke")

#: Table 1's parametrizations: short name -> (family, parametrization, paper's column).
PARAMETRIZATIONS = {
    "u1": ("uniform", "b_d", "U1 (b, d)"),
    "u2": ("uniform", "b_qmax", "U2 (b, qmax)"),
    "u3": ("uniform", "d_qmax", "U3 (d, qmax)"),
    "p1": ("pow2", "b_qmax", "pow2 (b, qmax)"),
    "p2": ("pow2", "b_qmin", "pow2 (b, qmin)"),
    "p3": ("pow2", "qmin_qmax", "P3 (qmin, qmax)"),
}

#: docs/method.md §9 Table 1: (weights, weights+acts) x (random, float-net init); None = diverges.
TABLE1_PAPER = {
    "u1": ((17.8, 8.18), (28.9, 9.03)),
    "u2": ((8.80, 7.44), (9.43, 7.74)),
    "u3": ((8.50, 7.32), (9.23, 7.40)),
    "p1": ((11.70, 7.90), (22.91, 11.68)),
    "p2": ((53.07, 23.01), (None, 35.68)),
    "p3": ((10.61, 7.56), (15.10, 9.86)),
}
FLOAT_PAPER = (8.50, 7.29)  # Table 1's float column: "random / float-net init"

#: docs/method.md §9 Table 3: method -> (label, bits W/A, sizes, paper uniform, paper pow2).
TABLE3 = {
    "fixed_w2": ("fixed", "2/32", "65.5 KB / 64 / 736", 10.81, 8.99),
    "tqt_w2": ("learned qmax, fixed b (TQT)", "2/32", "65.5 / 64 / 736", 9.47, 8.79),
    "ours_w": ("ours, weight budget", "learned/32", "70 / 64 / 736", 8.59, 8.53),
    "fixed_w2a4": ("fixed", "2/4", "65.5 / 8 / 92", 11.30, 11.62),
    "tqt_w2a4": ("TQT", "2/4", "65.5 / 8 / 92", 9.62, 11.29),
    "ours_w_asum": ("ours, weight + act-sum budget", "learned", "70 / – / 92", 9.38, 11.29),
    "ours_w_amax": ("ours, weight + act-max budget", "learned", "70 / 8 / –", 8.58, 11.23),
}


@dataclasses.dataclass(frozen=True)
class Row:
    """One cell of the paper's tables: what it trains and what the paper reports."""

    name: str
    table: int  # 1 or 3
    title: str  # the row and column as the paper labels them
    paper_error: float | None  # % on the original CIFAR-10; None: the paper says "diverges"
    weights: dict[str, Any]  # quant.weights overrides
    activations: dict[str, Any]  # quant.activations overrides
    budgets: dict[str, float]  # budget.<size> -> KB
    float_init: bool  # start from the ``float`` row's final model
    recipe: str = "paper"  # budget.recipe: the paper's rows pin the authors' recipe

    @property
    def paper_text(self) -> str:
        return "diverges" if self.paper_error is None else f"{self.paper_error:.2f} %"

    @property
    def family(self) -> str | None:
        return self.weights.get("family")


def _table1_rows() -> list[Row]:
    rows = [
        Row(
            name="float",
            table=1,
            title="float32 ResNet-20 (Tables 1 and 3)",
            paper_error=FLOAT_PAPER[1],
            weights={},
            activations={},
            budgets={},
            float_init=False,
        )
    ]
    for short, (family, par, column) in PARAMETRIZATIONS.items():
        for k, kinds in enumerate(("w", "wa")):
            for i, init in enumerate(("random", "float")):
                q = {"mode": "learned", "family": family, "parametrization": par, "bits": 4}
                what = "weights" if kinds == "w" else "weights + activations"
                rows.append(
                    Row(
                        name=f"t1_{short}_{kinds}_{init}",
                        table=1,
                        title=f"{column}, {what} quantized, "
                        + ("random init" if init == "random" else "float-net init"),
                        paper_error=TABLE1_PAPER[short][k][i],
                        weights={**q, "init": init},
                        activations=q if kinds == "wa" else {},
                        budgets={},
                        float_init=init == "float",
                    )
                )
    return rows


def _table3_rows() -> list[Row]:
    rows = []
    for method, (label, bits, sizes, *paper) in TABLE3.items():
        for family, error in zip(("uniform", "pow2"), paper, strict=True):
            w: dict[str, Any] = {"family": family}
            a: dict[str, Any] = {}
            budgets: dict[str, float] = {}
            if method.startswith(("fixed", "tqt")):
                mode = method.split("_")[0]
                w |= {"mode": mode, "bits": 2}
                if method.endswith("a4"):
                    a = {"mode": mode, "family": family, "bits": 4}
            else:
                w |= {"mode": "learned", "bits": 4}
                budgets["weight_kb"] = WEIGHT_BUDGET_KB
                if method != "ours_w":
                    a = {"mode": "learned", "family": family, "bits": 4}
                    key = "act_sum_kb" if method == "ours_w_asum" else "act_max_kb"
                    budgets[key] = ACT_SUM_BUDGET_KB if key == "act_sum_kb" else ACT_MAX_BUDGET_KB
            row = Row(
                name=f"t3_{method}_{family}",
                table=3,
                title=f"{label}, bits {bits}, sizes {sizes}, {family}",
                paper_error=error,
                weights=w,
                activations=a,
                budgets=budgets,
                float_init=True,
            )
            rows.append(row)
            if budgets:  # every "ours" row has a twin with mpdnn's recipe, side by side
                rows.append(
                    dataclasses.replace(
                        row,
                        name=f"{row.name}_mpdnn",
                        title=f"{row.title}, mpdnn's recipe (the paper's row: its number)",
                        recipe="mpdnn",
                    )
                )
    return rows


ROWS: dict[str, Row] = {r.name: r for r in (*_table1_rows(), *_table3_rows())}


def row_config(name: str, protocol: str = "full") -> ml_collections.ConfigDict:
    """The config of row ``name`` (see :data:`ROWS`) under ``protocol`` (:data:`PROTOCOLS`)."""
    if name not in ROWS:
        raise ConfigError(f"unknown CIFAR-10 row {name!r}; known: {', '.join(ROWS)}")
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown CIFAR-10 protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    row = ROWS[name]
    c = base_config()
    c.name = f"cifar10/{name}"
    set_quantizers(
        c,
        weights=row.weights,
        activations=row.activations,
        budgets=row.budgets,
        recipe=row.recipe,
    )
    if row.float_init:
        c.init.from_workdir = "float"
        c.optim.learning_rate = 0.03
    c.train.steps_per_call = 390  # one epoch per jitted call (capped at epoch ends)
    c.train.checkpoint_every_epochs = 10
    if protocol == "reduced":
        c.data.max_per_class = 150
        c.train.batch_size = 32
        c.train.eval_batch_size = 500
        c.train.checkpoint_every_epochs = 1
        if name == "float":
            c.train.epochs, c.optim.decay_epochs = 25, (12, 20)
        elif row.float_init:
            c.train.epochs, c.optim.decay_epochs = 2, ()
        else:
            c.train.epochs, c.optim.decay_epochs = 5, (4,)
    elif protocol == "smoke":
        c.data.max_per_class = 10
        two_steps(c, batch_size=32, eval_batch_size=100)
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """``experiments/cifar10.py:row=<row>[,protocol=full|reduced|smoke]``."""
    options = parse_options(
        arg, "experiments/cifar10.py", {"row": ROWS, "protocol": PROTOCOLS}, {"protocol": "full"}
    )
    return row_config(options["row"], options["protocol"])


def command(name: str, protocol: str = "full") -> str:
    """The command that trains row ``name`` on its own (the float row first, if it needs it)."""
    arg = f"row={name}" + ("" if protocol == "full" else f",protocol={protocol}")
    suffix = "" if protocol == "full" else f"_{protocol}"
    return (
        f"python -m mpdnn.train --config experiments/cifar10.py:{arg} "
        f"--workdir runs/cifar10{suffix}/{name}"
    )


# ----------------------------------------------------------------------------- measured


def load_results(results_dir: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """``{"full" | "reduced": {row: record}}`` from ``results_dir/cifar10[/reduced]/*.json``,
    the records ``scripts/reproduce_cifar10.py`` writes (command, commit, machine, date and
    wall time in each)."""
    out: dict[str, dict[str, dict[str, Any]]] = {"full": {}, "reduced": {}}
    folders = {"full": results_dir / "cifar10", "reduced": results_dir / "cifar10" / "reduced"}
    for protocol, folder in folders.items():
        for path in sorted(folder.glob("*.json")):
            record = json.loads(path.read_text())
            out[protocol][record["row"]] = record
    return out


def measured_text(record: dict[str, Any]) -> str:
    """One result record in a line: errors, sizes, status, and where and when it ran."""

    def pct(x: float | None) -> str:
        return "–" if x is None else f"{100 * x:.2f} %"

    prov = record.get("provenance") or {}
    parts = [
        f"final {pct(record.get('final_test_error'))}",
        f"delivered {pct(record.get('delivered_test_error'))} ({record.get('delivered')})",
    ]
    sizes = record.get("final_sizes") or {}
    if sizes:
        names = {"weight_kb": "weights", "act_max_kb": "act max", "act_sum_kb": "act sum"}
        parts.append(", ".join(f"{names[k]} {sizes[k]:.1f} KB" for k in names if k in sizes))
    if record.get("status") != "completed":
        parts.append(str(record.get("status")))
    wall = record.get("wall_time_s")
    where = ", ".join(
        str(x)
        for x in (
            f"{wall:.0f} s" if wall is not None else None,
            prov.get("device_kind"),
            (prov.get("date_utc") or "")[:10] or None,
            (prov.get("git_commit") or "")[:7] or None,
        )
        if x
    )
    return "; ".join(parts) + (f" [{where}]" if where else "")


def listing(results_dir: Path | None = None) -> str:
    """Every row: its title, the paper's number, the command that trains it and, where
    ``results_dir`` holds one, our measured result per protocol with its provenance."""
    results = load_results(results_dir) if results_dir is not None else {}
    lines = []
    for row in ROWS.values():
        lines += [
            f"{row.name}  (Table {row.table}) {row.title}",
            f"  paper    {row.paper_text}",
            f"  command  {command(row.name)}",
        ]
        for protocol, records in results.items():
            if row.name in records:
                lines.append(f"  {protocol:<8} {measured_text(records[row.name])}")
    return "\n".join(lines)
