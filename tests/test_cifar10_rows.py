"""The CIFAR-10 rows (mpdnn.configs.cifar10, experiments/cifar10.py) against docs/method.md §5,
§8, §9.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from flax import nnx

from mpdnn import data as mdata
from mpdnn import optim
from mpdnn.configs import cifar10
from mpdnn.training import config as cfg
from mpdnn.training import trainer

EXPERIMENT = Path(__file__).resolve().parents[1] / "experiments" / "cifar10.py"

# docs/method.md §5: ResNet-20 has 268,346 quantized weights and 19 activation tensors (188,416
# values,
# the largest 16x32x32).
WEIGHTS, ACT_VALUES, ACT_LARGEST = 268_346, 188_416, 16 * 32 * 32


def kb(values: int, bits: int) -> float:
    return values * bits / 8 / 1024


def test_every_cell_of_tables_1_and_3_has_a_row():
    names = set(cifar10.ROWS)
    # float; Table 1 cells; Table 3 cells; an mpdnn twin of each of the 6 "ours" cells
    assert len(names) == 1 + 6 * 2 * 2 + 7 * 2 + 6
    assert sum(r.table == 1 for r in cifar10.ROWS.values()) == 25
    assert sum(r.table == 3 for r in cifar10.ROWS.values()) == 20
    twins = [r for r in cifar10.ROWS.values() if r.recipe == "mpdnn"]
    assert {r.name.removesuffix("_mpdnn") for r in twins} == {
        f"t3_{m}_{f}" for m in ("ours_w", "ours_w_asum", "ours_w_amax") for f in ("uniform", "pow2")
    }
    assert all(r.recipe == "paper" for r in cifar10.ROWS.values() if r not in twins)


@pytest.mark.parametrize(
    "name, paper",
    [  # typed from docs/method.md §9
        ("float", 7.29),
        ("t1_u1_w_random", 17.8),
        ("t1_u3_w_float", 7.32),
        ("t1_u3_wa_random", 9.23),
        ("t1_p2_wa_random", None),  # "diverges"
        ("t1_p3_wa_float", 9.86),
        ("t3_fixed_w2_uniform", 10.81),
        ("t3_tqt_w2_pow2", 8.79),
        ("t3_ours_w_asum_uniform", 9.38),
        ("t3_ours_w_amax_uniform", 8.58),
        ("t3_ours_w_amax_pow2", 11.23),
    ],
)
def test_paper_numbers(name, paper):
    assert cifar10.ROWS[name].paper_error == paper


def load():
    spec = importlib.util.spec_from_file_location("cifar10_experiment", EXPERIMENT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(name: str, protocol: str | None = None):
    arg = f"row={name}" + (f",protocol={protocol}" if protocol else "")
    return load().get_config(arg)


def test_recipe_and_protocols():
    c = row("t3_ours_w_amax_uniform")
    # docs/method.md §8: batch 128, 160 epochs, lr/10 after 80 and 120, quantized nets at lr 0.03
    # from
    # the float net; budgets 70.1 KB weights and 8.1 KB max activation, lambda 0.1.
    assert (c.train.batch_size, c.train.epochs, tuple(c.optim.decay_epochs)) == (
        128,
        160,
        (80, 120),
    )
    assert (c.optim.learning_rate, c.optim.weight_decay, c.optim.momentum) == (0.03, 2e-4, 0.9)
    assert c.init.from_workdir == "float"
    assert (c.budget.weight_kb, c.budget.act_max_kb, c.budget.act_sum_kb) == (70.1, 8.1, None)
    assert c.budget.method == "penalty" and c.budget.recipe == "paper"
    assert cfg.strength(c, "weight_kb", 70.1) == 0.1  # the paper's λ
    twin = row("t3_ours_w_amax_uniform_mpdnn")
    assert twin.budget.recipe == "mpdnn" and twin.budget.act_max_kb == 8.1
    assert row("t3_ours_w_asum_pow2").budget.act_sum_kb == 92.1
    random = row("t1_u1_w_random")
    assert random.init.from_workdir is None and random.optim.learning_rate == 0.1
    assert random.quant.weights.init == "random"
    reduced = row("float", "reduced")
    assert reduced.data.max_per_class == 150 and reduced.train.batch_size == 32
    smoke = row("float", "smoke")
    assert smoke.train.max_steps == 2
    assert row("float", "full").to_dict() == row("float").to_dict()


@pytest.mark.parametrize(
    "arg, message",
    [
        (None, "say row=<row>"),
        ("row=t9_nothing", "unknown row 't9_nothing'"),
        ("row=float,protocol=fast", "unknown protocol 'fast'"),
        ("float", "unknown argument 'float'"),
        ("row=float,seed=1", "unknown argument 'seed=1'"),
    ],
)
def test_bad_arguments_are_one_line_config_errors(arg, message):
    with pytest.raises(cfg.ConfigError, match=message) as info:
        load().get_config(arg)
    assert "\n" not in str(info.value)


def test_listing_shows_paper_command_and_measured_result(tmp_path):
    """Every row is listed with the paper's number and its command; a result record (as
    scripts/reproduce_cifar10.py writes it) appears beside its row with its provenance."""
    record = {
        "row": "t3_ours_w_uniform",
        "status": "completed",
        "final_test_error": 0.1234,
        "delivered_test_error": 0.1111,
        "delivered": "best_feasible",
        "final_sizes": {"weight_kb": 65.5, "act_max_kb": 64.0, "act_sum_kb": 736.0},
        "wall_time_s": 198.0,
        "provenance": {
            "device_kind": "NVIDIA H200",
            "date_utc": "2026-11-26T08:07",
            "git_commit": "92354aa7",
        },
    }
    (tmp_path / "cifar10").mkdir()
    (tmp_path / "cifar10" / "t3_ours_w_uniform.json").write_text(json.dumps(record))
    lines = cifar10.listing(tmp_path).splitlines()
    heads = [line.split()[0] for line in lines if not line.startswith(" ")]
    assert heads == list(cifar10.ROWS)
    at = lines.index(next(x for x in lines if x.startswith("t3_ours_w_uniform ")))
    block = lines[at : at + 4]
    assert block[1].split() == ["paper", "8.59", "%"]  # docs/method.md §9, Table 3
    assert "experiments/cifar10.py:row=t3_ours_w_uniform " in block[2]
    assert block[3].startswith("  full ")
    for text in ("final 12.34 %", "delivered 11.11 %", "weights 65.5 KB", "198 s", "NVIDIA H200"):
        assert text in block[3]
    assert "2026-11-26" in block[3] and "92354aa" in block[3]
    assert (
        "diverges"
        in lines[lines.index(next(x for x in lines if x.startswith("t1_p2_wa_random "))) + 1]
    )


def _bits(q: dict) -> int:
    """The row's starting bits of one kind, from what the row says (not from the code)."""
    mode = q.get("mode", "float")
    return 32 if mode == "float" else q.get("bits", 4)


