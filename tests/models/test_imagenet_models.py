"""ResNet-18 and MobileNetV2 (docs/method.md §5, §7, §9 Table 4): topology, memory, quantization.

Every expected number is either SPEC's or recomputed here from the torchvision architecture
tables with plain Python arithmetic, never read from the code under test. Each model is built
once at 224×224 (module fixture); forward and gradient run at 64×64, one compile per model.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mpdnn.models import MODELS, build
from mpdnn.nn import (
    ActQuant,
    QuantConfig,
    QuantizedWeights,
    QuantParam,
    Rule,
    quantizable_sites,
    quantize_model,
)
from mpdnn.optim import memory

MB = 2.0**20  # bytes (docs/method.md §5)
SMALL = (64, 64, 3)  # forward/gradient input: the nets are fully convolutional up to the pool
RULES_4BIT = [
    Rule(".*", QuantConfig(bits=4), kind="weight"),
    Rule(".*", QuantConfig(bits=4), kind="activation"),
]


def conv_out(size: int, kernel: int, stride: int, pad: int) -> int:
    """Output size of a torch conv / pool (floor mode)."""
    return (size + 2 * pad - kernel) // stride + 1


# --------------------------------------------------------------------------------------------
# Independent counts from the torchvision architectures.


@dataclasses.dataclass(frozen=True)
class Arch:
    """What the torchvision architecture implies: weights, conv/linear layers, BN channels,
    and the per-sample (H, W, C) shape and signedness of every activation site."""

    weights: int
    weight_layers: int
    bn_channels: int
    acts: tuple[tuple[tuple[int, int, int], bool], ...]
    identity_shortcuts: int  # blocks whose input is added unchanged


def resnet18_arch(size: int = 224, classes: int = 1000) -> Arch:
    weights, layers, bn = 7 * 7 * 3 * 64, 1, 64
    s = conv_out(size, 7, 2, 3)
    acts = [((s, s, 64), False)]
    s = conv_out(s, 3, 2, 1)  # max pool: no site (the module docstring says why)
    cin, identities = 64, 0
    for width, first_stride in zip((64, 128, 256, 512), (1, 2, 2, 2), strict=True):
        for j in range(2):
            stride = first_stride if j == 0 else 1
            s = conv_out(s, 3, stride, 1)
            weights += 9 * cin * width + 9 * width * width
            layers, bn = layers + 2, bn + 2 * width
            if stride != 1 or cin != width:
                weights, layers, bn = weights + cin * width, layers + 1, bn + width
            else:
                identities += 1
            acts += [((s, s, width), False)] * 2
            cin = width
    return Arch(weights + 512 * classes + classes, layers + 1, bn, tuple(acts), identities)


MOBILENET_V2_TABLE = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1)]
MOBILENET_V2_TABLE += [(6, 160, 3, 2), (6, 320, 1, 1)]


def mobilenet_v2_arch(size: int = 224, classes: int = 1000) -> Arch:
    s = conv_out(size, 3, 2, 1)
    weights, layers, bn, cin, identities = 3 * 3 * 3 * 32, 1, 32, 32, 0
    acts = [((s, s, 32), False)]
    for t, c, n, first_stride in MOBILENET_V2_TABLE:
        for j in range(n):
            hidden = cin * t
            if t != 1:
                weights, layers, bn = weights + cin * hidden, layers + 1, bn + hidden
                acts.append(((s, s, hidden), False))
            stride = first_stride if j == 0 else 1
            identities += stride == 1 and cin == c
            s = conv_out(s, 3, stride, 1)
            weights, layers, bn = weights + 9 * hidden, layers + 1, bn + hidden  # depthwise
            acts.append(((s, s, hidden), False))
            weights, layers, bn = weights + hidden * c, layers + 1, bn + c
            acts.append(((s, s, c), True))  # block output: linear bottleneck (+ residual)
            cin = c
    weights, layers, bn = weights + cin * 1280, layers + 1, bn + 1280
    acts.append(((s, s, 1280), False))
    return Arch(weights + 1280 * classes + classes, layers + 1, bn, tuple(acts), identities)


@dataclasses.dataclass(frozen=True)
class Case:
    """One network: its independent architecture count and the expected numbers."""

    name: str
    arch: Arch
    torchvision_params: int  # published total, BN affine parameters included
    act_sites: int  # our documented design (module docstrings)
    signed_sites: int
    mb: dict[str, float]  # at 2 decimals: docs/method.md §5 / §9 Table 4's, except where noted
    paths: frozenset[str]  # some quantizable-site paths that must exist
    absent: frozenset[str] = frozenset()


CASES = {
    "resnet18": Case(
        "resnet18",
        resnet18_arch(),
        torchvision_params=11_689_512,
        act_sites=1 + 8 * 2,  # stem + two ReLUs per basic block; max pool is no site
        signed_sites=0,
        mb={
            "weight32": 44.56,
            "weight4": 5.57,
            "act_max4": 0.38,
            # docs/method.md §9 Table 4 prints 3.04 MB, but the 64×112×112 stem output is exactly
            # 802,816 · 4 B = 3.0625 MB (3.06); 3.04 = 8 × 0.38, the 4-bit value rounded
            # first. Checked below against the exact value, not against 3.04.
            "act_max32": 3.06,
        },
        paths=frozenset(
            {"stem", "stem_act", "stages.0.1.conv1", "stages.0.1.act2", "head"}
            | {f"stages.{i}.0.downsample" for i in (1, 2, 3)}  # and no other downsample
        ),
    ),
    "mobilenet_v2": Case(
        "mobilenet_v2",
        mobilenet_v2_arch(),
        torchvision_params=3_504_872,
        # ReLU6: stem + (expand if t > 1) + depthwise per block + final 1280.
        act_sites=1 + sum(n * (2 if t > 1 else 1) for t, _, n, _ in MOBILENET_V2_TABLE) + 1,
        signed_sites=sum(n for _, _, n, _ in MOBILENET_V2_TABLE),  # one per block output
        mb={
            # SPEC prints 13.23 MB, but the exact count, 3,470,760 · 4 B = 13.2399 MB,
            # rounds to 13.24. Checked below against the exact value, not against 13.23.
            "weight32": 13.24,
            "weight4": 1.65,
            "act_max4": 0.57,
            "act_max32": 4.59,
        },
        paths=frozenset(
            {"stem", "stem_act", "blocks.0.depthwise", "blocks.0.out_act", "blocks.1.expand"}
            | {"blocks.16.project", "blocks.16.out_act", "final_conv", "final_act", "head"}
        ),
        absent=frozenset({"blocks.0.expand", "blocks.0.expand_act"}),  # t = 1: no expansion
    ),
}


def test_independent_counts_match_published_numbers():
    """The counts in this file are right: they reproduce torchvision's published totals
    (conv/linear weights + BN weight and bias) and SPEC's ResNet-18 weight count."""
    for case in CASES.values():
        assert case.arch.weights + 2 * case.arch.bn_channels == case.torchvision_params
    assert CASES["resnet18"].arch.weights == 11_679_912
    assert CASES["mobilenet_v2"].arch.weights == 3_470_760
    assert CASES["resnet18"].act_sites == 17 and len(CASES["resnet18"].arch.acts) == 17
    assert CASES["mobilenet_v2"].act_sites == 35 and CASES["mobilenet_v2"].signed_sites == 17
    assert len(CASES["mobilenet_v2"].arch.acts) == 35 + 17
    assert CASES["resnet18"].arch.identity_shortcuts == 5  # 8 blocks, 3 downsample
    assert CASES["mobilenet_v2"].arch.identity_shortcuts == 10


