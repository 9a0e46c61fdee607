"""ResNet-20 (docs/method.md §7): counts and sizes of docs/method.md §5 from an independent count,
shapes, grads.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mpdnn import models, nn
from mpdnn.optim import memory


def independent_resnet20_counts():
    """Weights and activation tensors of ResNet-20 counted from its definition (docs/method.md
    §7).
    """
    convs = [3 * 3 * 3 * 16]  # stem
    acts = [(16, 32, 32)]  # stem act
    in_c = 16
    for width, size in ((16, 32), (32, 16), (64, 8)):
        for _ in range(3):
            convs += [3 * 3 * in_c * width, 3 * 3 * width * width]
            acts += [(width, size, size)] * 2
            in_c = width
    fc = 64 * 10 + 10
    return sum(convs), fc, acts


def uniform_rules(weight_bits=None, act_bits=None):
    rules = []
    if weight_bits:
        rules.append(nn.Rule(".*", nn.QuantConfig(bits=weight_bits), kind="weight"))
    if act_bits:
        rules.append(nn.Rule(".*", nn.QuantConfig(bits=act_bits), kind="activation"))
    return rules


@pytest.fixture(scope="module")
def float_model():
    return models.build("resnet20", rngs=nnx.Rngs(0))


def test_independent_count_is_spec_5():
    conv, fc, acts = independent_resnet20_counts()
    assert (conv, fc, conv + fc) == (267_696, 650, 268_346)
    assert len(acts) == 19 and sum(math.prod(a) for a in acts) == 188_416


@pytest.mark.parametrize(
    "weight_bits, act_bits, weight_kb, act_max_kb, act_sum_kb",
    [
        # docs/method.md §5: 1048.2 KB float, 65.5 KB at 2 bits; 64/736 KB float, 8/92 KB at 4 bits
        (None, None, 268_346 * 32 / 8 / 1024, 64.0, 736.0),
        (2, None, 268_346 * 2 / 8 / 1024, 64.0, 736.0),
        (2, 4, 268_346 * 2 / 8 / 1024, 8.0, 92.0),
        (None, 4, 268_346 * 32 / 8 / 1024, 8.0, 92.0),
    ],
)
def test_memory_matches_spec_5(
    float_model, weight_bits, act_bits, weight_kb, act_max_kb, act_sum_kb
):
    model = nnx.clone(float_model)
    nn.quantize_model(model, uniform_rules(weight_bits, act_bits))
    report = memory(model)
    conv, fc, acts = independent_resnet20_counts()
    assert report.num_weights == conv + fc
    assert report.num_activations == sum(math.prod(a) for a in acts)
    assert float(report.weight_kb) == pytest.approx(weight_kb, rel=1e-6)
    assert float(report.act_max_kb) == pytest.approx(act_max_kb, rel=1e-6)
    assert float(report.act_sum_kb) == pytest.approx(act_sum_kb, rel=1e-6)
    assert round(float(report.weight_kb), 1) == {None: 1048.2, 2: 65.5}[weight_bits]
    # the activation rows are the 19 tensors of docs/method.md §5, in forward order (channels last)
    shapes = [r.shape for r in report.rows if r.kind == "activation"]
    assert shapes == [(h, w, c) for c, h, w in acts]


def test_forward_shapes_and_jitted_gradients_reach_every_quantizer(float_model):
    model = nnx.clone(float_model)
    nn.quantize_model(model, uniform_rules(2, 4))
    x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
    labels = jnp.array([0, 1, 2, 3])
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def loss_and_grad(params, rest, x):
        def loss(params, rest):
            m = nnx.merge(graphdef, params, rest, copy=True)
            logits = m(x)
            ce = -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), labels])
            return ce + 0.1 * jnp.maximum(memory(m).weight_kb - 60.0, 0.0) ** 2

        return jax.value_and_grad(loss)(params, rest)

    value, grads = loss_and_grad(params, rest, x)
    assert np.isfinite(float(value))
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    quant_grads = jax.tree.leaves(nnx.state(nnx.merge(graphdef, grads, rest), nn.QuantParam))
    # 20 weight layers (stem, 18 block convs, head) + the head bias: (d, qmax) each; 19 acts
    assert len(quant_grads) == 2 * (20 + 1) + 2 * 19
    assert sum(bool(jnp.any(g != 0)) for g in quant_grads) > len(quant_grads) // 2
    assert nnx.merge(graphdef, params, rest)(x).shape == (4, 10)
    assert float_model(x).shape == (4, 10)


def test_quantized_twin_on_a_very_fine_grid_equals_the_float_model(float_model):
    """Same definition, same weights: a quantizer with a tiny step is the identity (within
    float32), and an unsigned activation quantizer with a huge range is a ReLU."""
    fine = nn.QuantConfig(bits=16, spec_overrides=(("d_range", (2.0**-24, 1.0)),))
    model = nnx.clone(float_model)
    nn.quantize_model(model, [nn.Rule(".*", fine)])
    for _, kind, site in nn.quantizable_sites(model):
        if kind == "activation":  # activations start at d = 2^-3; make the grid fine
            site.quant.d[...] = jnp.float32(2.0**-20)
            site.quant.qmax[...] = jnp.float32(1e4)
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    float_model.eval()
    model.eval()
    reference = np.asarray(float_model(x))
    # 16-bit weights (relative error ~2^-16 each) through 20 layers: logits agree to 1e-3
    # of their scale; the 2-bit twin below differs at the scale of the logits themselves.
    atol = 1e-3 * np.abs(reference).max()
    np.testing.assert_allclose(model(x), reference, rtol=1e-3, atol=atol)
    float_model.train()
    # ...and a coarse twin is not (the test can fail)
    coarse = nnx.clone(float_model)
    nn.quantize_model(coarse, uniform_rules(2, 2))
    coarse.eval()
    float_model.eval()
    assert not np.allclose(coarse(x), reference, rtol=1e-3, atol=atol)
    float_model.train()


def test_bad_depth_and_unknown_model_are_clear_errors():
    with pytest.raises(ValueError, match="6n \\+ 2"):
        models.ResNetCifar(21, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        models.build("vgg", rngs=nnx.Rngs(0))
