"""mpdnn.export: bit-packed round trips, payload size = accounting, the integer reference.

Expected sizes come from docs/method.md §5's counts and from the training run's own summary and
report, expected values from :func:`mpdnn.quantizers.quantize` (the network's quantizer),
expected codes from the file format's definition recomputed here; never from the exporter.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import warnings
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mpdnn.quantizers as mq
from mpdnn import export as ex
from mpdnn import optim
from mpdnn.data import find_cifar10_archive, load_dataset, normalize
from mpdnn.export import codec, mpq, reference
from mpdnn.models import build
from mpdnn.nn import LogitScale, QuantConfig, Rule, quantize_model

NUM_WEIGHTS_RESNET20 = 268346  # docs/method.md §5
FIRST_CONV_TERMS = 3 * 3 * 3  # 3×3 kernel over RGB


def quantized_values(w, theta, spec):
    return np.asarray(mq.quantize(jnp.asarray(w, jnp.float32), theta, spec))


def round_trip(tmp_path, tensors):
    path = tmp_path / "t.mpq"
    sizes = ex.write(path, tensors)
    return sizes, ex.load(path)


# ---------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("parametrization", ["d_qmax", "b_qmax", "b_d"])
@pytest.mark.parametrize("bits", range(2, 9))
def test_uniform_round_trip_every_bitwidth(tmp_path, bits, parametrization):
    rng = np.random.default_rng(bits)
    step = 2.0 ** -int(rng.integers(2, 6))
    levels = 2 ** (bits - 1) - 1
    theta = {
        "d_qmax": {"d": step, "qmax": step * levels},
        "b_qmax": {"b": bits, "qmax": step * levels},
        "b_d": {"b": bits, "d": step},
    }[parametrization]
    spec = mq.weight_spec("uniform", parametrization)
    assert float(mq.bitwidth(theta, spec)) == bits  # docs/method.md §3: ceil(log2(levels + 1)) + 1
    w = rng.normal(0.0, step * levels * 0.7, (3, 3, 5, 7)).astype(np.float32)
    w.flat[:4] = [10.0, -10.0, 0.5 * step, -2.5 * step]  # both clips, two ties
    tensor = ex.encode_weight("w", w, theta, spec)
    sizes, loaded = round_trip(tmp_path, [tensor])
    got = loaded.weights["w"]
    expected = quantized_values(w, theta, spec)
    np.testing.assert_array_equal(got.values, expected)
    np.testing.assert_array_equal(got.integers * got.step, expected)
    assert got.bits == bits and got.step == step and got.encoding == "uniform"
    assert got.integers.min() == -levels and got.integers.max() == levels
    assert sizes["payload_bytes"] == math.ceil(w.size * bits / 8) == loaded.payload_bytes
    # Two's complement in `bits` bits, as the format says.
    np.testing.assert_array_equal(got.codes, np.mod(got.integers.ravel(), 2**bits))


@pytest.mark.parametrize("parametrization", ["qmin_qmax", "b_qmax", "b_qmin"])
@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_pow2_round_trip(tmp_path, bits, parametrization):
    rng = np.random.default_rng(10 + bits)
    magnitudes = 2 ** (bits - 1)  # sign bit + exponent index (docs/method.md §3: ceil(log2 M) + 1)
    emax = int(rng.integers(-3, 2))
    emin = emax - magnitudes + 1
    qmin, qmax = 2.0**emin, 2.0**emax
    theta = {
        "qmin_qmax": {"qmin": qmin, "qmax": qmax},
        "b_qmax": {"b": bits, "qmax": qmax},
        "b_qmin": {"b": bits, "qmin": qmin},
    }[parametrization]
    spec = mq.weight_spec("pow2", parametrization)
    assert float(mq.bitwidth(theta, spec)) == bits
    w = (rng.choice([-1, 1], 200) * 2.0 ** rng.uniform(emin - 2, emax + 1, 200)).astype(np.float32)
    w[:3] = [0.0, qmin / math.sqrt(2), -(2.0 ** (emin + 0.5))]  # zero -> +qmin; midpoints
    tensor = ex.encode_weight("w", w, theta, spec)
    sizes, loaded = round_trip(tmp_path, [tensor])
    got = loaded.weights["w"]
    expected = quantized_values(w, theta, spec)
    np.testing.assert_array_equal(got.values, expected)
    np.testing.assert_array_equal(got.integers * got.step, expected)
    assert got.bits == bits and got.encoding == "pow2" and got.step == qmin
    # The code, recomputed from the values: sign bit on top, then log2|v| - log2 qmin.
    code = (expected < 0).astype(np.uint64) << np.uint64(bits - 1)
    code |= (np.log2(np.abs(expected)) - emin).astype(np.uint64)
    np.testing.assert_array_equal(got.codes, code)
    assert sizes["payload_bytes"] == math.ceil(w.size * bits / 8)


@pytest.mark.parametrize("chunk", [None, 5])
def test_one_bitstream_for_mixed_tensors(tmp_path, monkeypatch, chunk):
    """Tensors of 2..8 bits, pow2 and float32 share one stream: no per-tensor padding (and
    the packer's chunking, forced small here, changes nothing)."""
    if chunk:
        monkeypatch.setattr(codec, "_CHUNK", chunk)
    rng = np.random.default_rng(0)
    tensors, expected, total_bits = [], {}, 0
    d, spec = 0.25, mq.weight_spec("uniform")
    first = ex.encode_weight("first", np.float32([1, -1, 3]) * d, {"d": d, "qmax": 3 * d}, spec)
    tensors.append(first)
    expected["first"] = np.float32([1, -1, 3]) * d
    total_bits += 3 * 3
    for bits in range(2, 9):
        theta = {"d": d, "qmax": d * (2 ** (bits - 1) - 1)}
        w = rng.normal(0, 2, 11 + bits).astype(np.float32)  # odd sizes: unaligned offsets
        tensors.append(ex.encode_weight(f"u{bits}", w, theta, spec))
        expected[f"u{bits}"] = quantized_values(w, theta, spec)
        total_bits += w.size * bits
    p2 = mq.weight_spec("pow2")
    w = rng.normal(0, 1, 13).astype(np.float32)
    tensors.append(ex.encode_weight("p3", w, {"qmin": 2.0**-3, "qmax": 1.0}, p2))
    expected["p3"] = quantized_values(w, {"qmin": 2.0**-3, "qmax": 1.0}, p2)
    total_bits += 13 * 3
    w = rng.normal(0, 1, 5).astype(np.float32)
    tensors.append(ex.encode_weight("float", w, None, None))
    expected["float"] = w
    total_bits += 5 * 32
    sizes, loaded = round_trip(tmp_path, tensors)
    assert loaded.payload_bits == sizes["payload_bits"] == total_bits
    assert sizes["payload_bytes"] == math.ceil(total_bits / 8)
    for name, values in expected.items():
        np.testing.assert_array_equal(loaded.weights[name].values, values, err_msg=name)
    # [1, -1, 3] at 3 bits: codes 001, 111, 011, least significant bit first.
    data = (tmp_path / "t.mpq").read_bytes()
    assert data[loaded.header_bytes : loaded.header_bytes + 1] == bytes([0b11111001])
    assert len(data) == loaded.file_bytes == sizes["file_bytes"]
    assert data[:8] == b"MPDNNMPQ" and sizes["fixed_header_bytes"] == 32


@pytest.mark.parametrize("family", ["uniform", "pow2"])
def test_activation_quantizer_matches_quantize(family):
    spec = mq.activation_spec(family)
    theta = {"d": 0.13, "qmax": 1.9} if family == "uniform" else {"qmin": 0.03, "qmax": 1.7}
    params = mq.canonical(theta, spec)
    step = float(params.d if family == "uniform" else params.qmin)
    rng = np.random.default_rng(1)
    ties = np.arange(-2, 20) * step + 0.5 * step  # uniform rounding ties
    edges = 2.0 ** (np.arange(-8, 2) + 0.5)  # pow2 geometric midpoints
    near = np.concatenate([ties, edges, [step / math.sqrt(2), float(params.qmax), 0.0]])
    x = np.concatenate(
        [rng.normal(0.5, 1, 500), near, np.nextafter(near, 0), np.nextafter(near, 9)]
    )
    x = x.astype(np.float32)
    q = ex.ActivationQuantizer.from_entry(ex.encode_activation("a", x.shape, theta, spec))
    expected = np.asarray(mq.quantize(jnp.asarray(x), theta, spec))
    np.testing.assert_array_equal(q.values(x), expected)
    np.testing.assert_array_equal(q.integers(x) * q.step, expected)
    assert q.bits == int(mq.bitwidth(theta, spec))


def _round_to_f32(exact: Fraction) -> np.float32:
    """Correctly rounded float32 of a rational (nearest, ties to even), independently."""
    guess = np.float32(float(exact))
    cands = [
        np.nextafter(guess, np.float32(-np.inf)),
        guess,
        np.nextafter(guess, np.float32(np.inf)),
    ]
    dist = [abs(Fraction(float(c)) - exact) for c in cands]
    best = min(dist)
    ties = [c for c, dd in zip(cands, dist, strict=True) if dd == best]
    return min(ties, key=lambda c: int(np.float32(c).view(np.int32)) & 1)


def test_fused_multiply_add_rounds_once():
    # Constructed so that a*b + c in float64 lands exactly halfway between two float32
    # (with the error below float64's resolution): rounding twice goes the wrong way.
    a = np.float32(2.0**-24 * (1 + 2.0**-23))
    b = np.float32(1 - 2.0**-23)
    c = np.float32(1 + 2.0**-23)
    assert np.float32(np.float64(a) * np.float64(b) + np.float64(c)) != c  # twice: wrong
    assert reference._fma32(np.array([a, -a]), np.array([b, b]), np.array([c, -c])).tolist() == [
        c,
        -c,
    ]
    rng = np.random.default_rng(0)
    a, b, c = (
        (rng.normal(0, 1, 3000) * 2.0 ** rng.integers(-30, 30, 3000)).astype(np.float32)
        for _ in range(3)
    )
    got = reference._fma32(a, b, c)
    want = [
        _round_to_f32(Fraction(float(x)) * Fraction(float(y)) + Fraction(float(z)))
        for x, y, z in zip(a, b, c, strict=True)
    ]
    np.testing.assert_array_equal(got, np.float32(want))


# ------------------------------------------------------------------------ models in memory


def resnet20(rules, *, logit_scale=False, seed=0):
    """A quantized ResNet-20 with non-trivial BatchNorm statistics (eval mode)."""
    model = build("resnet20", rngs=nnx.Rngs(seed))
    quantize_model(model, rules)
    rng = np.random.default_rng(seed)
    for _, m in nnx.iter_modules(model):
        if isinstance(m, nnx.BatchNorm):
            n = m.mean[...].shape[0]
            m.mean[...] = rng.normal(0, 0.3, n).astype(np.float32)
            m.var[...] = rng.uniform(0.2, 2, n).astype(np.float32)
            m.scale[...] = rng.uniform(0.5, 1.5, n).astype(np.float32)
            m.bias[...] = rng.normal(0.3, 0.3, n).astype(np.float32)
    if logit_scale:
        model = LogitScale(model)
        model.scale[...] = 1.7
    model.eval()
    return model


def test_float_and_fixed_2bit_resnet20_payloads_are_spec_sizes(tmp_path):
    # docs/method.md §5: 268,346 weights -> 1048.2 KB at 32 bits, 65.5 KB at 2 bits.
    model = resnet20([])
    result = ex.export_model(model, tmp_path / "float.mpq")
    assert result["payload_bytes"] == NUM_WEIGHTS_RESNET20 * 4
    fixed = QuantConfig(mode="fixed", bits=2)
    model = resnet20([Rule(".*", fixed, kind="weight")])
    result = ex.export_model(model, tmp_path / "w2.mpq")
    assert result["payload_bytes"] == math.ceil(NUM_WEIGHTS_RESNET20 * 2 / 8)
    assert result["payload_bytes"] == math.ceil(float(optim.memory(model).weight_kb) * 1024)
    with pytest.raises(ex.ExportError, match="every activation quantized: stem_act is float"):
        ex.reference_forward(ex.load(tmp_path / "w2.mpq"), np.zeros((1, 32, 32, 3), np.float32))


def test_reference_refuses_other_models(tmp_path):
    model = build("small_cnn", rngs=nnx.Rngs(0))
    quantize_model(model, [Rule(".*", QuantConfig(), kind=None)])
    result = ex.export_model(model, tmp_path / "cnn.mpq")
    assert result["payload_bytes"] == math.ceil(float(optim.memory(model).weight_kb) * 1024)
    with pytest.raises(ex.ExportError, match="supports ResNetCifar .* not 'SmallCNN'"):
        ex.reference_forward(ex.load(tmp_path / "cnn.mpq"), np.zeros((1, 8, 8, 1), np.float32))


@pytest.fixture(scope="module")
def images():
    """Real CIFAR-10 test images when the shared archive is here, else synthetic ones."""
    if find_cifar10_archive() is not None:
        ds = load_dataset("cifar10", max_per_class=3)
    else:
        message = "CIFAR-10 archive not found: reference forward checked on synthetic images"
        warnings.warn(message, stacklevel=2)
        ds = load_dataset("synthetic", num_test=30)
    print(f"reference forward images: {ds.description}")
    x = np.asarray(normalize(ds.test_images, ds.pixel_scale, ds.pixel_offset), np.float32)
    return x, ds.name


def check_reference(model, path, x):
    """The reference forward against the jitted Flax model (see mpdnn.export's docstring)."""
    exported = ex.load(path)
    prefix = exported.table["architecture"]["prefix"]
    for name, w in exported.weights.items():  # the Flax model's own quantized weights
        module = model
        for part in name.removesuffix(".kernel").removesuffix(".bias").split("."):
            module = getattr(module, part) if not part.isdigit() else module[int(part)]
        flax_w = module.quantized_kernel() if name.endswith("kernel") else module.quantized_bias()
        np.testing.assert_array_equal(w.values, np.asarray(flax_w), err_msg=name)
    assert prefix == ("model." if isinstance(model, LogitScale) else "")
    result = ex.compare(model, exported, x)
    print(f"reference vs Flax: {result}")
    n = len(x)
    assert result["exact_sums"]  # so XLA's float32 convs are exact: equality must hold
    assert result["logits_equal_given_stem"] == n
    assert result["unexplained_differences"] == 0  # equal wherever the first codes agree
    assert result["logits_equal"] >= n // 2
    # Any float32 summation of n terms errs by at most n units of 2**-24 Σ|terms|.
    assert result["stem_conv_error_in_u"] <= FIRST_CONV_TERMS
    return result


def test_pow2_resnet20_reference_forward(tmp_path, images):
    p3 = QuantConfig(family="pow2")
    rules = [Rule(".*", p3, kind="weight"), Rule(".*", p3, kind="activation")]
    model = resnet20(rules, logit_scale=True)
    result = ex.export_model(model, tmp_path / "p3.mpq")
    assert result["payload_bytes"] == math.ceil(float(optim.memory(model).weight_kb) * 1024)
    check_reference(model, tmp_path / "p3.mpq", images[0][:16])


# ------------------------------------------------------------------------ a finished run


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


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from mpdnn.training.trainer import train_and_evaluate

    workdir = tmp_path_factory.mktemp("run")
    result = train_and_evaluate(run_config(), workdir)
    assert result.delivered == "best_feasible"
    return workdir


@pytest.fixture(scope="module")
def delivered(run):
    """The run's delivered model, rebuilt from config.json and restored from best/."""
    model, info = ex.load_run(run)
    assert info["checkpoint"] == "best"
    return model


def test_export_of_a_run_equals_its_accounting(run, delivered, tmp_path, capsys):
    out = tmp_path / "model.mpq"
    assert ex.main(["--workdir", str(run), "--out", str(out), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    summary = json.loads((run / "summary.json").read_text())
    report = json.loads((run / "report.json").read_text())
    weights = [r for r in report["layers"] if r["kind"] == "weight"]
    bits = sum(r["numel"] * int(r["bits"]) for r in weights)
    assert record["run"]["checkpoint"] == "best" and record["run"]["delivered"] == "best_feasible"
    assert record["payload_bits"] == bits == summary["delivered_sizes"]["weight_kb"] * 8192
    assert record["payload_bytes"] == math.ceil(summary["delivered_sizes"]["weight_kb"] * 1024)
    assert record["num_weights"] == NUM_WEIGHTS_RESNET20
    loaded = ex.load(out)
    assert out.stat().st_size == loaded.file_bytes == record["file_bytes"]
    assert (
        record["header_bytes"] + record["payload_bytes"] + record["float_bytes"]
        == loaded.file_bytes
    )
    assert [w.bits for w in loaded.weights.values()] == [int(r["bits"]) for r in weights]
    assert [a.bits for a in loaded.activations.values()] == [
        int(r["bits"]) for r in report["layers"] if r["kind"] == "activation"
    ]
    memory = optim.memory(delivered)
    assert record["payload_bytes"] == math.ceil(float(memory.weight_kb) * 1024)
    # Without a budget the final model is delivered: final/ is restored.
    final = tmp_path / "final_run"
    shutil.copytree(run, final)
    (final / "summary.json").write_text(json.dumps({**summary, "delivered": "final"}))
    assert ex.load_run(final)[1]["checkpoint"] == "final"


def test_reference_forward_reproduces_the_trained_resnet20(delivered, tmp_path, images):
    model = delivered
    ex.export_model(model, tmp_path / "m.mpq")
    x, name = images
    result = check_reference(model, tmp_path / "m.mpq", x)
    assert result["images"] == len(x) and name in ("cifar10", "synthetic")


# ------------------------------------------------------------------------ command line


def fake_small_cnn_run(workdir):
    """A 'finished' small_cnn run (no training: the model's initial state as final/)."""
    from mpdnn.training.checkpoint import Checkpointer
    from mpdnn.training.trainer import build_model, load_data
    from tests.training.test_trainer import tiny_config

    config = tiny_config()
    config.budget.weight_kb = None
    workdir.mkdir()
    (workdir / "config.json").write_text(config.to_json())
    model = build_model(config, load_data(config), workdir)
    _, params, rest = nnx.split(model, nnx.Param, ...)
    with Checkpointer(workdir / "final", max_to_keep=1, async_save=False) as ckpt:
        ckpt.save(0, {"params": params, "rest": rest}, force=True)
    (workdir / "summary.json").write_text(json.dumps({"delivered": "final", "budgets": {}}))
    return workdir


def expect_usage_error(capsys, argv, words):
    with pytest.raises(SystemExit) as exit_info:
        ex.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error" in err[0], err
    for word in words:
        assert word in err[0]


def test_bad_input_is_one_line_with_status_2(run, tmp_path, capsys):
    expect_usage_error(capsys, ["--workdir", str(tmp_path / "nope")], ["no run directory"])
    (tmp_path / "empty").mkdir()
    expect_usage_error(capsys, ["--workdir", str(tmp_path / "empty")], ["no config.json"])
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(run / "config.json", unfinished)
    expect_usage_error(capsys, ["--workdir", str(unfinished)], ["not a finished run"])
    summary = json.loads((run / "summary.json").read_text())
    (unfinished / "summary.json").write_text(json.dumps({**summary, "delivered": None}))
    expect_usage_error(capsys, ["--workdir", str(unfinished)], ["delivered no model", "budget"])
    cnn = fake_small_cnn_run(tmp_path / "cnn")
    expect_usage_error(
        capsys, ["--workdir", str(cnn), "--verify", "4"], ["supports ResNetCifar", "SmallCNN"]
    )
    assert (cnn / "model.mpq").is_file()  # exporting it works; only the reference refuses


def test_module_entry_point_exit_status(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mpdnn.export", "--workdir", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no run directory" in lines[0] and "Traceback" not in proc.stderr


def test_batch_norm_matches_the_jitted_flax_batch_norm_bitwise():
    """XLA:CPU fuses BatchNorm's multiply-add into one FMA; the reference rounds likewise."""
    rng = np.random.default_rng(3)
    bn = nnx.BatchNorm(64, momentum=0.9, epsilon=1e-5, rngs=nnx.Rngs(0))
    bn.mean[...] = rng.normal(0, 1, 64).astype(np.float32)
    bn.var[...] = rng.uniform(0.01, 4, 64).astype(np.float32)
    bn.scale[...] = rng.normal(1, 0.5, 64).astype(np.float32)
    bn.bias[...] = rng.normal(0, 1, 64).astype(np.float32)
    bn.eval()
    graphdef, state = nnx.split(bn)
    x = rng.normal(0, 3, (8, 8, 8, 64)).astype(np.float32)
    flax_y = np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x))
    mul = np.asarray(mpq._batch_norm_multiplier(bn))
    centred = x - np.asarray(bn.mean[...])
    bias = np.asarray(bn.bias[...])
    np.testing.assert_array_equal(reference._fma32(centred, mul, bias), flax_y)
    assert np.any(centred * mul + bias != flax_y)  # two roundings would not reproduce it
