"""The paper's Gaussian experiment (Uhlich et al., ICLR 2020, §2.3, Fig. 3), all six
parametrizations side by side.

Purpose: fit one quantizer to 10^4 samples of N(0, 1) by minimising the mean squared error
E[(Q(x; θ) - x)²] with plain gradient descent on the raw θ, one learning rate for all of
U1 (b, d), U2 (b, qmax), U3 (d, qmax), pow2 (b, qmax), pow2 (b, qmin) and P3 (qmin, qmax)
(docs/method.md §2). Every quantizer is a signed weight quantizer
(:func:`mpdnn.quantizers.weight_spec`) and starts at 4 bits from
:func:`mpdnn.quantizers.init_weight_theta` with the samples as "weights" (docs/method.md §4), so
U1/U2/U3 start from the same uniform quantizer and the three pow2 cases from the same pow2
one. Two settings: ``pow2_step=True`` (the paper's quantizers, the main result) and
``pow2_step=False`` (free step size).

Command (from the repository root)::

    python experiments/gaussian_mse.py                 # writes results/ and docs/
    python experiments/gaussian_mse.py --smoke         # 20 steps, 1000 samples, temp dir

Expected result (paper, Fig. 3): U3 and P3 reach the lowest error of their family without
oscillation, because their gradients are bounded and decoupled, while U1/U2 gradients grow
like ``2**b`` and couple the parameters, so U1/U2 are slower or oscillate. The verdict in
``results/gaussian_mse.md`` is computed from the numbers. Budget: 2 settings × 3 learning
rates × 6 parametrizations × 2000 steps; about 20 s on a 2-core CPU (JAX CPU), most of it
compilation.

Outputs: ``results/gaussian_mse.json`` and ``results/gaussian_mse.md`` (numbers with
provenance), ``docs/gaussian_mse.png`` (main learning rate, pow2 step) and
``docs/gaussian_mse_all.png`` (every setting and learning rate).

The functions are pure functions of their arguments; the whole descent of one
parametrization is a single jitted :func:`jax.lax.scan`. Plotting imports matplotlib lazily.
Tests load this file by path (``tests/test_gaussian.py``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import mpdnn.quantizers as mq
from mpdnn.plots import save_figure
from mpdnn.provenance import provenance

#: The six parametrizations of docs/method.md §2, in the paper's order (Fig. 3, Table 1).
CASES: tuple[tuple[str, str], ...] = (
    ("uniform", "b_d"),
    ("uniform", "b_qmax"),
    ("uniform", "d_qmax"),
    ("pow2", "b_qmax"),
    ("pow2", "b_qmin"),
    ("pow2", "qmin_qmax"),
)


DEFAULT_SEED = 0
DEFAULT_NUM_SAMPLES = 10_000  # paper: 10^4 samples
DEFAULT_STEPS = 2000
DEFAULT_LEARNING_RATE = 1e-2
DEFAULT_BITS = 4  # paper: every quantizer starts at 4 bits

# A curve "oscillates" when, over the second half of the run, its log-MSE climbs back up by
# more than this in total (0.01 = a cumulative 1% rise). Float noise on a plateau stays far
# below it; one visible spike on the log plot of Fig. 3 is far above it.
OSCILLATION_TOLERANCE = 0.01
# A single step counts as a "rise" when it increases the MSE by more than this fraction.
RISE_THRESHOLD = 0.01


class Trajectory(NamedTuple):
    """One parametrization's descent; arrays have ``steps + 1`` entries (index 0 = start).

    Attributes:
      family, parametrization: which quantizer (docs/method.md §2).
      mse: ``mean((Q(x; θ_t) - x)²)`` for t = 0 … steps.
      bits: inferred bitwidth ``mq.bitwidth(θ_t)`` (docs/method.md §3).
      params: canonical parameters per step (``d``/``qmax`` or ``qmin``/``qmax``, after the
        box, rounding and power-of-two constraints of docs/method.md §2).
      theta: the raw θ after the last step.
    """

    family: str
    parametrization: str
    mse: np.ndarray
    bits: np.ndarray
    params: dict[str, np.ndarray]
    theta: dict[str, np.ndarray]

    @property
    def name(self) -> str:
        """The paper's label, e.g. ``"U3 (d, qmax)"``."""
        return mq.PAPER_NAMES[(self.family, self.parametrization)]

    @property
    def short_name(self) -> str:
        return mq.SHORT_NAMES[(self.family, self.parametrization)]