# --------------------------------------------------------------------------------------------
# Fixtures: one 224×224 build per model; its 4-bit twin shares the float weights.


@pytest.fixture(scope="module", params=list(CASES))
def case(request) -> Case:
    return CASES[request.param]


@pytest.fixture(scope="module")
def models(case) -> tuple[nnx.Module, nnx.Module]:
    model = build(case.name, rngs=nnx.Rngs(0))
    quantized = nnx.clone(model)
    decided = quantize_model(quantized, RULES_4BIT)
    assert all(config is not None for config in decided.values())
    return model, quantized


def activation_sites(model: nnx.Module) -> list[ActQuant]:
    """Activation sites in forward order."""
    return [m for _, kind, m in quantizable_sites(model) if kind == "activation"]


# --------------------------------------------------------------------------------------------
# Registry and topology.


def test_registry():
    assert {"resnet20", "resnet18", "mobilenet_v2"} <= set(MODELS)
    for name in ("resnet18", "mobilenet_v2"):
        # Abstract build (no weights drawn): constructor signature, num_classes, input_shape.
        model = nnx.eval_shape(
            lambda n=name: build(n, num_classes=10, input_shape=(32, 32, 3), rngs=nnx.Rngs(0))
        )
        assert model.head.kernel.get_value().shape[-1] == 10
        assert activation_sites(model)[0].shape == (16, 16, 64 if name == "resnet18" else 32)


def test_site_counts_and_shapes(case, models):
    model, _ = models
    sites = activation_sites(model)
    assert len(sites) == case.act_sites + case.signed_sites
    assert sum(s.signed for s in sites) == case.signed_sites
    # Forward order, as the table walk.
    assert [(s.shape, s.signed) for s in sites] == list(case.arch.acts)
    weight_layers = [m for _, m in nnx.iter_modules(model) if isinstance(m, QuantizedWeights)]
    assert len(weight_layers) == case.arch.weight_layers
    if case.name == "resnet18":
        identities = [block.downsample is None for stage in model.stages for block in stage]
    else:
        identities = [block.residual for block in model.blocks]
    assert sum(identities) == case.arch.identity_shortcuts


def test_paths(case, models):
    paths = {path for path, _, _ in quantizable_sites(models[0])}
    assert case.paths <= paths
    assert not case.absent & paths
    downsample = {path for path in paths if "downsample" in path}
    assert downsample == {path for path in case.paths if "downsample" in path}


