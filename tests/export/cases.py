"""Models and helpers shared by the export tests (tests/export/conftest.py holds the run)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

import mpdnn.quantizers as mq
from mpdnn import export as ex
from mpdnn.models import build
from mpdnn.nn import LogitScale, quantize_model

NUM_WEIGHTS_RESNET20 = 268346  # docs/method.md §5


def quantized_values(w, theta, spec):
    return np.asarray(mq.quantize(jnp.asarray(w, jnp.float32), theta, spec))


def round_trip(tmp_path, tensors):
    path = tmp_path / "t.mpq"
    sizes = ex.write(path, tensors)
    return sizes, ex.load(path)


def randomize_batch_norms(model, seed=0):
    """Running statistics a trained net might have (fresh ones make most sites zero)."""
    rng = np.random.default_rng(seed)
    for _, m in nnx.iter_modules(model):
        if isinstance(m, nnx.BatchNorm):
            n = m.mean[...].shape[0]
            m.mean[...] = rng.normal(0, 0.3, n).astype(np.float32)
            m.var[...] = rng.uniform(0.2, 2, n).astype(np.float32)
            m.scale[...] = rng.uniform(0.5, 1.5, n).astype(np.float32)
            m.bias[...] = rng.normal(0.3, 0.3, n).astype(np.float32)


def resnet20(rules, *, logit_scale=False, seed=0):
    """A quantized ResNet-20 with non-trivial BatchNorm statistics (eval mode)."""
    model = build("resnet20", rngs=nnx.Rngs(seed))
    quantize_model(model, rules)
    randomize_batch_norms(model, seed)
    if logit_scale:
        model = LogitScale(model)
        model.scale[...] = 1.7
    model.eval()
    return model


def run_config():
    from mpdnn.training import config as cfg

    c = cfg.base_config()
    c.name = "export_resnet20"
    c.data.name = "synthetic"
    c.data.synthetic_shape = (32, 32, 3)
    c.data.synthetic_train = 32
    c.data.synthetic_test = 32
    c.train.batch_size = 16  # 2 steps
    c.train.eval_batch_size = 32
    c.train.epochs = 1
    c.train.steps_per_call = 2
    c.train.progress = False
    c.optim.learning_rate = 0.03
    for kind in (c.quant.weights, c.quant.activations):
        kind.mode = "learned"  # U3, from 4 bits
    c.budget.weight_kb = 200.0  # met from the start: delivered = best feasible (best/)
    c.budget.recipe = "paper"  # (mpdnn's recipe would freeze and deliver final/)
    return c