class Summary(NamedTuple):
    """Scalar description of one trajectory (see :func:`summarize`)."""

    name: str
    short_name: str
    initial_mse: float
    final_mse: float
    min_mse: float
    argmin_step: int
    oscillation: float
    rises: int
    initial_bits: float
    final_bits: float
    finite: bool

    @property
    def oscillates(self) -> bool:
        return not self.finite or self.oscillation > OSCILLATION_TOLERANCE


def case_id(family: str, parametrization: str) -> str:
    """A stable string key, e.g. ``"uniform_d_qmax"`` (used in result dicts and JSON)."""
    return f"{family}_{parametrization}"


def gaussian_samples(*, key: jax.Array, num_samples: int = DEFAULT_NUM_SAMPLES) -> jax.Array:
    """``num_samples`` draws of N(0, 1), float32 (the paper's data for Fig. 3)."""
    return jax.random.normal(key, (num_samples,), jnp.float32)


def experiment_spec(family: str, parametrization: str, *, pow2_step: bool = True) -> mq.QuantSpec:
    """The signed weight quantizer used for one case (authors' weight boxes)."""
    return mq.weight_spec(family, parametrization, pow2_step=pow2_step)


def mse_loss(theta: Mapping[str, jax.Array], x: jax.Array, spec: mq.QuantSpec) -> jax.Array:
    """``mean((Q(x; θ) - x)²)``: the objective of the paper's Fig. 3."""
    return jnp.mean(jnp.square(mq.quantize(x, theta, spec) - x))


def _canonical_dict(theta: Mapping[str, jax.Array], spec: mq.QuantSpec) -> dict[str, jax.Array]:
    """Canonical parameters as a plain dict (scan outputs must be pytrees of arrays)."""
    return mq.canonical(theta, spec)._asdict()


@partial(jax.jit, static_argnames=("spec", "steps"))
def descend(
    theta: Mapping[str, jax.Array],
    samples: jax.Array,
    learning_rate: jax.typing.ArrayLike,
    *,
    spec: mq.QuantSpec,
    steps: int,
) -> tuple[dict[str, jax.Array], jax.Array, jax.Array, dict[str, jax.Array]]:
    """Plain gradient descent ``θ ← θ - lr ∇θ mse`` for ``steps`` steps, as one ``lax.scan``.

    Nothing but the gradient moves θ: no projection into the boxes and no gradient clipping
    (those are the authors' training-time additions, docs/method.md §6), so the comparison
    isolates the parametrization as in the paper's Fig. 3. ``learning_rate`` is traced, so one
    compilation per (spec, steps, sample shape) serves every learning rate.

    Returns:
      ``(theta_final, mse, bits, params)`` with ``mse``, ``bits`` and each entry of
      ``params`` of length ``steps + 1``: entry t describes θ after t updates.
    """
    theta = {k: jnp.asarray(v, jnp.float32) for k, v in theta.items()}
    lr = jnp.asarray(learning_rate, jnp.float32)
    value_and_grad = jax.value_and_grad(mse_loss)

    def step(theta, t):
        mse, grad = value_and_grad(theta, samples, spec)
        bits = mq.bitwidth(theta, spec)
        params = _canonical_dict(theta, spec)
        # Run ``steps + 1`` iterations so the state after the last update is recorded by the
        # same traced body (one copy of the graph to compile); the last one does not update.
        scale = jnp.where(t < steps, lr, 0.0)
        theta = jax.tree.map(lambda v, g: v - scale * g, theta, grad)
        return theta, (mse, bits, params)

    theta, (mse, bits, params) = jax.lax.scan(step, theta, jnp.arange(steps + 1))
    return theta, mse, bits, params


