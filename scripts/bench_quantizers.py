"""Forward + backward cost of ``mq.quantize`` against a bare clip + round fake-quantizer.

What is timed, for each case, is one jitted call that a training step makes of a quantizer:
the forward output ``y = Q(x)`` and the VJP for a cotangent ``g`` (``jax.vjp``), on a float32
array of ``--size`` elements (default 2**22 = 4M):

* ``baseline``: ``d * round_ste(clip(x, -qmax, qmax) / d)`` with ``d``, ``qmax`` Python
  constants (folded into the executable) and the gradient w.r.t. ``x`` only: the cheapest a
  straight-through fake-quantizer can be;
* ``U3`` (``d_qmax``) and ``P3`` (``qmin_qmax``): ``mq.quantize`` with signed weight specs,
  default boxes and θ from ``mq.init_weight_theta``; gradients w.r.t. ``x`` *and* θ, which
  needs a reduction over all elements that the baseline does not have;
* ``U3 autodiff``: the same U3 maths written as plain ``jnp`` and differentiated by JAX
  (what ``mq.quantize`` replaced with its single-pass VJP), for context.

Two timings per case, each the median over interleaved rounds (so that machine noise hits
all cases alike), after one compile-and-run:

* ``in-step``: ``--chain`` passes chained in one ``fori_loop`` (see :func:`chained_call`),
  per pass: the quantizer's cost inside a jitted training step. The last line,
  ``ratio U3 <a> P3 <b>``, is this time over the baseline's.
* ``per-call``: one standalone jitted call, which on CPU also pays for allocating its
  full-size outputs.

    python scripts/bench_quantizers.py [--size 4194304] [--repeats 30] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp

import mpdnn.quantizers as mq
from mpdnn.provenance import provenance

CASES = {"U3": ("uniform", "d_qmax"), "P3": ("pow2", "qmin_qmax")}


def vjp_call(f: Callable, *primals) -> Callable:
    """Jitted ``(x, θ..., g) -> (f(x, θ...), grads)``: one forward and one backward pass."""

    def call(*args):
        *inputs, g = args
        y, pullback = jax.vjp(f, *inputs)
        return y, pullback(g)

    return jax.jit(call)


def chained_call(f: Callable, steps: int) -> Callable:
    """Jitted ``steps`` forward+backward passes in one ``fori_loop``, each feeding the next.

    Inside one executable XLA reuses its buffers, so this measures the quantizer's compute as
    it runs inside a jitted training step, without the per-call output allocation (and the
    page faults of freshly mapped 16 MiB outputs) that dominate a standalone call on CPU.
    Every output, θ-gradients included, feeds the next input, so nothing is dead code.
    """

    def call(*args):
        x, *theta, g = args

        def body(_, x):
            y, pullback = jax.vjp(f, x, *theta)
            grad_x, *grad_theta = pullback(g)
            feedback = sum(jnp.sum(jnp.stack(jax.tree.leaves(gt))) for gt in grad_theta)
            return y + grad_x + 1e-30 * feedback

        return jax.lax.fori_loop(0, steps, body, x)

    return jax.jit(call)


def autodiff_u3(spec: mq.QuantSpec) -> Callable:
    """U3 as plain jnp (box, pow2 snap and round straight-through), left to autodiff."""

    def q(x, theta):
        d = mq.pow2_ste(mq.box(theta["d"], *spec.d_range))
        qmax = mq.box(theta["qmax"], *spec.qmax_range)
        c = jnp.where(x >= qmax, qmax, jnp.where(x > -qmax, x, -qmax))
        return d * mq.round_ste(c / d)

    return q


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=2**22, help="elements (default 2**22)")
    parser.add_argument("--repeats", type=int, default=30, help="timed rounds")
    parser.add_argument("--chain", type=int, default=10, help="passes per in-step timing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write a json record here")
    args = parser.parse_args(argv)
    start = time.perf_counter()

    key_x, key_g = jax.random.split(jax.random.key(args.seed))
    x = jax.random.normal(key_x, (args.size,), jnp.float32)
    g = jax.random.normal(key_g, (args.size,), jnp.float32)
    specs = {name: mq.weight_spec(f, p) for name, (f, p) in CASES.items()}
    thetas = {name: mq.init_weight_theta(s, bits=4, weights=x) for name, s in specs.items()}
    # The baseline is U3's initial quantizer, so both do the same rounding work.
    d, qmax = (float(v) for v in mq.canonical(thetas["U3"], specs["U3"]))

    def baseline(x):
        return d * mq.round_ste(jnp.clip(x, -qmax, qmax) / d)

    functions: dict[str, tuple[Callable, tuple]] = {
        "baseline": (baseline, (x, g)),
        "U3": (lambda x, t: mq.quantize(x, t, specs["U3"]), (x, thetas["U3"], g)),
        "P3": (lambda x, t: mq.quantize(x, t, specs["P3"]), (x, thetas["P3"], g)),
        "U3 autodiff": (autodiff_u3(specs["U3"]), (x, thetas["U3"], g)),
    }
    labels = {
        "baseline": "baseline clip+round, grad x",
        "U3": "U3 mq.quantize, grad x and theta",
        "P3": "P3 mq.quantize, grad x and theta",
        "U3 autodiff": "U3 plain-jnp autodiff, grad x and theta",
    }
    modes = {"in-step": lambda f: chained_call(f, args.chain), "per-call": vjp_call}
    median_ms: dict[str, dict[str, float]] = {}
    temp_mib: dict[str, float] = {}
    for mode, make in modes.items():
        calls = {name: (make(f), fargs) for name, (f, fargs) in functions.items()}
        for name, (fn, fargs) in calls.items():
            if mode == "per-call":
                compiled = fn.lower(*fargs).compile()
                temp_mib[name] = compiled.memory_analysis().temp_size_in_bytes / 2**20
            jax.block_until_ready(fn(*fargs))
        times: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(args.repeats):
            for name, (fn, fargs) in calls.items():
                t0 = time.perf_counter()
                jax.block_until_ready(fn(*fargs))
                times[name].append(time.perf_counter() - t0)
        per_pass = args.chain if mode == "in-step" else 1
        median_ms[mode] = {n: 1e3 * statistics.median(t) / per_pass for n, t in times.items()}
    print(f"{'case':<42s} {'in-step':>10s} {'per-call':>10s}  (per-call XLA temp)")
    for name in functions:
        print(
            f"{labels[name]:<42s} {median_ms['in-step'][name]:7.2f} ms "
            f"{median_ms['per-call'][name]:7.2f} ms  ({temp_mib[name]:.1f} MiB)"
        )
    ratios = {
        mode: {n: t[n] / t["baseline"] for n in (*CASES, "U3 autodiff")}
        for mode, t in median_ms.items()
    }
    for mode, r in ratios.items():
        print(f"{mode}: " + ", ".join(f"{n} {v:.2f}" for n, v in r.items()) + " (x baseline)")
    ratio = ratios["in-step"]

    if args.json is not None:
        command = shlex.join(["python", *(sys.argv if argv is None else [__file__, *argv])])
        record = {
            "benchmark": "quantize forward+backward (vjp) vs bare clip+round fake-quantizer",
            "provenance": provenance(
                command, wall_time_s=time.perf_counter() - start, seed=args.seed
            ),
            "size": args.size,
            "repeats": args.repeats,
            "chain": args.chain,
            "median_ms_per_pass": {
                m: {k: round(v, 3) for k, v in t.items()} for m, t in median_ms.items()
            },
            "per_call_temp_mib": {k: round(v, 2) for k, v in temp_mib.items()},
            "ratio_to_baseline": {
                m: {k: round(v, 3) for k, v in r.items()} for m, r in ratios.items()
            },
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1) + "\n")
    print(f"ratio U3 {ratio['U3']:.2f} P3 {ratio['P3']:.2f}")


if __name__ == "__main__":
    main()
