"""Kernels in the compiled training step: quantized ResNet-20 against float, counted on CPU.

The quantized step is launch-bound on a GPU (results/perf.md): what it costs beyond the float
step is mostly the number of kernels, not their work. XLA's compiled module says how many
there are before any GPU time is spent. For each case of ``scripts/bench_train.py`` (float;
U3 weights under the weight budget; U3 weights + activations under both budgets) this runs
the real trainer for two single-step calls (``train.steps_per_call = 1``) with XLA's
post-optimisation HLO dumped, takes the largest module compiled (the training step; its
name is printed) and counts the instructions that run as kernels: those of the entry
computation and of the loops and branches it calls, not the ones fused inside a kernel.
``fusion`` is XLA's fused elementwise/reduction kernel, ``convolution`` and ``custom-call``
library calls; the other operations that launch work (``reduce``, ``copy``, ``scatter``, …)
are counted too. Bookkeeping (parameters, constants, tuples, bitcasts) is not.

Counts are of the CPU backend's fusion decisions, which differ from the GPU's in detail but
move with the same changes: a change that removes kernels here is worth timing on a GPU.

``--parts`` also counts two pieces of the quantized step compiled alone, on ResNet-20 with
U3 weights and activations: the optimizer update (``optim.budget_chain``, without and with
the two budgets, leaf by leaf and with ``flat=True`` and the vectorized accounting of
``optim.flat_update``) and the accounting's sizes and their gradient, the budget's part of
the backward pass (scalar per tensor, and vectorized); and, for comparison, momentum SGD with
weight decay on the same parameters, leaf by leaf and through ``optax.flatten`` (one
concatenated vector). ``--flat_update`` counts the step with ``optim.flat_update``.

    python scripts/count_kernels.py [--cases float,u3_w,u3_wa] [--recipe paper] [--parts]
        [--flat_update] [--json PATH]
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

# XLA reads its flags once, when the backend starts: set the dump before JAX is imported.
_DUMP = Path(tempfile.mkdtemp(prefix="mpdnn-hlo-"))
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={_DUMP} --xla_dump_hlo_as_text"
).strip()

import argparse  # noqa: E402
import atexit  # noqa: E402
import collections  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402

atexit.register(shutil.rmtree, _DUMP, ignore_errors=True)  # several MB per module
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_train  # noqa: E402
import jax  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from mpdnn import models, nn, optim  # noqa: E402
from mpdnn.cli import OneLineParser  # noqa: E402
from mpdnn.provenance import provenance  # noqa: E402
from mpdnn.training.trainer import train_and_evaluate  # noqa: E402

#: Operations that move no data and launch nothing.
BOOKKEEPING = frozenset(
    "parameter constant get-tuple-element tuple bitcast while conditional call after-all "
    "partition-id replica-id opt-barrier".split()
)
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_ASSIGN = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*)$")


def _op_and_rest(rhs: str) -> tuple[str, str]:
    """``type op(operands), attributes`` → ``(op, operands and attributes)``."""
    if rhs.startswith("("):  # a tuple type: skip to its closing parenthesis
        depth = 0
        for i, ch in enumerate(rhs):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                rhs = rhs[i + 1 :]
                break
    else:
        rhs = rhs.split(" ", 1)[1] if " " in rhs else ""
    rhs = rhs.strip()
    op = rhs.split("(", 1)[0].strip()
    return op, rhs[len(op) :]


def parse_module(text: str) -> tuple[str, dict[str, list[tuple[str, str]]]]:
    """HLO text → (entry computation's name, {computation: [(op, rest), ...]})."""
    computations: dict[str, list[tuple[str, str]]] = {}
    entry, current = None, None
    for line in text.splitlines():
        if current is None:
            header = _HEADER.match(line)
            if header and "=" not in line.split("(", 1)[0]:
                current = header.group(2)
                computations[current] = []
                if header.group(1):
                    entry = current
            continue
        if line.strip() == "}":
            current = None
            continue
        assign = _ASSIGN.match(line)
        if assign:
            computations[current].append(_op_and_rest(assign.group(1)))
    if entry is None:
        raise ValueError("no ENTRY computation in the module")
    return entry, computations


def _called(rest: str, *keys: str) -> list[str]:
    names = []
    for key in keys:
        for match in re.finditer(rf"{key}=\{{?([^,}}\s]+(?:,\s*%?[\w.\-]+)*)\}}?", rest):
            names += [n.strip().lstrip("%") for n in match.group(1).split(",")]
    return names


def count_kernels(text: str) -> collections.Counter:
    """Instructions by operation over the computations that launch kernels: the entry and the
    bodies, conditions and branches of its loops, conditionals and calls (recursively)."""
    entry, computations = parse_module(text)
    counts: collections.Counter = collections.Counter()
    todo, seen = [entry], set()
    while todo:
        name = todo.pop()
        if name in seen or name not in computations:
            continue
        seen.add(name)
        for op, rest in computations[name]:
            if op == "while":
                todo += _called(rest, "body", "condition")
            elif op == "conditional":
                todo += _called(
                    rest, "branch_computations", "true_computation", "false_computation"
                )
            elif op == "call":
                todo += _called(rest, "to_apply")
            if op not in BOOKKEEPING:
                counts[op] += 1
    return counts


def _instructions(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if " = " in line)


def step_module(before: set[Path]) -> Path:
    """The largest post-optimisation module dumped since ``before``: the training step."""
    new = set(_DUMP.glob("*after_optimizations.txt")) - before
    if not new:
        raise SystemExit("XLA dumped no module: is a compilation cache answering instead?")
    return max(new, key=_instructions)


def compiled_kernels(fn, *args) -> int:
    return sum(count_kernels(jax.jit(fn).lower(*args).compile().as_text()).values())


def part_counts() -> dict[str, int]:
    """Kernels of pieces of the quantized step, each compiled alone (module docstring)."""
    model = models.build("resnet20", rngs=nnx.Rngs(0))
    rules = [nn.Rule(".*", nn.QuantConfig(bits=4), kind=k) for k in ("weight", "activation")]
    nn.quantize_model(model, rules)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    accounting = optim.Accounting.from_model(model)
    vector = optim.Accounting.from_model(model, vectorized=True)  # optim.flat_update's
    budgets = [optim.Budget("weight_kb", 70.1), optim.Budget("act_max_kb", 8.1)]

    def update(tx):
        def step(grads, state, params):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        return compiled_kernels(step, params, tx.init(params), params)

    def sgd():
        return optax.chain(optax.add_decayed_weights(2e-4), optim.sgd_nnabla(0.03, 0.9))

    def sizes_gradient(acc):
        def total(p):
            sizes = acc(p)
            return sizes["weight_kb"] + sizes["act_max_kb"]

        return compiled_kernels(jax.grad(total), params)

    return {
        "parameter_leaves": len(jax.tree.leaves(params)),
        "update_no_budget": update(optim.budget_chain(accounting, [], 0.03)),
        "update_two_budgets": update(optim.budget_chain(accounting, budgets, 0.03)),
        "update_no_budget_flat": update(optim.budget_chain(vector, [], 0.03, flat=True)),
        "update_two_budgets_vector_sizes": update(optim.budget_chain(vector, budgets, 0.03)),
        "update_two_budgets_flat_scalar_sizes": update(
            optim.budget_chain(accounting, budgets, 0.03, flat=True)
        ),
        "update_two_budgets_flat": update(optim.budget_chain(vector, budgets, 0.03, flat=True)),
        "sizes_forward": compiled_kernels(lambda p: accounting(p), params),
        "sizes_forward_vectorized": compiled_kernels(lambda p: vector(p), params),
        "sizes_gradient": sizes_gradient(accounting),
        "sizes_gradient_vectorized": sizes_gradient(vector),
        "sgd_decay_leafwise": update(sgd()),
        "sgd_decay_flattened": update(optax.flatten(sgd())),
    }


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="scripts/count_kernels.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(bench_train.CASES))
    parser.add_argument("--recipe", default="paper", choices=("paper", "mpdnn"))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--parts", action="store_true", help="also count pieces of the step")
    parser.add_argument(
        "--flat_update", action="store_true", help="optim.flat_update (mpdnn.optim.flat)"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(cases) - set(bench_train.CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {', '.join(bench_train.CASES)}")
    bench_args = argparse.Namespace(
        model="resnet20",
        compute_dtype=None,
        image_size=32,
        batch=args.batch,
        steps=2,
        steps_per_call=1,
        recipe=args.recipe,
        flat_update=args.flat_update,
    )
    start = time.perf_counter()
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            config = bench_train.case_config(case, bench_args)
            config.train.scan = False
            config.train.eval_every_epochs = 0
            before = set(_DUMP.glob("*after_optimizations.txt"))
            train_and_evaluate(config, Path(tmp) / case)
            module = step_module(before)
            counts = count_kernels(module.read_text())
            out[case] = {
                "module": module.name.split(".", 1)[1].rsplit(".after_optimizations", 1)[0],
                "kernels": sum(counts.values()),
                "fusions": counts["fusion"],
                "by_operation": dict(counts.most_common()),
            }
            print(
                f"{case:<6} {out[case]['kernels']:5d} kernels, {out[case]['fusions']:5d} fusions "
                f"({out[case]['module']})",
                flush=True,
            )
    parts = part_counts() if args.parts else None
    for name, count in (parts or {}).items():
        print(f"{name:<22} {count:5d}")
    if args.json:
        command = shlex.join(["python", "scripts/count_kernels.py", *(argv or sys.argv[1:])])
        record = {
            "parts": parts,
            "measure": "kernel-launching instructions in the compiled training step (CPU HLO)",
            "batch": args.batch,
            "recipe": args.recipe,
            "flat_update": args.flat_update,
            "results": out,
            "provenance": provenance(command, wall_time_s=time.perf_counter() - start),
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