@pytest.mark.parametrize("name", list(cifar10.ROWS))
def test_every_row_builds_at_its_starting_sizes(name):
    """Each row's model starts where its row says: 32-bit float, 2-bit fixed/TQT weights,
    4-bit fixed/TQT activations, and every learned quantizer at its initial 4 bits (docs/method.md
    §9:
    "initial b = 4"); sizes from docs/method.md §5's counts."""
    row = cifar10.ROWS[name]
    config = cifar10.row_config(name)
    cfg.check(config)
    config.init.from_workdir = None  # same shapes without a trained float net
    dataset = mdata.load_dataset("synthetic", image_shape=(32, 32, 3), num_train=8, num_test=8)
    model = trainer.build_model(config, dataset, Path("unused"))
    sizes = optim.Accounting.from_model(model)(nnx.state(model, nnx.Param))
    w, a = _bits(row.weights), _bits(row.activations)
    assert float(sizes["weight_kb"]) == pytest.approx(kb(WEIGHTS, w), abs=1e-3)
    assert float(sizes["act_max_kb"]) == pytest.approx(kb(ACT_LARGEST, a))
    assert float(sizes["act_sum_kb"]) == pytest.approx(kb(ACT_VALUES, a))
    # Pow2 networks carry the authors' logit scale (docs/method.md §6), uniform ones do not.
    assert cfg.logit_scale(config) == (row.family == "pow2")
