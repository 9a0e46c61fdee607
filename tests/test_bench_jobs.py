"""scripts/bench_jobs.py: the total throughput of overlapping runs and the rule for --jobs,
on hand-made timings."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench_jobs():
    path = REPO / "scripts" / "bench_jobs.py"
    spec = importlib.util.spec_from_file_location("bench_jobs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(start, end, steps, peak=None):
    return {
        "window": [start, end],
        "steps_timed": steps,
        "images_per_s": steps * 128 / (end - start),
        "peak_bytes": peak,
    }


def test_total_throughput_counts_the_union_of_the_windows(bench_jobs):
    # two processes of 100 steps at batch 128, timed over 10 s each but 5 s apart: 25600
    # images in 15 s, not the 2560 images/s that adding their own rates would claim
    total = bench_jobs.total_throughput([run(0.0, 10.0, 100, 2**30), run(5.0, 15.0, 100)], 128)
    assert total["images_per_s"] == pytest.approx(25600 / 15)
    assert total["seconds"] == 15.0
    assert total["per_process_images_per_s"] == [1280.0, 1280.0]
    assert total["peak_bytes_max"] == 2**30


def test_choose_jobs_stops_at_the_first_step_up_that_gains_too_little(bench_jobs):
    totals = {1: {"images_per_s": 1000.0}, 2: {"images_per_s": 1500.0}}
    totals[4] = {"images_per_s": 1540.0}  # +2.7 %: not worth the memory
    totals[8] = {"images_per_s": 2000.0}  # after a step that did not pay: not reached
    assert bench_jobs.choose_jobs(totals, 0.05) == 2
    assert bench_jobs.choose_jobs(totals, 0.02) == 8
    assert (
        bench_jobs.choose_jobs({1: {"images_per_s": 1000.0}, 2: {"images_per_s": 900.0}}, 0.05) == 1
    )
    assert bench_jobs.choose_jobs({2: {"images_per_s": 1.0}}, 0.05) == 2


def test_bad_jobs_is_one_line(bench_jobs, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_jobs.main(["--jobs", "0,2"])
    assert exc.value.code == 2
    assert "--jobs must be integers >= 1" in capsys.readouterr().err


def test_runs_share_the_memory_as_reproduce_cifar10_gives_it(bench_jobs):
    assert bench_jobs.jobs.memory_env(1) == {}  # one run: JAX's own default
    assert bench_jobs.jobs.memory_env(4) == {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.225"}


def test_a_failed_process_is_one_line_naming_n(bench_jobs, tmp_path):
    """Two bench_train.py processes that fail at once (a bad batch): the error names N and
    the last line of the failed process's log, which is kept."""
    import argparse

    args = argparse.Namespace(
        case="float", steps=2, steps_per_call=1, warmup=1, batch=0, flat_update=False
    )
    with pytest.raises(SystemExit, match=r"failed with N=2: .*batch_size=0 must be"):
        bench_jobs.run_side_by_side(2, args, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.log")) == ["n2_0.log", "n2_1.log"]
