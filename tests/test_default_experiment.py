"""The default experiment (``python -m mpdnn.train`` with no flags) delivers a model within
its weight budget, with the per-layer bits the summary claims: its final model, whose
quantizers froze within the budget (mpdnn's recipe)."""

from __future__ import annotations

import json

import numpy as np

from mpdnn.configs import digits
from mpdnn.training import config as cfg
from mpdnn.training.trainer import train_and_evaluate


def test_learned_digits_model_meets_its_budget(tmp_path):
    config = digits.get_config()
    config.run_variants = "float,learned"
    runs = cfg.variants(config)
    assert list(runs) == ["float", "learned"]  # float first: learned starts from it
    results = {}
    for name, run in runs.items():
        run.train.progress = False
        results[name] = train_and_evaluate(run, tmp_path / name)
    learned = results["learned"]
    # mpdnn's recipe: the quantizers froze within the budget, the final model is delivered
    assert learned.feasible is True and learned.delivered == "final"
    assert learned.frozen_step is not None
    assert learned.final_sizes["weight_kb"] <= digits.WEIGHT_BUDGET_KB
    assert learned.budgets == {"weight_kb": digits.WEIGHT_BUDGET_KB}
    # Recount the delivered weight memory from the report's rows (docs/method.md §5: numel · b /
    # 8192).
    report = json.loads((tmp_path / "learned" / "report.json").read_text())
    weights = [r for r in report["layers"] if r["kind"] == "weight"]
    assert sum(r["numel"] for r in weights) == 14_298  # 144 + 4608 + 9216 + 320 + 10
    kb = sum(r["numel"] * r["bits"] for r in weights) / 8192
    assert kb <= digits.WEIGHT_BUDGET_KB
    np.testing.assert_allclose(kb, learned.delivered_sizes["weight_kb"], rtol=1e-6)
    assert all(float(r["bits"]).is_integer() and r["bits"] >= 2 for r in weights)
    # A working classifier, not a collapsed one (10 classes: chance is 0.1).
    assert learned.delivered_test_error < 0.2
    assert results["float"].delivered_test_error < 0.1
