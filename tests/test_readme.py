"""The README's example runs as written and says what its comments say."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs_and_its_comments_hold():
    text = README.read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)
    assert float(scope["theta"]["d"]) == 2**-5 and float(scope["theta"]["qmax"]) == 7 / 32
    assert scope["w_q"].shape == scope["w"].shape and scope["w_q"].dtype == scope["w"].dtype
    assert float(scope["mq"].bitwidth(scope["theta"], scope["spec"])) == 4.0
    assert set(scope["grads"]) == {"d", "qmax"}


def test_readme_quantize_a_network_example_runs_with_the_documented_numbers():
    code = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[1]
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)
    totals = scope["memory"](scope["model"]).totals()
    # stem (432) and head (640 + 10) fixed at 8 bits, the other 267,264 conv weights at 2
    assert totals["weight_kb"] == ((432 + 650) * 8 + (267_696 - 432) * 2) / 8 / 1024
    assert (totals["act_max_kb"], totals["act_sum_kb"]) == (8.0, 92.0)


def test_readme_quick_start_is_the_two_commands_ci_runs():
    text = README.read_text()
    assert 'pip install -e ".[dev]" && python -m mpdnn.train' in text
    ci = (README.parent / ".ci" / "run").read_text()
    assert 'pip install --quiet -e ".[dev]"' in ci and "python -m mpdnn.train" in ci
    assert ci.rstrip().endswith("pytest")


def test_every_config_the_docs_name_loads():
    """Each ``--config FILE[:arg]`` in the README, docs/ and the experiments' docstrings names a
    file that exists and an argument its ``get_config`` accepts (placeholders skipped)."""
    import importlib.util

    from mpdnn.training import config as cfg

    root = README.parent
    texts = [README, *root.glob("docs/*.md"), *root.glob("experiments/*.py")]
    found = set()
    for path in texts:
        for m in re.finditer(r"--config[= ](\S+?\.py)(?::(\S+))?(?=[\s`\\]|$)", path.read_text()):
            file, arg = m.group(1), m.group(2)
            if "<" in file + (arg or "") or "{" in file + (arg or ""):
                continue
            found.add((file, arg))
    assert ("experiments/cifar10.py", "row=float,protocol=smoke") in found
    for file, arg in sorted(found, key=str):
        assert (root / file).is_file(), file
        spec = importlib.util.spec_from_file_location("docs_config", root / file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        cfg.check(module.get_config(arg))
