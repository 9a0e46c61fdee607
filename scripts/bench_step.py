"""Cost of one training step of the quantized ResNet-20 against the float one.

A step is forward + backward + SGD update (``optax.sgd(0.1, momentum=0.9)``) on one batch of
synthetic 32×32×3 data, BatchNorm in training mode (batch statistics, running averages
updated), jitted with the state donated:

* ``float``: the float ResNet-20, loss = cross-entropy;
* ``quantized``: every conv/linear weight and every activation site U3-quantized by rules
  (learned, init ``--weight_bits``/``--act_bits``, default 2/4), loss = cross-entropy
  + ``0.1·max(0, weight_kb − 70.1)² + 0.1·max(0, act_max_kb − 8.1)²`` from
  :func:`mpdnn.optim.memory` (docs/method.md §6's penalty, λ = 0.1, sizes in KB).

Each case is compiled and run twice first; then the timed steps of all cases are
interleaved (one step of each per round, so machine noise hits every case alike). Reported
per case: the median wall time, its ratio to float, the median of same-round ratios
("paired", robust to load that drifts during the run) and the median process CPU time
(all threads). The last line is ``ratio <r>``: quantized over float, medians of wall time.

``--jit both`` also times every case under ``nnx.jit`` + ``nnx.Optimizer`` beside the
default ``jax.jit`` of a pure function of the ``nnx.split`` state (the ratio uses the
faster of the two per case). ``--breakdown`` adds cases that locate the quantized step's
extra cost: quantized without the memory terms, weights only, activations only.

    python scripts/bench_step.py [--batch 128] [--steps 10] [--jit split|nnx|both]
        [--breakdown] [--json PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mpdnn.models import build
from mpdnn.nn import QuantConfig, Rule, quantize_model
from mpdnn.optim import memory
from mpdnn.provenance import provenance

LAMBDA = 0.1
WEIGHT_BUDGET_KB = 70.1
ACT_BUDGET_KB = 8.1


@dataclasses.dataclass(frozen=True)
class Case:
    """One model variant: which sites are quantized and whether the loss has memory terms."""

    name: str
    weights: bool
    activations: bool
    memory_loss: bool


FLOAT = Case("float", weights=False, activations=False, memory_loss=False)
QUANTIZED = Case("quantized", weights=True, activations=True, memory_loss=True)
BREAKDOWN = (
    Case("quantized, CE only", weights=True, activations=True, memory_loss=False),
    Case("weights only (+ weight term)", weights=True, activations=False, memory_loss=True),
    Case("activations only (+ act term)", weights=False, activations=True, memory_loss=True),
)


def make_model(case: Case, *, weight_bits: int, act_bits: int, seed: int) -> nnx.Module:
    model = build("resnet20", rngs=nnx.Rngs(seed))
    rules = []
    if case.weights:
        rules.append(Rule(".*", QuantConfig(bits=weight_bits), kind="weight"))
    if case.activations:
        rules.append(Rule(".*", QuantConfig(bits=act_bits), kind="activation"))
    quantize_model(model, rules)
    return model


def loss_fn(model: nnx.Module, x: jax.Array, labels: jax.Array, memory_loss: bool) -> jax.Array:
    """Cross-entropy, plus the docs/method.md §6 penalty on weight and max-activation memory."""
    logits = model(x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    if memory_loss:
        mem = memory(model)
        loss += LAMBDA * jnp.maximum(0.0, mem.weight_kb - WEIGHT_BUDGET_KB) ** 2
        loss += LAMBDA * jnp.maximum(0.0, mem.act_max_kb - ACT_BUDGET_KB) ** 2
    return loss


def split_step(model: nnx.Module, tx: optax.GradientTransformation, memory_loss: bool):
    """``jax.jit`` of a pure function of the ``nnx.split`` state (state and optimizer state
    donated); the model is merged inside and differentiated with ``nnx.value_and_grad``.

    Returns ``(step, carry)``; ``step(carry, x, labels) -> (carry, loss)``.
    """
    graphdef, state = nnx.split(model)

    @partial(jax.jit, donate_argnums=0)
    def step(carry, x, labels):
        state, opt_state = carry
        model = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(loss_fn)(model, x, labels, memory_loss)
        params = nnx.state(model, nnx.Param)
        updates, opt_state = tx.update(grads, opt_state, params)
        nnx.update(model, optax.apply_updates(params, updates))
        return (nnx.state(model), opt_state), loss

    return step, (state, tx.init(nnx.state(model, nnx.Param)))


def nnx_step(model: nnx.Module, tx: optax.GradientTransformation, memory_loss: bool):
    """``nnx.jit`` over the model and an ``nnx.Optimizer`` (updated in place, donated)."""
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @partial(nnx.jit, donate_argnums=(0, 1))
    def train_step(model, optimizer, x, labels):
        loss, grads = nnx.value_and_grad(loss_fn)(model, x, labels, memory_loss)
        optimizer.update(model, grads)
        return loss

    def step(carry, x, labels):
        return carry, train_step(*carry, x, labels)

    return step, (model, optimizer)


STEPS: dict[str, Callable] = {"split": split_step, "nnx": nnx_step}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per case")
    parser.add_argument("--weight_bits", type=int, default=2)
    parser.add_argument("--act_bits", type=int, default=4)
    parser.add_argument("--jit", choices=("split", "nnx", "both"), default="split")
    parser.add_argument("--breakdown", action="store_true", help="also time the breakdown")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write a json record here")
    args = parser.parse_args(argv)
    start = time.perf_counter()

    key_x, key_y = jax.random.split(jax.random.key(args.seed))
    x = jax.random.normal(key_x, (args.batch, 32, 32, 3), jnp.float32)
    labels = jax.random.randint(key_y, (args.batch,), 0, 10)
    tx = optax.sgd(0.1, momentum=0.9)
    cases = (FLOAT, QUANTIZED, *(BREAKDOWN if args.breakdown else ()))
    jits = ("split", "nnx") if args.jit == "both" else (args.jit,)

    runs: dict[tuple[str, str], list] = {}
    compile_s: dict[str, float] = {}
    for case in cases:
        for jit in jits:
            model = make_model(
                case, weight_bits=args.weight_bits, act_bits=args.act_bits, seed=args.seed
            )
            step, carry = STEPS[jit](model, tx, case.memory_loss)
            t0 = time.perf_counter()
            for _ in range(2):  # compile, then one more run to settle the buffers
                carry, loss = step(carry, x, labels)
                jax.block_until_ready(loss)
            compile_s[f"{case.name} [{jit}]"] = time.perf_counter() - t0
            print(f"compiled {case.name} [{jit}]: loss {float(loss):.4f}", flush=True)
            runs[case.name, jit] = [step, carry]

    times: dict[tuple[str, str], list[float]] = {k: [] for k in runs}
    cpu_times: dict[tuple[str, str], list[float]] = {k: [] for k in runs}
    for _ in range(args.steps):
        for key, run in runs.items():
            step, carry = run
            c0, t0 = time.process_time(), time.perf_counter()
            carry, loss = step(carry, x, labels)
            jax.block_until_ready((carry, loss))
            times[key].append(time.perf_counter() - t0)
            cpu_times[key].append(time.process_time() - c0)
            run[1] = carry
    median_s = {k: statistics.median(t) for k, t in times.items()}
    median_cpu_s = {k: statistics.median(t) for k, t in cpu_times.items()}
    # Same-round ratios: robust to load that drifts over the run (a shared machine).
    paired = {
        (name, jit): statistics.median(
            q / f for q, f in zip(times[name, jit], times["float", jit], strict=True)
        )
        for name, jit in runs
    }

    print(f"\nbatch {args.batch}, {args.steps} interleaved steps per case, median wall time:")
    print(f"  {'case':<38s} {'wall':>9s}  {'x float':>7s}  {'paired':>6s}  {'CPU time':>9s}")
    for (name, jit), t in median_s.items():
        cpu = median_cpu_s[name, jit]
        print(
            f"  {name + ' [' + jit + ']':<38s} {1e3 * t:6.1f} ms  "
            f"{t / median_s['float', jit]:7.2f}  {paired[name, jit]:6.2f}  {1e3 * cpu:6.0f} ms"
        )
    best = {c.name: min(median_s[c.name, j] for j in jits) for c in cases}
    best_jit = {c.name: min(jits, key=lambda j, c=c: median_s[c.name, j]) for c in cases}
    ratio = best["quantized"] / best["float"]
    print(f"float {1e3 * best['float']:.1f} ms [{best_jit['float']}]")
    print(f"quantized {1e3 * best['quantized']:.1f} ms [{best_jit['quantized']}]")

    if args.json is not None:
        command = shlex.join(["python", *(sys.argv if argv is None else [__file__, *argv])])
        record = {
            "benchmark": "one jitted train step (fwd + bwd + sgd momentum) of ResNet-20, "
            "U3-quantized (CE + memory penalty) vs float (CE)",
            "provenance": provenance(
                command, wall_time_s=time.perf_counter() - start, seed=args.seed
            ),
            "batch": args.batch,
            "steps": args.steps,
            "weight_bits": args.weight_bits,
            "act_bits": args.act_bits,
            "median_ms": {f"{n} [{j}]": round(1e3 * t, 2) for (n, j), t in median_s.items()},
            "median_cpu_ms": {
                f"{n} [{j}]": round(1e3 * t, 1) for (n, j), t in median_cpu_s.items()
            },
            "paired_ratio": {f"{n} [{j}]": round(r, 4) for (n, j), r in paired.items()},
            "all_ms": {f"{n} [{j}]": [round(1e3 * v, 2) for v in t] for (n, j), t in times.items()},
            "compile_and_first_two_s": {k: round(v, 2) for k, v in compile_s.items()},
            "best_jit": best_jit,
            "ratio": round(ratio, 4),
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1) + "\n")
    print(f"ratio {ratio:.2f}")


if __name__ == "__main__":
    main()
