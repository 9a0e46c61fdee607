"""The ImageNet rows (mpdnn.configs.imagenet, experiments/imagenet.py): Table 4, our recipe."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from mpdnn import data as mdata
from mpdnn import models
from mpdnn.configs import imagenet
from mpdnn.models.convert import to_torchvision
from mpdnn.training import config as cfg
from mpdnn.training import trainer

EXPERIMENT = Path(__file__).resolve().parents[1] / "experiments" / "imagenet.py"


def row(name: str, protocol: str | None = None):
    spec = importlib.util.spec_from_file_location("imagenet_experiment", EXPERIMENT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(f"row={name}" + (f",protocol={protocol}" if protocol else ""))


def test_rows_and_listing():
    assert len(imagenet.ROWS) == 10
    listed = imagenet.listing().splitlines()
    for name in imagenet.ROWS:
        cfg.check(row(name))
        head = next(i for i, line in enumerate(listed) if line.startswith(f"{name} "))
        assert f"experiments/imagenet.py:row={name} " in listed[head + 2]
    with pytest.raises(cfg.ConfigError, match="unknown protocol 'reduced'"):
        row("resnet18_float", "reduced")
    # docs/method.md §9 Table 4, typed from there.
    assert imagenet.ROWS["mobilenet_v2_ours_budget"].paper_error == 30.26
    assert imagenet.ROWS["resnet18_fixed_w4a4"].paper_error == 34.15


@pytest.mark.parametrize(
    "network, mb", [("mobilenet_v2", (1.65, 0.57)), ("resnet18", (5.57, 0.38))]
)
def test_budgets_are_the_fixed_4_bit_sizes(network, mb):
    """The budgets equal our accounting of the fixed 4/4 network, which docs/method.md §9 rounds to
    two decimals in MB."""
    budgets = imagenet.NETWORKS[network]["budgets_kb"]
    assert round(budgets["weight_kb"] / 1024, 2) == mb[0]
    assert round(budgets["act_max_kb"] / 1024, 2) == mb[1]
    c = row(f"{network}_fixed_w4a4")
    c.init.torchvision = None
    dataset = mdata.load_dataset(
        "synthetic", image_shape=(224, 224, 3), num_classes=1000, num_train=1, num_test=1
    )
    model = trainer.build_model(c, dataset, Path("unused"))
    from mpdnn import optim

    sizes = optim.Accounting.from_model(model)(nnx.state(model, nnx.Param))
    assert float(sizes["weight_kb"]) == pytest.approx(budgets["weight_kb"])
    assert float(sizes["act_max_kb"]) == pytest.approx(budgets["act_max_kb"])


def test_lambda_scales_with_the_squared_size_ratio():
    c = row("mobilenet_v2_ours_budget")
    assert c.budget.strengths.weight_kb == pytest.approx(0.1 * (70.1 / 1694.70703125) ** 2)
    assert c.budget.strengths.act_max_kb == pytest.approx(0.1 * (8.1 / 588.0) ** 2)
    assert cfg.strength(c, "weight_kb", 1694.7) == pytest.approx(1.711e-4, rel=1e-3)
    assert row("resnet18_ours_nobudget").budget.weight_kb is None


@pytest.mark.parametrize("name", ["mobilenet_v2_ours_budget"])  # resnet18: test_experiments
def test_smoke(name, tmp_path):
    config = row(name, "smoke")
    config.train.progress = False
    result = trainer.train_and_evaluate(config, tmp_path)
    assert result.status == "completed" and result.step == 2
    assert np.isfinite(result.final_test_error)


def test_pretrained_init_loads_torchvision_weights_before_quantizing(tmp_path):
    """init.torchvision: a state dict (here our own model's, in torchvision's names and
    layouts) is what the quantized model's float weights start from."""
    source = models.build("mobilenet_v2", rngs=nnx.Rngs(7), input_shape=(64, 64, 3), num_classes=10)
    path = tmp_path / "mbv2.npz"
    np.savez(path, **to_torchvision(source))
    config = row("mobilenet_v2_ours_budget", "smoke")
    config.init.torchvision = str(path)
    dataset = mdata.load_dataset(
        "synthetic", image_shape=(64, 64, 3), num_classes=10, num_train=1, num_test=1
    )
    model = trainer.build_model(config, dataset, tmp_path)
    got = model.stem.kernel[...] if hasattr(model, "stem") else None
    want = source.stem.kernel[...] if hasattr(source, "stem") else None
    assert got is not None and want is not None
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert len(leaves) > len(jax.tree.leaves(nnx.state(source, nnx.Param)))  # + quantizer θ
    config.init.torchvision = str(tmp_path / "missing.npz")
    with pytest.raises(cfg.ConfigError, match="init.torchvision"):
        trainer.build_model(config, dataset, tmp_path)