def run_case(
    family: str,
    parametrization: str,
    samples: jax.Array,
    *,
    learning_rate: float,
    steps: int,
    pow2_step: bool = True,
    bits: int = DEFAULT_BITS,
) -> Trajectory:
    """Descend one parametrization from its 4-bit start (docs/method.md §4, weights = samples)."""
    spec = experiment_spec(family, parametrization, pow2_step=pow2_step)
    theta0 = mq.init_weight_theta(spec, bits=bits, weights=samples)
    theta, mse, bit_curve, params = descend(theta0, samples, learning_rate, spec=spec, steps=steps)
    return Trajectory(
        family=family,
        parametrization=parametrization,
        mse=np.asarray(mse),
        bits=np.asarray(bit_curve),
        params={k: np.asarray(v) for k, v in params.items()},
        theta={k: np.asarray(v) for k, v in theta.items()},
    )


def run_experiment(
    *,
    seed: int = DEFAULT_SEED,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    steps: int = DEFAULT_STEPS,
    learning_rate: float = DEFAULT_LEARNING_RATE,
    pow2_step: bool = True,
    bits: int = DEFAULT_BITS,
    cases: Sequence[tuple[str, str]] = CASES,
) -> dict[str, Trajectory]:
    """Run every case of ``cases`` on the same samples with the same learning rate.

    Returns ``{case_id(family, parametrization): Trajectory}`` in the order of ``cases``.
    """
    samples = gaussian_samples(key=jax.random.key(seed), num_samples=num_samples)
    return {
        case_id(f, p): run_case(
            f, p, samples, learning_rate=learning_rate, steps=steps, pow2_step=pow2_step, bits=bits
        )
        for f, p in cases
    }


