"""What the tests of the optax transforms share: tree helpers, the models' sizes written out
from docs/method.md §5, closed-form size gradients (docs/method.md §2–3) and θ set outside
their boxes."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

KB = 8 * 1024
NUM_WEIGHTS, NUM_ACTS = 268_346, 188_416  # ResNet-20, docs/method.md §5
W4_KB = NUM_WEIGHTS * 4 / KB  # every weight at 4 bits: 131.03 KB
A4_SUM_KB = NUM_ACTS * 4 / KB  # every activation at 4 bits: 92 KB
TINY_W_KB = (4 * 8 + 8 + 8 * 3 + 3) * 4 / KB  # fc1 U3, fc2 U1: kernels and biases at 4 bits
TINY_A_KB = 8 * 4 / KB  # the P3 activation after fc1 at 4 bits

CROSSED = {
    "fc1.kernel_quant.d": 0.5,  # U3 with d > qmax: the pair swaps, 1e-5 apart
    "fc1.kernel_quant.qmax": 0.2,
    "fc1.bias_quant.qmax": 300.0,  # above the weight qmax box (127)
    "act.quant.qmin": 1e-9,  # P3 below its box (2^-14)
    "act.quant.qmax": 1000.0,  # above its box (255)
    "fc2.kernel_quant.b": 20.0,  # U1 b above b_range (2, 8)
    "fc2.kernel_quant.d": -1.0,  # below d_range
}


def node(tree, path: str):
    for key in path.split("."):
        tree = tree[int(key) if key.isdigit() else key]
    return tree


def float_count(schedule):
    """``schedule`` fed a float32 count: optax's schedules mix their int32 count with Python
    floats, which the suite's strict dtype promotion rejects."""
    return lambda count: schedule(jnp.asarray(count, jnp.float32))


def zeros_like(tree):
    return jax.tree.map(jnp.zeros_like, tree)


def random_like(tree, seed: int, scale: float = 1.0):
    """Standard normal leaves times ``scale``, one key per leaf."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        treedef, [scale * jax.random.normal(k, v.shape) for v, k in zip(leaves, keys, strict=True)]
    )


def with_values(params, values: dict[str, float | np.ndarray]):
    params = jax.tree.map(lambda v: v, params)
    for path, value in values.items():
        head, name = path.rsplit(".", 1)
        node(params, head)[name] = jnp.asarray(value, jnp.float32)
    return params


def u3_weight_size_grad(theta, numel: int) -> tuple[float, float]:
    """∂S/∂(d, qmax) in KB of one signed U3 weight site, from docs/method.md §2–3 by hand.

    d_s = 2^round(log2 d) (straight-through: ∂d_s/∂d = d_s/d); r = round(qmax/d_s) (STE);
    b = ceil(log2(r + 1)) + 1 (STE ceil): ∂b/∂r = 1/((r + 1) ln 2); S = numel·b/8192.
    """
    d, qmax = float(theta["d"]), float(theta["qmax"])
    d_s = 2.0 ** round(math.log2(d))
    r = qmax / d_s
    assert r == round(r)  # the init puts qmax on the grid, so round(r) = r
    db_dr = 1.0 / ((r + 1.0) * math.log(2.0))
    db_dqmax = db_dr / d_s
    db_dd = db_dr * (-qmax / d_s**2) * (d_s / d)
    return numel * db_dd / KB, numel * db_dqmax / KB
