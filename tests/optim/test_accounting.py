"""Accounting: docs/method.md §5 sizes as a pure function of the parameter pytree.

Every expected number comes from docs/method.md §5 and the ResNet-20 shapes of docs/method.md §7,
counted here
by hand, or from memory(model) (itself tested against docs/method.md §5 in tests/models).
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mpdnn.quantizers as mq
from mpdnn import models, nn
from mpdnn.optim import Accounting, memory
from mpdnn.optim.accounting import leaves_by_path

KB = 8 * 1024
Q = nn.QuantConfig

# Every mode and the paper's parametrizations, side by side in one ResNet-20.
MIXED_RULES = [
    nn.Rule("stem", Q(mode="fixed", bits=8), kind="weight"),
    nn.Rule("head", Q(mode="tqt", bits=4), kind="weight"),
    nn.Rule(r"stages\.0\..*", Q(bits=4), kind="weight"),  # U3
    nn.Rule(r"stages\.1\..*", Q(family="pow2", bits=4), kind="weight"),  # P3
    nn.Rule(r"stages\.2\.0\..*", Q(parametrization="b_d", bits=3), kind="weight"),  # U1
    nn.Rule("stem_act", Q(mode="fixed", bits=8), kind="activation"),
    nn.Rule(r"stages\.0\..*", Q(bits=4), kind="activation"),  # U3
    nn.Rule(r"stages\.1\..*", Q(family="pow2", bits=4), kind="activation"),  # P3
    nn.Rule(r"stages\.2\.0\..*", Q(mode="tqt", bits=3), kind="activation"),
]  # stages.2.1, stages.2.2 (weights and activations) stay float

U3_RULES = [nn.Rule(".*", Q(bits=4), kind="weight"), nn.Rule(".*", Q(bits=4), kind="activation")]


def resnet20_layers():
    """``(path, numel)`` of every weight tensor and ``(path, numel)`` of every activation
    tensor of ResNet-20, from docs/method.md §7 (stem 3→16, stages 16/32/64 at 32/16/8 px, head
    64→10).
    """
    weights = [("stem", 3 * 3 * 3 * 16)]
    acts = [("stem_act", 16 * 32 * 32)]
    in_c = 16
    for s, (width, size) in enumerate(((16, 32), (32, 16), (64, 8))):
        for b in range(3):
            weights += [
                (f"stages.{s}.{b}.conv1", 9 * in_c * width),
                (f"stages.{s}.{b}.conv2", 9 * width * width),
            ]
            acts += [(f"stages.{s}.{b}.act{i}", width * size * size) for i in (1, 2)]
            in_c = width
    weights += [("head", 64 * 10), ("head.bias", 10)]
    return weights, acts


def mixed_bits(path: str, kind: str, learned_min: bool = False) -> float:
    """Bits of a tensor of the MIXED_RULES model at init (or learned ones at b_min)."""
    if path.startswith("stem"):
        return 8.0  # fixed
    if path.startswith("head"):
        return 4.0  # TQT
    if path.startswith(("stages.2.1", "stages.2.2")):
        return 32.0  # float
    if path.startswith("stages.2.0"):
        if kind == "activation":
            return 3.0  # TQT
        return 2.0 if learned_min else 3.0  # U1, b_range (2, 8)
    # U3 / P3, learned: init 4 bits; b_min 2 for weights, 1 for activations (docs/method.md §3)
    return (2.0 if kind == "weight" else 1.0) if learned_min else 4.0


def hand_sizes(bits_of) -> dict[str, float]:
    weights, acts = resnet20_layers()
    act_kb = [n * bits_of(p, "activation") / KB for p, n in acts]
    return {
        "weight_kb": sum(n * bits_of(p, "weight") / KB for p, n in weights),
        "act_max_kb": max(act_kb),
        "act_sum_kb": sum(act_kb),
    }


def quantized(rules) -> nnx.Module:
    model = models.build("resnet20", rngs=nnx.Rngs(0))
    nn.quantize_model(model, rules)
    return model


@pytest.fixture(scope="module")
def mixed():
    model = quantized(MIXED_RULES)
    return model, Accounting.from_model(model)


def perturbed(model: nnx.Module, seed: int) -> nnx.Module:
    """A copy whose learned θ are scaled by random factors in [1/4, 4] (bits change)."""
    model = nnx.clone(model)
    theta = nnx.state(model, nn.QuantParam)
    leaves, treedef = jax.tree.flatten(theta)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    scaled = [
        v * jnp.exp2(jax.random.uniform(k, v.shape, minval=-2.0, maxval=2.0))
        for v, k in zip(leaves, keys, strict=True)
    ]
    nnx.update(model, jax.tree.unflatten(treedef, scaled))
    return model


def as_floats(sizes) -> dict[str, float]:
    return {k: float(v) for k, v in dict(sizes).items()}


def test_static_description_of_the_mixed_model(mixed):
    _, acc = mixed
    by_path = {q.path: q for q in acc.quantizers}
    weights, acts = resnet20_layers()
    assert len(acc.quantizers) == len(weights) + len(acts) == 21 + 19
    stem, head = by_path["stem.kernel_quant"], by_path["head.kernel_quant"]
    assert (stem.learned, stem.constants.keys()) == ((), {"b", "qmax"})
    assert stem.constants["b"] == 8.0 and not stem.learns_bits
    assert head.learned == ("qmax",) and head.constants == {"b": 4.0} and not head.learns_bits
    assert by_path["head.bias_quant"].numel == 10
    u3 = by_path["stages.0.1.conv1.kernel_quant"]
    assert (u3.learned, u3.constants, u3.kind, u3.numel) == (("d", "qmax"), {}, "weight", 2304)
    assert u3.learns_bits and u3.spec.parametrization == "d_qmax"
    p3 = by_path["stages.1.2.act2.quant"]
    assert (p3.learned, p3.kind, p3.numel, p3.spec.family) == (
        ("qmin", "qmax"),
        "activation",
        8192,
        "pow2",
    )
    assert by_path["stages.2.0.conv2.kernel_quant"].learned == ("b", "d")  # U1
    assert by_path["stages.2.2.act1.quant"].spec is None  # float


def test_sizes_at_init_equal_memory_and_a_hand_count(mixed):
    model, acc = mixed
    params = nnx.state(model, nnx.Param)
    expected = hand_sizes(mixed_bits)
    assert as_floats(acc(params)) == pytest.approx(expected, rel=1e-6)
    report = memory(model)
    for name in expected:
        assert float(getattr(report, name)) == pytest.approx(expected[name], rel=1e-6)


@pytest.mark.parametrize("seed", [0])
def test_sizes_equal_memory_after_theta_moves_in_every_tree_form(mixed, seed):
    model, acc = mixed
    moved = perturbed(model, seed)
    report = memory(moved)
    expected = {k: float(getattr(report, k)) for k in ("weight_kb", "act_max_kb", "act_sum_kb")}
    assert expected != pytest.approx(hand_sizes(mixed_bits))  # the bits did change
    state = nnx.state(moved, nnx.Param)
    pure = nnx.to_pure_dict(state)
    is_theta = jax.tree_util.tree_map_with_path(
        lambda p, _: jax.tree_util.keystr(p).endswith(("'d']", "'qmax']", "'qmin']", "'b']")),
        pure,
    )
    masked = jax.tree.map(lambda v, m: v if m else optax.MaskedNode(), pure, is_theta)
    assert len(jax.tree.leaves(masked)) < len(jax.tree.leaves(pure))  # weights are gone
    for params in (state, pure, masked):
        assert as_floats(acc(params)) == pytest.approx(expected, rel=1e-6)
    assert as_floats(jax.jit(acc)(masked)) == pytest.approx(expected, rel=1e-6)


def test_theta_looks_up_learned_values_and_fills_constants(mixed):
    model, acc = mixed
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    by_path = {q.path: q for q in acc.quantizers}
    head = acc.theta(pure, by_path["head.kernel_quant"])
    assert float(head["b"]) == 4.0
    assert float(head["qmax"]) == float(model.head.kernel_quant.qmax[...])
    u3 = acc.theta(pure, by_path["stages.0.0.act1.quant"])
    # docs/method.md §4
    assert float(u3["d"]) == 2.0**-3 and float(u3["qmax"]) == pytest.approx(1.875)


def test_missing_learned_theta_is_a_clear_error(mixed):
    model, acc = mixed
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    del pure["stages"][1][2]["conv2"]["kernel_quant"]["qmin"]
    with pytest.raises(ValueError, match=r"stages\.1\.2\.conv2\.kernel_quant\.qmin"):
        acc(pure)
    with pytest.raises(ValueError, match="not in params"):
        jax.jit(acc)({"something": {"else": jnp.ones(3)}})


def test_min_sizes_all_learned_u3_is_spec_5_at_b_min():
    """docs/method.md §5: 268,346 weights at b_min = 2 → 65.5 KB; 188,416 activation values at
    b_min = 1: max 16·32·32 bits = 2 KB, sum 23 KB."""
    model = quantized(U3_RULES)
    acc = Accounting.from_model(model)
    weights, acts = resnet20_layers()
    num_w, num_a = sum(n for _, n in weights), sum(n for _, n in acts)
    assert (num_w, num_a) == (268_346, 188_416)
    smallest = acc.min_sizes()
    assert smallest == pytest.approx(
        {"weight_kb": num_w * 2 / KB, "act_max_kb": 16 * 32 * 32 / KB, "act_sum_kb": num_a / KB}
    )
    assert round(smallest["weight_kb"], 1) == 65.5
    # ...and training can reach it: qmax = d gives one level per side, i.e. b_min bits.
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    at_min = jax.tree.map(lambda v: v, pure)  # a copy; then qmax := d everywhere
    for q in acc.quantizers:
        node = at_min
        for key in q.path.split("."):
            node = node[int(key) if key.isdigit() else key]
        node["qmax"] = node["d"]
    assert as_floats(acc(at_min)) == pytest.approx(smallest, rel=1e-6)


def test_min_sizes_keep_fixed_tqt_and_float_bits(mixed):
    _, acc = mixed
    expected = hand_sizes(lambda p, k: mixed_bits(p, k, learned_min=True))
    assert acc.min_sizes() == pytest.approx(expected, rel=1e-9)
    # stem act at 8 fixed bits and the float stage-2 acts (4096·32 bits) tie at 16 KB
    assert acc.min_sizes()["act_max_kb"] == pytest.approx(16.0)


def test_act_max_gradient_goes_to_the_first_argmax_only():
    """Seven 16×32×32 activations tie at 4 bits; only the first (stem_act) gets ∂max/∂θ.
    Unsigned U3: b = ceil(log2(qmax/d + 1)) → ∂b/∂qmax = 1 / ((qmax/d + 1) d ln 2)."""
    model = quantized(U3_RULES)
    acc = Accounting.from_model(model)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    max_and_sum = jax.jit(jax.jacrev(lambda p: jnp.stack(acc.sizes(p)[1:])))(params)
    grads = jax.tree.map(lambda g: g[0], max_and_sum)
    d, qmax = 2.0**-3, 1.875
    expected = 16 * 32 * 32 / ((qmax / d + 1) * d * math.log(2)) / KB
    np.testing.assert_allclose(grads["stem_act"]["quant"]["qmax"], expected, rtol=1e-5)
    for b in range(3):
        for i in (1, 2):
            assert float(grads["stages"][0][b][f"act{i}"]["quant"]["qmax"]) == 0.0
    # the sum gives every tied tensor the same gradient
    grads = jax.tree.map(lambda g: g[1], max_and_sum)
    np.testing.assert_allclose(grads["stages"][0][2]["act2"]["quant"]["qmax"], expected, rtol=1e-5)


def test_memory_rows_are_unchanged_by_the_shared_core(mixed):
    model, acc = mixed
    report = memory(model)
    assert [r.path for r in report.rows] == [q.site for q in acc.quantizers]
    assert [r.numel for r in report.rows] == [q.numel for q in acc.quantizers]
    assert report.num_weights == 268_346 and report.num_activations == 188_416
    # the row of a float tensor counts 32 bits
    row = next(r for r in report.rows if r.path == "stages.2.2.conv2")
    assert float(row.bits) == 32.0 and float(row.kb) == pytest.approx(36864 * 32 / KB)


def test_to_json_is_the_hand_count_in_plain_json_values(mixed):
    model, _ = mixed
    record = memory(model).to_json()
    assert json.loads(json.dumps(record, allow_nan=False)) == record  # plain JSON values
    assert record["model"] == "ResNetCifar" and record["input_shape"] == [32, 32, 3]
    assert memory(model).to_json("resnet20")["model"] == "resnet20"
    weights, acts = resnet20_layers()
    expected = hand_sizes(mixed_bits)
    assert record["num_weights"] == sum(n for _, n in weights) == 268_346
    assert record["num_activations"] == sum(n for _, n in acts) == 188_416
    assert record["num_activation_tensors"] == len(acts) == 19
    for key in ("weight_kb", "act_max_kb", "act_sum_kb"):
        assert record[key] == pytest.approx(expected[key], rel=1e-6)
    assert record["weight_mb"] == record["weight_kb"] / 1024  # 1 MB = 2**20 bytes
    assert record["units"] == "1 KB = 1024 bytes, 1 MB = 2**20 bytes; activations per sample"
    layers = record["layers"]
    assert [r["index"] for r in layers] == list(range(len(weights) + len(acts)))
    by_name = {
        (r["path"] + ".bias" if r["tensor"] == "bias" else r["path"], r["kind"]): r for r in layers
    }
    hand = [(p, "weight", n) for p, n in weights] + [(p, "activation", n) for p, n in acts]
    assert set(by_name) == {(p, k) for p, k, _ in hand}
    for path, kind, numel in hand:
        row = by_name[(path, kind)]
        weight_tensor = "bias" if path.endswith(".bias") else "kernel"
        assert row["tensor"] == ("act" if kind == "activation" else weight_tensor)
        assert row["numel"] == numel == math.prod(row["shape"])
        assert row["bits"] == mixed_bits(path, kind)
        assert row["kb"] == pytest.approx(numel * mixed_bits(path, kind) / KB, rel=1e-6)
        assert isinstance(row["bits"], float) and isinstance(row["kb"], float)
    # forward order: each conv before its activation, the head last
    paths = [r["path"] for r in layers]
    assert paths[:2] == ["stem", "stem_act"] and paths[-2:] == ["head", "head"]
    assert paths.index("stages.1.0.conv1") < paths.index("stages.1.0.act1")
    quantizers = {r["path"]: r["quantizer"] for r in layers}
    assert quantizers["stem"] == "uniform fixed 8b" and quantizers["stages.2.2.act1"] == "float"


def _scalar_sizes(acc: Accounting, params) -> dict[str, jax.Array]:
    """The sizes written out a tensor at a time: each quantizer's own mq.bitwidth, its KB,
    the weights summed left to right, the activations' max at the first argmax."""
    weight, acts = jnp.float32(0.0), []
    for q in acc.quantizers:
        if q.spec is None:
            bits = jnp.float32(32.0)
        else:
            bits = jnp.mean(mq.bitwidth(acc.theta(params, q), q.spec))
        kb = q.numel * bits / KB
        if q.kind == "weight":
            weight = weight + kb
        else:
            acts.append(kb)
    act_kb = jnp.stack(acts)
    act_max = act_kb[jnp.argmax(jax.lax.stop_gradient(act_kb))]
    return {"weight_kb": weight, "act_max_kb": act_max, "act_sum_kb": jnp.sum(act_kb)}