def _log_steps(mse: np.ndarray) -> np.ndarray:
    """``diff(log mse)`` over the second half of the run (the part that should have settled)."""
    tail = np.asarray(mse[len(mse) // 2 :], np.float64)
    return np.diff(np.log(np.maximum(tail, np.finfo(np.float64).tiny)))


def oscillation(mse: np.ndarray) -> float:
    """How far the MSE climbs back up over the second half of the run, on the log scale.

    ``Σ max(0, log mse[t+1] - log mse[t])`` over the second half, in nats: 0 for a
    monotone descent or a plateau, ~0.34 per cycle for a curve that jumps between 0.020 and
    0.028 (U1's limit cycle in Fig. 3), 0.01 for a cumulative 1% rise. Measured on the log
    scale so that it reads the same for quantizers whose errors differ by decades; ``inf``
    when the run produced a non-finite MSE.
    """
    mse = np.asarray(mse, np.float64)
    if not np.all(np.isfinite(mse[len(mse) // 2 :])):
        return float("inf")
    return float(np.clip(_log_steps(mse), 0.0, None).sum())


def rises(mse: np.ndarray, *, threshold: float = RISE_THRESHOLD) -> int:
    """Number of steps in the second half that raise the MSE by more than ``threshold``."""
    mse = np.asarray(mse, np.float64)
    if not np.all(np.isfinite(mse[len(mse) // 2 :])):
        return -1
    return int(np.count_nonzero(_log_steps(mse) > np.log1p(threshold)))


def summarize(trajectory: Trajectory) -> Summary:
    """Final and best MSE, oscillation measures and bits of one trajectory."""
    mse = np.asarray(trajectory.mse, np.float64)
    finite = bool(np.all(np.isfinite(mse)))
    safe = np.where(np.isfinite(mse), mse, np.inf)
    return Summary(
        name=trajectory.name,
        short_name=trajectory.short_name,
        initial_mse=float(mse[0]),
        final_mse=float(mse[-1]),
        min_mse=float(safe.min()),
        argmin_step=int(safe.argmin()),
        oscillation=oscillation(mse),
        rises=rises(mse),
        initial_bits=float(trajectory.bits[0]),
        final_bits=float(trajectory.bits[-1]),
        finite=finite,
    )


def summarize_all(results: Mapping[str, Trajectory]) -> dict[str, Summary]:
    """:func:`summarize` for every case of a :func:`run_experiment` result."""
    return {k: summarize(t) for k, t in results.items()}


class Verdict(NamedTuple):
    """Did the paper's parametrization of one family win (see :func:`verdict`)?"""

    short_name: str
    lowest: bool
    oscillates: bool
    final_mse: float
    runner_up: str
    runner_up_mse: float

    @property
    def holds(self) -> bool:
        return self.lowest and not self.oscillates

    def sentence(self) -> str:
        ours, other = self.final_mse, self.runner_up_mse
        if not np.isfinite(ours):
            return f"{self.short_name} diverged (non-finite MSE)"
        if not np.isfinite(other):
            return f"{self.short_name} reached {ours:.4g}; every other case diverged"
        lo, hi = min(ours, other), max(ours, other)
        # A factor reads better than "13000% lower" when the gap is large; a tiny gap needs
        # scientific notation, or it prints as "0.00%".
        rel = (hi - lo) / hi
        if hi >= 2 * lo:
            gap = f"{hi / lo:.3g}x"
        else:
            gap = f"{rel:.2%}" if rel >= 1e-4 else f"{100 * rel:.1e}%"
        next_best = f"{self.runner_up}, {other:.4g}"
        if self.lowest and other > ours:
            where = (
                f"the lowest final MSE ({ours:.4g}), {gap} lower than the next best ({next_best})"
            )
        elif self.lowest:
            where = f"the lowest final MSE ({ours:.4g}), tied with {next_best}"
        else:
            where = (
                f"a final MSE of {ours:.4g}, not the lowest ({self.runner_up} reached "
                f"{other:.4g}, {gap} lower)"
            )
        wobble = "and it oscillated" if self.oscillates else "without oscillation"
        return f"{self.short_name} reached {where}, {wobble}"


def verdict(summaries: Mapping[str, Summary], *, rtol: float = 1e-6) -> dict[str, Verdict]:
    """Did U3 and P3 reach the lowest final error without oscillation (paper, Fig. 3)?

    Judged within each family (U3 against U1/U2, P3 against the b-based pow2 cases), since
    a uniform and a pow2 grid do not reach the same error. A final MSE within ``rtol`` of
    the best counts as lowest (float32 noise). Computed from the numbers, never assumed.
    Returns ``{family: Verdict}`` for the families present in ``summaries``.
    """
    out = {}
    for family, winner in (("uniform", "d_qmax"), ("pow2", "qmin_qmax")):
        key = case_id(family, winner)
        others = {k: s for k, s in summaries.items() if k.startswith(family + "_") and k != key}
        if key not in summaries or not others:
            continue
        ours = summaries[key]
        finite = [s for s in others.values() if s.finite]
        best = min(finite, key=lambda s: s.final_mse) if finite else None
        best_mse = best.final_mse if best else float("inf")
        out[family] = Verdict(
            short_name=ours.short_name,
            lowest=ours.finite and ours.final_mse <= best_mse * (1 + rtol),
            oscillates=ours.oscillates,
            final_mse=ours.final_mse,
            runner_up=best.short_name if best else "none (all others diverged)",
            runner_up_mse=best_mse,
        )
    return out


def family_spread(summaries: Mapping[str, Summary], family: str) -> float:
    """Relative spread ``(max - min) / min`` of the final MSEs within one family."""
    finals = [s.final_mse for k, s in summaries.items() if k.startswith(family + "_") and s.finite]
    return (max(finals) - min(finals)) / min(finals) if finals else float("nan")


def verdict_sentence(summaries: Mapping[str, Summary]) -> str:
    """:func:`verdict` as one plain sentence starting with Yes/No."""
    verdicts = verdict(summaries)
    head = "Yes" if verdicts and all(v.holds for v in verdicts.values()) else "No"
    return f"{head}: " + "; ".join(v.sentence() for v in verdicts.values()) + "."


def format_table(summaries: Mapping[str, Summary], *, markdown: bool = False) -> str:
    """A readable table: parametrization, initial/final/min MSE, oscillation, bits."""
    header = (
        "parametrization",
        "MSE start",
        "MSE final",
        "MSE min @step",
        "oscillation (rises)",
        "bits start -> final",
    )
    rows = [
        (
            s.name,
            f"{s.initial_mse:.4e}",
            f"{s.final_mse:.4e}",
            f"{s.min_mse:.4e} @{s.argmin_step}",
            f"{s.oscillation:.3g} ({s.rises})" + (" *" if s.oscillates else ""),
            f"{s.initial_bits:g} -> {s.final_bits:g}",
        )
        for s in summaries.values()
    ]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*r) for r in [header, *rows])


def _json_float(v: float) -> float | None:
    """Strict JSON has no NaN/inf: a diverged run's numbers become ``null``."""
    v = float(v)
    return v if np.isfinite(v) else None


def record(trajectory: Trajectory) -> dict:
    """A JSON-ready summary of one trajectory, with its final canonical and raw parameters."""
    s = summarize(trajectory)
    return {
        "family": trajectory.family,
        "parametrization": trajectory.parametrization,
        "name": s.name,
        "initial_mse": _json_float(s.initial_mse),
        "final_mse": _json_float(s.final_mse),
        "min_mse": _json_float(s.min_mse),
        "argmin_step": s.argmin_step,
        "oscillation": _json_float(s.oscillation),
        "rises": s.rises,
        "oscillates": s.oscillates,
        "initial_bits": _json_float(s.initial_bits),
        "final_bits": _json_float(s.final_bits),
        "final_canonical": {k: _json_float(v[-1]) for k, v in trajectory.params.items()},
        "final_theta": {k: _json_float(v) for k, v in trajectory.theta.items()},
    }


def _case_style(key: str) -> dict:
    """Uniform cases solid, pow2 dashed; the paper's U3/P3 drawn thicker."""
    winner = key.endswith("d_qmax") or key.endswith("qmin_qmax")
    return {
        "linestyle": "-" if key.startswith("uniform") else "--",
        "linewidth": 2.2 if winner else 1.2,
    }


def _draw(ax_mse, ax_bits, results: Mapping[str, Trajectory]) -> None:
    """One line per parametrization: MSE (log y) on ``ax_mse``, bits on ``ax_bits``."""
    for i, (key, t) in enumerate(results.items()):
        style = {**_case_style(key), "color": f"C{i}", "label": t.name}
        ax_mse.plot(np.arange(len(t.mse)), t.mse, **style)
        if ax_bits is not None:
            ax_bits.plot(np.arange(len(t.bits)), t.bits, **style)
    ax_mse.set_yscale("log")
    ax_mse.set_ylabel("MSE")
    ax_mse.grid(True, which="both", alpha=0.3)
    if ax_bits is not None:
        ax_bits.set_ylabel("bits")
        ax_bits.set_xlabel("step")
        ax_bits.grid(True, alpha=0.3)


def plot_curves(
    results: Mapping[str, Trajectory], path: str | Path, *, title: str | None = None
) -> Path:
    """Fig. 3 of the paper: MSE vs step (log y) and bits vs step, one line per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_mse, ax_bits) = plt.subplots(
        2, 1, figsize=(8, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    _draw(ax_mse, ax_bits, results)
    ax_mse.legend(fontsize=8, ncol=2)
    ax_mse.set_title(title or "Gaussian data: E[(Q(x) - x)^2] by gradient descent")
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def plot_grid(runs: Mapping[tuple[str, float], Mapping[str, Trajectory]], path: str | Path) -> Path:
    """All settings × learning rates: one column per learning rate, MSE and bits rows per
    setting. ``runs`` maps ``(setting_label, learning_rate)`` to a :func:`run_experiment`
    result."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(s for s, _ in runs))
    lrs = sorted({lr for _, lr in runs})
    fig, axes = plt.subplots(
        2 * len(settings),
        len(lrs),
        figsize=(4.5 * len(lrs), 3.2 * 2 * len(settings)),
        sharex=True,
        squeeze=False,
        gridspec_kw={"height_ratios": [3, 1] * len(settings)},
    )
    for row, setting in enumerate(settings):
        for col, lr in enumerate(lrs):
            ax_mse, ax_bits = axes[2 * row, col], axes[2 * row + 1, col]
            if (setting, lr) in runs:
                _draw(ax_mse, ax_bits, runs[(setting, lr)])
            ax_mse.set_title(f"{setting}, lr={lr:g}", fontsize=10)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return save_figure(fig, path, dpi=100)


# The command line: every setting × learning rate, tables, figures, provenance.

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_LRS = (1e-3, 1e-2, 1e-1)
# (label, pow2_step); the first is the paper's setting and the main result.
SETTINGS = (("pow2 step", True), ("free step", False))
SMOKE_STEPS = 20
SMOKE_SAMPLES = 1000

MEASURES = {
    "final_mse": "mean((Q(x) - x)^2) after the last step",
    "min_mse": "lowest MSE over the run (argmin_step: where)",
    "oscillation": (
        "sum over the second half of the run of max(0, log mse[t+1] - log mse[t]), in nats; "
        f"0 = monotone, > {OSCILLATION_TOLERANCE} counts as oscillating"
    ),
    "rises": (f"steps in the second half that raise the MSE by more than {RISE_THRESHOLD:.0%}"),
    "final_bits": "inferred bitwidth mq.bitwidth after the last step (docs/method.md §3)",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="gradient steps (default 2000)")
    parser.add_argument(
        "--lrs", type=float, nargs="+", default=None, help="learning rates (default 1e-3 1e-2 1e-1)"
    )
    parser.add_argument(
        "--main_lr",
        type=float,
        default=DEFAULT_LEARNING_RATE,
        help="learning rate of docs/gaussian_mse.png (the middle of --lrs if not among them)",
    )
    parser.add_argument("--num_samples", type=int, default=None, help="default 10000")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--out_dir", type=Path, default=None, help="json/md (default results/)")
    parser.add_argument("--fig_dir", type=Path, default=None, help="figures (default docs/)")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help=f"tiny run ({SMOKE_STEPS} steps, {SMOKE_SAMPLES} samples) into a temp dir "
        "unless --out_dir/--fig_dir are given",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps = args.steps or SMOKE_STEPS
        args.num_samples = args.num_samples or SMOKE_SAMPLES
        # A smoke run must never overwrite the committed results.
        if args.out_dir is None:
            args.out_dir = Path(tempfile.mkdtemp(prefix="gaussian_mse_smoke_"))
        args.fig_dir = args.fig_dir or args.out_dir
    args.steps = args.steps or DEFAULT_STEPS
    args.num_samples = args.num_samples or DEFAULT_NUM_SAMPLES
    args.lrs = sorted(args.lrs or DEFAULT_LRS)
    args.out_dir = args.out_dir or REPO_ROOT / "results"
    args.fig_dir = args.fig_dir or REPO_ROOT / "docs"
    if args.main_lr not in args.lrs:
        args.main_lr = args.lrs[len(args.lrs) // 2]
    if args.steps < 1 or args.num_samples < 1:
        parser.error("--steps and --num_samples must be positive")
    return args


def run_all(args: argparse.Namespace) -> dict[tuple[str, float], dict[str, Trajectory]]:
    """Every setting × learning rate; one compilation per parametrization and setting."""
    runs = {}
    for label, pow2_step in SETTINGS:
        for lr in args.lrs:
            runs[(label, lr)] = run_experiment(
                seed=args.seed,
                num_samples=args.num_samples,
                steps=args.steps,
                learning_rate=lr,
                pow2_step=pow2_step,
            )
    return runs


def markdown_report(runs, args, prov: dict) -> str:
    """The tables, verdicts and provenance as markdown."""
    main_key = (SETTINGS[0][0], args.main_lr)
    main_sentence = verdict_sentence(summarize_all(runs[main_key]))
    held = sum(all(v.holds for v in verdict(summarize_all(r)).values()) for r in runs.values())
    spreads = [family_spread(summarize_all(r), "pow2") for r in runs.values()]
    lines = [
        "# Gaussian experiment (paper Fig. 3): all six parametrizations",
        "",
        f"Minimise E[(Q(x) - x)^2] over {args.num_samples} samples of N(0, 1) (seed "
        f"{args.seed}) by plain gradient descent on the raw θ, {args.steps} steps, one "
        "learning rate for all; signed weight quantizers starting at 4 bits "
        "(`mq.init_weight_theta`). Code: `experiments/gaussian_mse.py`.",
        "",
        f"**Main result** (pow2 step, lr = {args.main_lr:g}; figure "
        f"`docs/gaussian_mse.png`): {main_sentence}",
        "",
        f"Over all {len(runs)} settings × learning rates, U3 and P3 both reached the lowest "
        f"final MSE of their family without oscillation in {held} of {len(runs)}.",
        "",
        f"Within the pow2 family the final MSEs differ by at most {max(spreads):.2%} in any run"
        + (", so the pow2 ranking rests on tiny differences." if max(spreads) < 0.01 else "."),
        "",
        "Measures: " + "; ".join(f"`{k}` = {v}" for k, v in MEASURES.items()) + ". "
        "`*` marks an oscillating curve. Lowest is judged within a family (uniform / pow2).",
        "",
    ]
    for (label, lr), results in runs.items():
        summaries = summarize_all(results)
        lines += [
            f"## {label}, lr = {lr:g}",
            "",
            format_table(summaries, markdown=True),
            "",
            verdict_sentence(summaries),
            "",
        ]
    lines += ["## Provenance", ""]
    lines += [f"- {k}: `{v}`" for k, v in prov.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    command = "python " + shlex.join(sys.argv if argv is None else [__file__, *argv])
    start = time.perf_counter()
    runs = run_all(args)
    main_key = (SETTINGS[0][0], args.main_lr)
    args.fig_dir.mkdir(parents=True, exist_ok=True)
    plot_curves(
        runs[main_key],
        args.fig_dir / "gaussian_mse.png",
        title=f"Gaussian data, pow2 step, lr={args.main_lr:g}: E[(Q(x) - x)^2] (paper Fig. 3)",
    )
    plot_grid(runs, args.fig_dir / "gaussian_mse_all.png")
    wall = time.perf_counter() - start
    prov = provenance(command, wall_time_s=wall, seed=args.seed)

    result = {
        "experiment": "gaussian_mse (Uhlich et al. 2020, Fig. 3)",
        "provenance": prov,
        "config": {
            "steps": args.steps,
            "num_samples": args.num_samples,
            "seed": args.seed,
            "learning_rates": args.lrs,
            "main_learning_rate": args.main_lr,
            "initial_bits": DEFAULT_BITS,
            "settings": {label: {"pow2_step": p} for label, p in SETTINGS},
        },
        "measures": MEASURES,
        "runs": [
            {
                "setting": label,
                "pow2_step": dict(SETTINGS)[label],
                "learning_rate": lr,
                "verdict": verdict_sentence(summarize_all(results)),
                "cases": {key: record(t) for key, t in results.items()},
            }
            for (label, lr), results in runs.items()
        ],
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    json_path = args.out_dir / "gaussian_mse.json"
    json_path.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    md_path = args.out_dir / "gaussian_mse.md"
    md_path.write_text(markdown_report(runs, args, prov))

    print(format_table(summarize_all(runs[main_key])))
    print(verdict_sentence(summarize_all(runs[main_key])))
    print(f"wrote {json_path}, {md_path}, {args.fig_dir}/gaussian_mse*.png in {wall:.1f} s")


if __name__ == "__main__":
    main()
