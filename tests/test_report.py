"""``python -m mpdnn.report`` (a training config's model, or a finished run's) and
``mpdnn.plots.plot_bitwidths``.

The expected numbers are docs/method.md §5's ResNet-20 counts, recomputed from the layer sizes
by ``tests/optim/test_accounting.py: resnet20_layers`` (268,346 weights; 19 activation
tensors), not taken from the code under test. Commands run in-process (``main(argv)``); one
runs in a subprocess for the exit status.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from flax import nnx

from mpdnn import models, nn
from mpdnn.optim.accounting import counted_tensors
from mpdnn.plots import plot_bitwidths
from mpdnn.report import config_model, main
from tests.optim.test_accounting import resnet20_layers

ROOT = Path(__file__).resolve().parents[1]
FIRST_LAST = str(ROOT / "experiments" / "first_last_8bit.py")
DIGITS = str(ROOT / "experiments" / "digits.py")
KB_BITS = 8 * 1024
WEIGHTS, ACTS = resnet20_layers()
NUM_WEIGHTS = sum(n for _, n in WEIGHTS)
ACT_NUMELS = [n for _, n in ACTS]
ENDS = ("stem", "head", "head.bias")  # the first conv and the classifier

#: The README's rules ("Quantizing a network"), as Python.
README_RULES = [
    nn.Rule("stem|head", nn.QuantConfig(mode="fixed", bits=8)),
    nn.Rule(".*", nn.QuantConfig(bits=2), kind="weight"),
    nn.Rule(".*", nn.QuantConfig(bits=4), kind="activation"),
]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    """A config file: the float ResNet-20 on CIFAR-10 of ``base_config``."""
    path = tmp_path_factory.mktemp("configs") / "base.py"
    path.write_text(
        "from mpdnn.training.config import base_config\n\n\n"
        "def get_config():\n    return base_config()\n"
    )
    return str(path)


def run(capsys, *argv: str) -> str:
    """``python -m mpdnn.report ARGV``'s stdout (it must succeed and say nothing on stderr)."""
    main(list(argv))
    out, err = capsys.readouterr()
    assert err == ""
    return out


ROW = re.compile(
    r"\s*(?P<index>\d+)\s+(?P<path>\S+)\s+(?P<kind>weight|activation)\s+(?P<tensor>\S+)\s+"
    r"(?P<shape>\S+)\s+(?P<numel>\d+)\s+(?P<quantizer>.+?)\s+(?P<bits>\S+)\s+(?P<kb>\S+)"
)


def table_rows(out: str) -> dict[tuple[str, str], dict[str, str]]:
    """``{(path, tensor): row}`` of a printed table, each row's columns by name."""
    rows = {}
    for line in out.splitlines():
        match = ROW.fullmatch(line)
        if match:
            rows[(match["path"], match["tensor"])] = match.groupdict()
    return rows


def totals(out: str) -> dict[str, float]:
    keys = ("num_weights", "weight_kb", "act_max_kb", "act_sum_kb")
    return {w[0]: float(w[1]) for w in map(str.split, out.splitlines()) if w and w[0] in keys}