@pytest.mark.parametrize("vectorized", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_sizes_and_their_gradient_equal_the_scalar_count_bit_for_bit(mixed, seed, vectorized):
    """Both ways of computing (grouped scalars, the default; vectors, fewer kernels in a
    training step): sizes and the gradient of a penalty on them exactly those of the
    tensor-at-a-time count."""
    model, _ = mixed
    acc = Accounting.from_model(model, vectorized=vectorized)
    assert acc.vectorized == vectorized
    params = nnx.to_pure_dict(nnx.state(perturbed(model, seed), nnx.Param))

    def penalty(size_fn):
        def f(p):
            s = size_fn(p)
            return (
                0.1 * jnp.maximum(0.0, s["weight_kb"] - 10.0) ** 2
                + 0.3 * jnp.maximum(0.0, s["act_max_kb"] - 1.0) ** 2
                + 0.01 * s["act_sum_kb"]
            )

        return f

    ours, reference = jax.jit(acc)(params), jax.jit(lambda p: _scalar_sizes(acc, p))(params)
    for name in ("weight_kb", "act_max_kb", "act_sum_kb"):
        np.testing.assert_array_equal(ours[name], reference[name])
    grad = jax.jit(jax.grad(penalty(acc)))(params)
    grad_ref = jax.jit(jax.grad(penalty(lambda p: _scalar_sizes(acc, p))))(params)
    learned = acc.learned_paths()
    theta_grads = [v for k, v in leaves_by_path(grad).items() if k in learned]
    assert any(float(jnp.max(jnp.abs(v))) > 0 for v in theta_grads)  # the penalty reaches θ
    jax.tree.map(np.testing.assert_array_equal, grad, grad_ref)
