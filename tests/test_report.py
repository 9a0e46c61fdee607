"""``python -m mpdnn.report`` and ``mpdnn.plots.plot_bitwidths``.

The expected numbers are docs/method.md §5's ResNet-20 counts, recomputed here from the layer sizes
(268,346 weights; 19 activation tensors: 7 of 16×32×32, 6 of 32×16×16, 6 of 64×8×8), not
taken from the code under test. Every command runs in a subprocess, all started at once (each
pays a few seconds of JAX import and model building).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from mpdnn.plots import plot_bitwidths

NUM_WEIGHTS = 16 * 3 * 9 + 6 * 16 * 16 * 9 + (16 * 32 + 5 * 32 * 32) * 9
NUM_WEIGHTS += (32 * 64 + 5 * 64 * 64) * 9 + 64 * 10 + 10
ACT_NUMELS = [16 * 32 * 32] * 7 + [32 * 16 * 16] * 6 + [64 * 8 * 8] * 6
KB_BITS = 8 * 1024

COMMANDS = {
    "quantized_json": ["--model", "resnet20", "--weight_bits", "2", "--act_bits", "4", "--json"],
    "float_table": ["--model", "resnet20"],
    "unknown_model": ["--model", "resnet21", "--json"],
    "weight_bits_1": ["--model", "resnet20", "--weight_bits", "1"],
}


@pytest.fixture(scope="module")
def runs() -> dict[str, subprocess.CompletedProcess]:
    """Every command of :data:`COMMANDS`, run concurrently."""
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "mpdnn.report", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, argv in COMMANDS.items()
    }
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        out[name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return out


def test_spec_counts_are_what_spec_says():
    assert NUM_WEIGHTS == 268346 and sum(ACT_NUMELS) == 188416


def test_json_at_2_and_4_bits_matches_spec_exactly(runs):
    run = runs["quantized_json"]
    assert run.returncode == 0, run.stderr
    record = json.loads(run.stdout)  # exactly one JSON object on stdout
    assert record["model"] == "resnet20"
    assert record["num_weights"] == NUM_WEIGHTS
    assert record["weight_kb"] == NUM_WEIGHTS * 2 / KB_BITS == 65.51416015625
    assert record["weight_mb"] == NUM_WEIGHTS * 2 / KB_BITS / 1024
    assert record["num_activations"] == sum(ACT_NUMELS)
    assert record["act_max_kb"] == max(ACT_NUMELS) * 4 / KB_BITS == 8.0
    assert record["act_sum_kb"] == sum(ACT_NUMELS) * 4 / KB_BITS == 92.0
    layers = record["layers"]
    weights = [r for r in layers if r["kind"] == "weight"]
    acts = [r for r in layers if r["kind"] == "activation"]
    assert len(weights) == 21 and len(acts) == 19  # stem + 18 convs, head kernel + bias
    assert {r["bits"] for r in weights} == {2.0} and {r["bits"] for r in acts} == {4.0}
    assert sorted(r["numel"] for r in acts) == sorted(ACT_NUMELS)
    assert sum(r["numel"] for r in weights) == NUM_WEIGHTS
    assert sum(r["kb"] for r in layers) == pytest.approx(65.51416015625 + 92.0, rel=1e-12)
    for r in layers:  # plain JSON values with the documented keys
        assert isinstance(r["bits"], float) and isinstance(r["kb"], float)
        assert isinstance(r["numel"], int) and isinstance(r["shape"], list)
        assert r["numel"] == math.prod(r["shape"])
    # forward order: stem first, head last, each block's conv before its activation
    assert [r["index"] for r in layers] == list(range(len(layers)))
    paths = [r["path"] for r in layers]
    assert paths[0] == "stem" and paths[-2:] == ["head", "head"]
    assert paths.index("stages.0.0.conv1") < paths.index("stages.0.0.act1")
    assert paths.index("stages.0.0.act1") < paths.index("stages.0.0.conv2")
    assert paths.index("stages.2.2.act2") < paths.index("head")


def test_float_table_prints_exact_totals(runs):
    run = runs["float_table"]
    assert run.returncode == 0, run.stderr
    totals = {}
    for line in run.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in ("num_weights", "weight_kb", "act_max_kb", "act_sum_kb"):
            totals[parts[0]] = float(parts[1])
    assert totals == {
        "num_weights": NUM_WEIGHTS,
        "weight_kb": NUM_WEIGHTS * 32 / KB_BITS,  # 1048.2265625
        "act_max_kb": max(ACT_NUMELS) * 32 / KB_BITS,  # 64
        "act_sum_kb": sum(ACT_NUMELS) * 32 / KB_BITS,  # 736
    }
    assert totals["weight_kb"] == 1048.2265625
    assert "stages.2.2.conv2" in run.stdout and "float" in run.stdout
    assert "untrained float network" in run.stdout


@pytest.mark.parametrize(
    "name, words", [("unknown_model", ("resnet21", "resnet20")), ("weight_bits_1", ("[2, 8]",))]
)
def test_bad_input_is_one_line_and_nonzero(runs, name, words):
    run = runs[name]
    assert run.returncode != 0
    assert run.stdout == ""
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0], run.stderr
    assert "Traceback" not in run.stderr
    for word in words:
        assert word in lines[0]


def test_plot_bitwidths_writes_a_png(runs, tmp_path):
    record = json.loads(runs["quantized_json"].stdout)
    # one float activation and one fixed weight, to draw every bar style
    record["layers"][1] = {**record["layers"][1], "quantizer": "float", "bits": 32.0}
    record["layers"][0] = {**record["layers"][0], "quantizer": "uniform fixed 8b", "bits": 8.0}
    path = plot_bitwidths(record, tmp_path / "sub" / "bits.png", title="test")
    data = path.read_bytes()
    assert path == tmp_path / "sub" / "bits.png"
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000


def test_workdir_reports_the_delivered_model_of_a_finished_run(tmp_path, capsys):
    from mpdnn.report import main
    from mpdnn.training.trainer import train_and_evaluate
    from tests.training.test_trainer import tiny_config

    config = tiny_config(max_steps=2, steps_per_call=1)
    config.budget.weight_kb = 2.0  # met from the start (4-bit start: ~1.3 KB)
    config.budget.recipe = "paper"  # the best evaluation within budget is delivered
    result = train_and_evaluate(config, tmp_path)
    assert result.delivered == "best_feasible"
    main(["--workdir", str(tmp_path)])
    out = capsys.readouterr().out
    assert f"test error {result.delivered_test_error:.4f}" in out
    assert "budget weight_kb <= 2 KB: met at" in out
    for row in result.layers:  # every row of the delivered model, with its bits
        assert f"{row['path']}" in out
    main(["--workdir", str(tmp_path), "--json"])
    record = json.loads(capsys.readouterr().out)
    assert record["layers"] == result.layers
    assert record["run"]["delivered_sizes"]["weight_kb"] <= 2.0


def test_workdir_without_a_report_is_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mpdnn.report", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "no report.json" in result.stderr