def load_config(path: str, arg: str | None = None):
    spec = importlib.util.spec_from_file_location("first_last_8bit", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_json_of_a_config_at_2_and_4_bits_matches_spec_exactly(capsys, base):
    out = run(
        capsys,
        f"--config={base}",
        "--config.quant.weights.mode=learned",
        "--config.quant.weights.bits=2",
        "--config.quant.activations.mode=learned",
        "--config.quant.activations.bits=4",
        "--json",
    )
    record = json.loads(out)  # exactly one JSON object on stdout
    assert record["model"] == "resnet20" and record["input_shape"] == [32, 32, 3]
    assert record["trained"] is False and record["notes"] == []
    assert record["num_weights"] == NUM_WEIGHTS
    assert record["weight_kb"] == NUM_WEIGHTS * 2 / KB_BITS == 65.51416015625
    assert record["weight_mb"] == NUM_WEIGHTS * 2 / KB_BITS / 1024
    assert record["num_activations"] == sum(ACT_NUMELS)
    assert record["act_max_kb"] == max(ACT_NUMELS) * 4 / KB_BITS == 8.0
    assert record["act_sum_kb"] == sum(ACT_NUMELS) * 4 / KB_BITS == 92.0
    layers = record["layers"]
    weights = [r for r in layers if r["kind"] == "weight"]
    acts = [r for r in layers if r["kind"] == "activation"]
    assert len(weights) == len(WEIGHTS) == 21 and len(acts) == len(ACTS) == 19
    assert {r["bits"] for r in weights} == {2.0} and {r["bits"] for r in acts} == {4.0}
    assert sorted(r["numel"] for r in acts) == sorted(ACT_NUMELS)
    assert sum(r["numel"] for r in weights) == NUM_WEIGHTS
    for r in layers:
        assert r["numel"] == math.prod(r["shape"])
    paths = [r["path"] for r in layers]
    assert paths[0] == "stem" and paths[-2:] == ["head", "head"]
    assert paths.index("stages.0.0.conv1") < paths.index("stages.0.0.act1")
    assert paths.index("stages.2.2.act2") < paths.index("head")


def test_float_config_prints_exact_totals(capsys, base):
    out = run(capsys, "--config", base)
    assert totals(out) == {
        "num_weights": NUM_WEIGHTS,
        "weight_kb": NUM_WEIGHTS * 32 / KB_BITS,  # 1048.2265625
        "act_max_kb": max(ACT_NUMELS) * 32 / KB_BITS,  # 64
        "act_sum_kb": sum(ACT_NUMELS) * 32 / KB_BITS,  # 736
    }
    rows = table_rows(out)
    assert len(rows) == len(WEIGHTS) + len(ACTS)
    assert {r["quantizer"] for r in rows.values()} == {"float"}
    assert "untrained float network" in out


def test_readme_rules_as_a_config_give_the_same_quantizers():
    """experiments/first_last_8bit.py's rules quantize every tensor exactly as the README's
    Python rules do: the same QuantSpec and the same initial θ."""
    from_config = config_model(load_config(FIRST_LAST))
    from_readme = models.build("resnet20", rngs=nnx.Rngs(0))
    nn.quantize_model(from_readme, README_RULES)
    ours, theirs = counted_tensors(from_config), counted_tensors(from_readme)
    assert [t.path for t in ours] == [t.path for t in theirs]
    assert len(ours) == len(WEIGHTS) + len(ACTS)
    for a, b in zip(ours, theirs, strict=True):
        assert a.quantizer.spec == b.quantizer.spec, a.path
        ta, tb = a.quantizer.theta(), b.quantizer.theta()
        assert ta.keys() == tb.keys() and all(float(ta[k]) == float(tb[k]) for k in ta), a.path
    fixed = {t.path for t in theirs if t.quantizer.spec.b_range == (8, 8)}
    assert fixed == {"stem.kernel_quant", "head.kernel_quant", "head.bias_quant"}


def test_first_last_config_prints_the_stem_and_head_at_8_bits(capsys):
    out = run(capsys, "--config", FIRST_LAST)
    rows = table_rows(out)
    assert len(rows) == len(WEIGHTS) + len(ACTS)
    for (path, tensor), row in rows.items():
        fixed = (f"{path}.bias" if tensor == "bias" else path) in ENDS
        assert float(row["bits"]) == (8 if fixed else 2 if row["kind"] == "weight" else 4), row
        assert row["quantizer"] == ("uniform fixed 8b" if fixed else "uniform d_qmax"), row
    ends = sum(n for p, n in WEIGHTS if p in ENDS)  # 432 + 640 + 10
    assert totals(out)["weight_kb"] == (ends * 8 + (NUM_WEIGHTS - ends) * 2) / KB_BITS
    assert "stem|head" in out.splitlines()[0]


def test_learned_bits_the_init_boxes_clip_get_a_note(capsys, base):
    """docs/method.md §2 and :mod:`mpdnn.quantizers.init`: P3 weights cannot start at 8 bits."""
    out = run(
        capsys,
        "--config",
        base,
        "--config.quant.weights.mode=learned",
        "--config.quant.weights.family=pow2",
        "--config.quant.weights.bits=8",
    )
    notes = [line for line in out.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and "weight quantizers asked to start at 8 b start at" in notes[0]
    bits = {float(r["bits"]) for r in table_rows(out).values() if r["kind"] == "weight"}
    assert bits and max(bits) < 8


@pytest.mark.parametrize(
    "argv, words",
    [
        ([], ("--config", "--workdir")),
        (["--model", "resnet20"], ("model",)),  # the old rule flags are gone
        (["--config", "nope.py"], ("nope.py",)),
        (["--config", FIRST_LAST, "--config.nokey=3"], ("override", "nokey")),
        (["--config", FIRST_LAST, "--config.model.name=resnet21"], ("resnet21", "resnet20")),
        (["--config", FIRST_LAST, "--config.train.epochs=abc"], ("epochs", "abc")),
        (["--config", f"{FIRST_LAST}:bogus"], ("bogus",)),
        (["--config", DIGITS], ("run_variants", "float, fixed, learned")),
        (["--config", FIRST_LAST, "--workdir", "somewhere"], ("--config", "--workdir")),
        (["--config", FIRST_LAST, "extra"], ("extra",)),
    ],
)
def test_bad_input_is_one_line_and_status_2(capsys, argv, words):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mpdnn.report: error: "), err
    for word in words:
        assert word in lines[0]


def test_plot_bitwidths_writes_a_png(capsys, tmp_path):
    record = json.loads(run(capsys, "--config", FIRST_LAST, "--json"))
    record["layers"][1] = {**record["layers"][1], "quantizer": "float", "bits": 32.0}
    path = plot_bitwidths(record, tmp_path / "sub" / "bits.png", title="test")
    data = path.read_bytes()
    assert path == tmp_path / "sub" / "bits.png"
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000


def test_workdir_reports_the_delivered_model_of_a_finished_run(tmp_path, capsys):
    from mpdnn.training.trainer import train_and_evaluate
    from tests.training.test_trainer import tiny_config

    config = tiny_config(max_steps=2, steps_per_call=1)
    config.budget.weight_kb = 2.0  # met from the start (4-bit start: ~1.3 KB)
    config.budget.recipe = "paper"  # the best evaluation within budget is delivered
    result = train_and_evaluate(config, tmp_path)
    assert result.delivered == "best_feasible"
    capsys.readouterr()
    out = run(capsys, "--workdir", str(tmp_path))
    assert f"test error {result.delivered_test_error:.4f}" in out
    assert "budget weight_kb <= 2 KB: met at" in out
    for row in result.layers:  # every row of the delivered model, with its bits
        assert f"{row['path']}" in out
    record = json.loads(run(capsys, "--workdir", str(tmp_path), "--json"))
    assert record["layers"] == result.layers
    assert record["run"]["delivered_sizes"]["weight_kb"] <= 2.0


def test_workdir_without_a_report_exits_2_with_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mpdnn.report", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1
    assert "no report.json" in result.stderr