def output_shape(model: nnx.Module, input_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of ``model``'s output, traced abstractly (no FLOPs, no BN update kept)."""
    graphdef, state = nnx.split(model)
    x = jax.ShapeDtypeStruct(input_shape, jnp.float32)
    return jax.eval_shape(lambda state, x: nnx.merge(graphdef, state)(x), state, x).shape


def test_output_shape_224(case, models):
    assert output_shape(models[0], (1, 224, 224, 3)) == (1, 1000)


# --------------------------------------------------------------------------------------------
# Memory (docs/method.md §5 units: 1 MB = 2**20 bytes; memory() reports KB = 1024 bytes).


def check_mb(measured_kb: jax.Array, exact_mb: float, rounded_mb: float) -> None:
    measured = float(measured_kb) / 1024.0
    assert measured == pytest.approx(exact_mb, rel=1e-6)
    assert round(measured, 2) == rounded_mb


def test_float_memory(case, models):
    model, _ = models
    report = memory(model)
    assert report.num_weights == case.arch.weights
    assert report.num_activations == sum(math.prod(shape) for shape, _ in case.arch.acts)
    assert all(float(r.bits) == 32.0 for r in report.rows)
    largest = max(math.prod(shape) for shape, _ in case.arch.acts)
    check_mb(report.weight_kb, case.arch.weights * 4 / MB, case.mb["weight32"])
    check_mb(report.act_max_kb, largest * 4 / MB, case.mb["act_max32"])


def test_quantized_memory_4bit(case, models):
    _, quantized = models
    report = memory(quantized)
    bits = np.array([float(r.bits) for r in report.rows])
    np.testing.assert_array_equal(bits, 4.0)  # every weight, bias and activation tensor
    assert sum(r.kind == "activation" for r in report.rows) == len(case.arch.acts)
    assert all(r.quantizer == "uniform d_qmax" for r in report.rows)
    for site in activation_sites(quantized):
        assert site.quant.spec.signed == site.signed
    largest = max(math.prod(shape) for shape, _ in case.arch.acts)
    check_mb(report.weight_kb, case.arch.weights * 0.5 / MB, case.mb["weight4"])
    check_mb(report.act_max_kb, largest * 0.5 / MB, case.mb["act_max4"])
    total_acts = sum(math.prod(shape) for shape, _ in case.arch.acts)
    assert float(report.act_sum_kb) == pytest.approx(total_acts * 0.5 / 1024, rel=1e-6)


# --------------------------------------------------------------------------------------------
# Forward and gradient at 64×64.


def test_float_forward_shape_small(case, models):
    assert output_shape(models[0], (2, *SMALL)) == (2, 1000)


# XLA's CPU backend optimizations dominate the compile time of these graphs and buy nothing
# for a single step: the gradient is the same program, compiled with less effort.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def test_quantized_forward_and_gradient(case, models):
    """One jitted value-and-grad (train-mode BN) w.r.t. every nnx.Param: weights, BN scales
    and, as :class:`QuantParam`, every quantizer θ. All finite; every kernel and every θ
    but the zero bias's gets a gradient, so every site is in the graph."""
    _, quantized = models
    graphdef, state = nnx.split(quantized)
    x = jax.random.normal(jax.random.key(0), (2, *SMALL), jnp.float32)
    labels = jnp.array([3, 7])

    def loss(model):
        logits = model(x)
        log_p = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(log_p, labels[:, None], axis=1)), logits

    def value_and_grad(state):
        return nnx.value_and_grad(loss, has_aux=True)(nnx.merge(graphdef, state))

    step = jax.jit(value_and_grad).lower(state).compile(FAST_COMPILE)
    (value, logits), grads = step(state)
    assert logits.shape == (2, 1000)
    assert np.isfinite(float(value)) and bool(jnp.all(jnp.isfinite(logits)))
    theta, weights = nnx.state(quantized, QuantParam, nnx.Param)
    theta_grads, weight_grads = nnx.split_state(grads, QuantParam, nnx.Param)
    theta_leaves, weight_leaves = jax.tree.leaves(theta_grads), jax.tree.leaves(weight_grads)
    assert len(theta_leaves) == len(jax.tree.leaves(theta))
    assert len(weight_leaves) == len(jax.tree.leaves(weights))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in theta_leaves + weight_leaves)
    # U3: d and qmax per weight tensor (every kernel + the head's bias) and per activation site.
    assert len(theta_leaves) == 2 * (case.arch.weight_layers + 1 + len(case.arch.acts))
    for path, g in nnx.to_flat_state(theta_grads):
        # The head's bias starts at 0 and Q(0) = 0 for every θ: its quantizer alone is idle.
        idle = path[:2] == ("head", "bias_quant")
        assert bool(jnp.any(g[...] != 0)) != idle, path
    kernels = [g for g in weight_leaves if g.ndim >= 2]
    assert len(kernels) == case.arch.weight_layers
    assert all(bool(jnp.any(g != 0)) for g in kernels)
