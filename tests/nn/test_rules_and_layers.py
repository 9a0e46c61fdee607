"""Quantizer modules, layers and rule matching on a tiny model (fast)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mpdnn.quantizers as mq
from mpdnn import nn
from mpdnn.optim import KB, memory


class Tiny(nnx.Module):
    """stem conv → act → (block: conv → signed act) → head; 8×8×3 inputs."""

    def __init__(self, rngs: nnx.Rngs):
        self.stem = nn.QConv(3, 4, 3, rngs=rngs)
        self.stem_act = nn.ActQuant()
        self.blocks = nnx.List([nnx.Dict(conv=nn.QConv(4, 4, 3, groups=2, rngs=rngs))])
        self.block_act = nn.ActQuant(signed=True, float_fn=nn.identity)
        self.head = nn.QLinear(4, 5, rngs=rngs)
        nn.record_activation_shapes(self, (8, 8, 3))

    def __call__(self, x):
        x = self.stem_act(self.stem(x))
        x = self.block_act(self.blocks[0]["conv"](x))
        return self.head(jnp.mean(x, axis=(1, 2)))


@pytest.fixture
def tiny():
    return Tiny(nnx.Rngs(0))


def test_sites_are_listed_in_forward_order_with_their_paths(tiny):
    sites = [(p, k) for p, k, _ in nn.quantizable_sites(tiny)]
    assert sites == [
        ("stem", "weight"),
        ("stem_act", "activation"),
        ("blocks.0.conv", "weight"),
        ("block_act", "activation"),
        ("head", "weight"),
    ]
    assert tiny.stem_act.shape == (8, 8, 4) and tiny.block_act.shape == (8, 8, 4)


def test_rule_for_one_path_changes_that_layer_only(tiny):
    decided = nn.quantize_model(
        tiny, [nn.Rule(r"blocks\.0\.conv", nn.QuantConfig(bits=3), kind="weight")]
    )
    assert decided["blocks.0.conv"] == nn.QuantConfig(bits=3)
    assert all(v is None for k, v in decided.items() if k != "blocks.0.conv")
    assert tiny.blocks[0]["conv"].kernel_quant.config.quantized
    assert not tiny.stem.kernel_quant.config.quantized
    assert not tiny.head.kernel_quant.config.quantized
    assert float(tiny.blocks[0]["conv"].kernel_quant.bits()) == 3.0


def test_first_matching_rule_wins_and_kind_filters(tiny):
    rules = [
        nn.Rule("stem", nn.QuantConfig(mode="fixed", bits=8), kind="weight"),
        nn.Rule(".*", nn.QuantConfig(bits=2), kind="weight"),
        nn.Rule(".*", nn.QuantConfig(family="pow2", bits=4), kind="activation"),
    ]
    decided = nn.quantize_model(tiny, rules)
    assert decided["stem"].mode == "fixed" and decided["head"].bits == 2
    assert decided["stem_act"].family == "pow2"
    # the fixed stem has no trainable θ; the others do
    assert len(jax.tree.leaves(nnx.state(tiny.stem, nn.QuantParam))) == 0
    assert len(jax.tree.leaves(nnx.state(tiny.stem, nn.QuantState))) == 2
    assert len(jax.tree.leaves(nnx.state(tiny.head, nn.QuantParam))) == 4  # kernel + bias
    # the signed activation site got a signed pow2 spec with a zero code
    spec = tiny.block_act.quant.spec
    assert spec.signed and spec.with_zero and spec.family == "pow2"


def test_tqt_learns_the_range_but_not_the_bits(tiny):
    nn.quantize_model(tiny, [nn.Rule(".*", nn.QuantConfig(mode="tqt", bits=2), kind="weight")])
    q = tiny.head.kernel_quant
    assert isinstance(q.b, nn.QuantState) and isinstance(q.qmax, nn.QuantParam)
    w = tiny.head.kernel[...]
    g = jax.grad(lambda t: jnp.sum(mq.quantize(w * 10, t, q.spec)))(q.theta())
    assert float(g["qmax"]) != 0.0
    assert float(q.bits()) == 2.0


def test_quant_params_are_params_but_selectable_apart(tiny):
    nn.quantize_model(tiny, [nn.Rule(".*", nn.QuantConfig(bits=4))])
    all_params = jax.tree.leaves(nnx.state(tiny, nnx.Param))
    quant = jax.tree.leaves(nnx.state(tiny, nn.QuantParam))
    weights = jax.tree.leaves(nnx.state(tiny, nnx.All(nnx.Param, nnx.Not(nn.QuantParam))))
    # θ: (d, qmax) for stem, block conv, head kernel + head bias, 2 activation sites
    assert len(quant) == 2 * 6
    assert len(all_params) == len(quant) + 4  # stem, block kernels; head kernel and bias
    assert len(weights) == 4


def test_bias_quantizer_is_initialised_like_its_layers_kernel(tiny):
    nn.quantize_model(tiny, [nn.Rule("head", nn.QuantConfig(bits=4), kind="weight")])
    assert tiny.head.bias_quant.theta() == tiny.head.kernel_quant.theta()


def test_memory_gradient_matches_the_closed_form(tiny):
    nn.quantize_model(tiny, [nn.Rule(".*", nn.QuantConfig(bits=4))])
    graphdef, state = nnx.split(tiny)

    def weight_kb(state):
        return memory(nnx.merge(graphdef, state, copy=True)).weight_kb

    grads = nnx.merge(graphdef, jax.grad(weight_kb)(state), copy=True)
    q = tiny.blocks[0]["conv"].kernel_quant
    d = float(mq.canonical(q.theta(), q.spec).d)
    n = round(float(q.qmax[...]) / d)
    numel = 3 * 3 * 2 * 4  # 3×3 kernel, 4 in / 2 groups, 4 out
    # b = ceil(log2(round(qmax/d) + 1)) + 1 with STE: db/dqmax = 1 / ((n + 1) ln 2 d)
    expected = numel / KB / ((n + 1) * np.log(2) * d)
    np.testing.assert_allclose(grads.blocks[0]["conv"].kernel_quant.qmax[...], expected, rtol=1e-5)


def test_grouped_conv_and_linear_match_plain_jax(tiny):
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    conv = tiny.blocks[0]["conv"]
    k = conv.kernel[...]
    expected = jnp.concatenate(
        [
            jax.lax.conv_general_dilated(
                x[..., 2 * g : 2 * g + 2],
                k[..., 2 * g : 2 * g + 2],
                (1, 1),
                "SAME",
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            )
            for g in range(2)
        ],
        axis=-1,
    )
    np.testing.assert_allclose(conv(x), expected, rtol=1e-5, atol=1e-5)


def test_bad_rules_and_configs_are_clear_errors():
    with pytest.raises(ValueError, match="not a regex"):
        nn.Rule("(", nn.QuantConfig())
    with pytest.raises(ValueError, match="unknown quantizer mode"):
        nn.QuantConfig(mode="int8")
    with pytest.raises(ValueError, match="unknown uniform parametrization"):
        nn.QuantConfig(parametrization="qmin_qmax")
    with pytest.raises(ValueError, match="rule kind"):
        nn.Rule(".*", nn.QuantConfig(), kind="bias")


def test_host_initializers_are_keyed_deterministic_and_scaled():
    from mpdnn.nn import initializers

    key = jax.random.key(3)
    shape = (3, 3, 64, 128)
    a = initializers.he_normal_fan_out(key, shape, jnp.float32)
    assert a.shape == shape and a.dtype == jnp.float32
    np.testing.assert_array_equal(a, initializers.he_normal_fan_out(key, shape, jnp.float32))
    assert not np.array_equal(a, initializers.he_normal_fan_out(jax.random.key(4), shape))
    # He-normal, fan_out = 3 * 3 * 128: std sqrt(2 / 1152) = 0.0417
    assert float(jnp.std(a)) == pytest.approx(np.sqrt(2 / 1152), rel=0.02)
    b = initializers.lecun_normal(key, (256, 10))  # fan_in 256: std 1/16
    assert float(jnp.std(b)) == pytest.approx(1 / 16, rel=0.1)


def test_a_model_can_still_be_built_under_a_trace():
    """Abstract (eval_shape) and jitted construction work: the initialiser falls back to
    jax.random when the key is a tracer."""
    from mpdnn.nn import initializers

    out = jax.eval_shape(
        lambda k: initializers.he_normal_fan_out(k, (3, 3, 4, 8)), jax.random.key(0)
    )
    assert out.shape == (3, 3, 4, 8)
    abstract = nnx.eval_shape(lambda: nn.QConv(4, 8, 3, rngs=nnx.Rngs(0)))
    assert abstract.kernel.shape == (3, 3, 4, 8)
