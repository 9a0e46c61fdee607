"""The Gaussian experiment (paper Fig. 3)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest

import mpdnn.quantizers as mq

EXPERIMENT = Path(__file__).resolve().parents[1] / "experiments" / "gaussian_mse.py"


def _load_experiment():
    """experiments/ is not a package: load the experiment by path, as a script is run."""
    spec = importlib.util.spec_from_file_location("gaussian_mse_experiment", EXPERIMENT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gaussian = _load_experiment()


def test_oscillation_measure_on_hand_made_curves():
    steady = np.linspace(1.0, 0.5, 101)  # monotone: no climb at all
    assert gaussian.oscillation(steady) == 0.0
    assert gaussian.rises(steady) == 0
    # Second half alternates 0.02 <-> 0.03: each climb is log(1.5); the second half (51
    # points, indices 50..100) starts at 0.02 (even index) and has 25 climbs.
    cycle = np.where(np.arange(101) % 2 == 0, 0.02, 0.03)
    assert gaussian.oscillation(cycle) == pytest.approx(25 * math.log(1.5))
    assert gaussian.rises(cycle) == 25
    assert gaussian.oscillation(np.array([1.0, np.nan, np.inf, 1.0])) == math.inf


def test_descent_lowers_the_error_from_the_shared_4_bit_start():
    samples = gaussian.gaussian_samples(key=jax.random.key(0), num_samples=2000)
    for family, par in gaussian.CASES:
        t = gaussian.run_case(family, par, samples, learning_rate=1e-2, steps=30)
        assert t.mse.shape == (31,) and t.bits.shape == (31,)
        assert np.all(np.isfinite(t.mse))
        assert t.bits[0] == 4.0  # every case starts at b = 4 (docs/method.md §4)
        assert t.mse[-1] <= t.mse[0]
        # the recorded MSE is the quantizer's real error at the recorded θ: recompute one
        spec = gaussian.experiment_spec(family, par)
        final = float(np.mean((np.asarray(mq.quantize(samples, t.theta, spec)) - samples) ** 2))
        assert final == pytest.approx(float(t.mse[-1]), rel=1e-5)


def test_u3_and_u1_start_from_the_same_quantizer():
    samples = gaussian.gaussian_samples(key=jax.random.key(1), num_samples=1000)
    start = {
        par: gaussian.run_case("uniform", par, samples, learning_rate=0.0, steps=1).mse[0]
        for par in ("b_d", "b_qmax", "d_qmax")
    }
    assert len(set(start.values())) == 1


def test_verdict_is_computed_not_assumed():
    def summary(name, final, osc=0.0):
        return gaussian.Summary(
            name=name,
            short_name=name,
            initial_mse=1.0,
            final_mse=final,
            min_mse=final,
            argmin_step=0,
            oscillation=osc,
            rises=0,
            initial_bits=4.0,
            final_bits=4.0,
            finite=True,
        )

    keys = [gaussian.case_id(f, p) for f, p in gaussian.CASES]
    finals = [3, 2, 1, 3, 2, 1]  # U3 and P3 lowest in their families
    good = {k: summary(k, v) for k, v in zip(keys, finals, strict=True)}
    assert all(v.holds for v in gaussian.verdict(good).values())
    bad = dict(good)
    bad[keys[2]] = summary(keys[2], 5.0)  # U3 worse than U1
    bad[keys[5]] = summary(keys[5], 0.5, osc=1.0)  # P3 lowest but oscillating
    v = gaussian.verdict(bad)
    assert not v["uniform"].holds and not v["pow2"].holds


def test_the_command_writes_its_results_and_figures(tmp_path):
    gaussian.main(["--smoke", "--lrs", "0.01", "--out_dir", str(tmp_path)])
    record = json.loads((tmp_path / "gaussian_mse.json").read_text())
    assert [(r["setting"], r["learning_rate"]) for r in record["runs"]] == [
        ("pow2 step", 0.01),
        ("free step", 0.01),
    ]
    assert set(record["runs"][0]["cases"]) == {gaussian.case_id(f, p) for f, p in gaussian.CASES}
    assert record["config"]["steps"] == gaussian.SMOKE_STEPS
    for name in ("gaussian_mse.md", "gaussian_mse.png", "gaussian_mse_all.png"):
        assert (tmp_path / name).stat().st_size > 0
