"""scripts/reproduce_cifar10.py: row selection, the float-first rule, results and markdown."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from mpdnn.data import find_cifar10_archive

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "reproduce_cifar10.py"


@pytest.fixture(scope="module")
def rc():
    spec = importlib.util.spec_from_file_location("reproduce_cifar10", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def names(rc, *argv):
    parser_args = rc.OneLineParser().parse_args([])  # a namespace to fill
    parser_args.rows, parser_args.table, parser_args.family = None, "all", None
    for key, value in zip(argv[::2], argv[1::2], strict=True):
        setattr(parser_args, key, value)
    return [r.name for r in rc.select(parser_args)]


def test_selection_order_follows_the_issue(rc):
    rows = names(rc, "table", "all")
    assert len(rows) == 45 and rows[0] == "float"  # 39 cells and 6 mpdnn twins
    # Float, then Table 3's uniform column, Table 1's uniform rows, the pow2 ones.
    first_t1 = rows.index("t1_u1_w_random")
    assert all(
        r.startswith("t3_") and r.removesuffix("_mpdnn").endswith("_uniform")
        for r in rows[1:first_t1]
    )
    assert first_t1 == 11
    assert rows.index("t3_fixed_w2_pow2") > rows.index("t1_u3_wa_float")
    uniform3 = names(rc, "table", "3", "family", "uniform")
    assert len(uniform3) == 11 and uniform3[0] == "float"  # 8 paper rows, 3 mpdnn twins
    assert [r for r in uniform3 if r.endswith("_mpdnn")] == [
        "t3_ours_w_uniform_mpdnn",
        "t3_ours_w_asum_uniform_mpdnn",
        "t3_ours_w_amax_uniform_mpdnn",
    ]
    assert names(rc, "rows", "t1_u3_w_float,float") == ["t1_u3_w_float", "float"]


def test_markdown_labels_every_row(rc, tmp_path):
    record = {
        "row": "t3_ours_w_uniform",
        "status": "infeasible",
        "final_test_error": 0.2,
        "best_test_error": 0.1,
        "delivered_test_error": None,
        "budgets": {"weight_kb": 70.1},
        "delivered_sizes": {"weight_kb": 80.0, "act_max_kb": 64.0, "act_sum_kb": 736.0},
        "verdicts": {"weight_kb": {"delivered_met": False, "final_met": False}},
        "provenance": {"device_kind": "cpu", "git_commit": "abcdef0123", "date_utc": "d"},
        "wall_time_s": 12.0,
        "epochs": 2,
    }
    folder = tmp_path / "cifar10" / "reduced"
    folder.mkdir(parents=True)
    (folder / "t3_ours_w_uniform.json").write_text(json.dumps(record))
    text = rc.write_markdown(tmp_path).read_text()
    assert "20.00 / 10.00 (NO feasible)" in text
    assert "(final model, weight_kb over)" in text
    assert text.count("not run") >= 38  # every other row, in both tables
    assert "lossy JPEG" in text  # docs/method.md §11's caveat


def test_deadline_starts_nothing(rc, tmp_path, capsys):
    code = rc.main(
        [
            "--rows",
            "float",
            "--smoke",
            "--deadline_s",
            "1e-9",
            "--runs_dir",
            str(tmp_path / "r"),
            "--results_dir",
            str(tmp_path),
        ]
    )
    assert code == 1
    assert "not run (deadline)" in capsys.readouterr().out


def test_bad_rows_are_one_line_and_status_2(rc, capsys):
    with pytest.raises(SystemExit) as exit_:
        rc.main(["--rows", "t9"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown rows t9; see --list" in err[0]


def test_smoke_rows_end_to_end(rc, tmp_path):
    """Float first (the budgeted row starts from it), pow2 with activations and a logit
    scale, TQT; each a real 2-step ``python -m mpdnn.train`` process."""
    extra = [] if find_cifar10_archive() else ["--set", "data.name=synthetic"]
    rows = "t3_ours_w_amax_uniform,t1_p3_wa_random,t3_tqt_w2a4_pow2"
    code = rc.main(
        [
            "--rows",
            rows,
            "--smoke",
            "--jobs",
            "2",
            "--runs_dir",
            str(tmp_path / "runs"),
            "--results_dir",
            str(tmp_path),
            *extra,
        ]
    )
    out = tmp_path / "cifar10" / "smoke"
    records = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}
    assert set(records) == {"float", *rows.split(",")}
    assert records["float"]["status"] == "completed"
    assert records["t1_p3_wa_random"]["status"] == "completed"
    assert records["t3_tqt_w2a4_pow2"]["status"] == "completed"
    # Two steps cannot meet 70.1 KB from 4 bits: recorded as such, and the script says so.
    budgeted = records["t3_ours_w_amax_uniform"]
    assert budgeted["status"] == "infeasible" and budgeted["feasible"] is False
    assert budgeted["verdicts"]["weight_kb"]["delivered_met"] is False
    assert code == 1
    assert budgeted["bits"]["stem.kernel"] >= 2 and budgeted["provenance"]["git_commit"]
    assert (tmp_path / "runs" / "float" / "final").is_dir()
