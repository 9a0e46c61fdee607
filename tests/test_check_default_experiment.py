"""scripts/check_default_experiment.py: the committed default-experiment record is compared
run by run: test errors within a few test images on any machine, sizes and bits exactly under
its JAX version, loosely under another."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def check():
    path = REPO / "scripts" / "check_default_experiment.py"
    spec = importlib.util.spec_from_file_location("check_default_experiment", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def committed():
    return json.loads((REPO / "results" / "digits.json").read_text())


def test_the_committed_record_matches_itself(check, committed):
    assert check.differences(committed, committed) == []


IMAGE = 1 / 360  # one of the digits' test images


@pytest.mark.parametrize(
    ("run", "key", "change"),
    [
        ("learned", "delivered_test_error", lambda e: e + 7 * IMAGE),
        ("fixed", "final_test_error", lambda e: e - 7 * IMAGE),
        ("learned", "feasible", lambda _: False),
    ],
)
def test_a_moved_number_is_a_difference(check, committed, run, key, change):
    got = copy.deepcopy(committed)
    got["runs"][run][key] = change(committed["runs"][run][key])
    found = check.differences(got, committed)
    assert len(found) == 1 and found[0].startswith(f"{run}.{key}: {got['runs'][run][key]}")


def test_bits_and_sizes_are_compared_and_another_jax_is_compared_loosely(check, committed):
    got = copy.deepcopy(committed)
    got["runs"]["learned"]["weight_bits"]["head.kernel"] = 3.0
    got["runs"]["learned"]["delivered_sizes"]["weight_kb"] *= 1.005
    # Six more wrong test images: the most that machines were allowed to differ by.
    got["runs"]["float"]["delivered_test_error"] += 6 * IMAGE
    assert len(check.differences(got, committed)) == 2
    assert check.differences(got, committed, exact=False) == []
    got["runs"]["float"]["delivered_test_error"] += IMAGE  # seven: too many
    assert check.differences(got, committed, exact=False) == [
        f"float.delivered_test_error: {got['runs']['float']['delivered_test_error']} "
        f"(committed {committed['runs']['float']['delivered_test_error']})"
    ]


def test_exit_status(check, committed, tmp_path, capsys):
    (tmp_path / "table.json").write_text(json.dumps(committed))
    assert check.main([str(tmp_path)]) == 0
    bad = copy.deepcopy(committed)
    bad["runs"]["fixed"]["delivered_test_error"] = 0.5
    (tmp_path / "table.json").write_text(json.dumps(bad))
    assert check.main([str(tmp_path)]) == 1
    assert "fixed.delivered_test_error: 0.5" in capsys.readouterr().out
    assert check.main([str(tmp_path / "missing")]) == 2
