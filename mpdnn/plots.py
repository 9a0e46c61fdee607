"""Figures of quantized networks. matplotlib is imported lazily, inside each function, so
importing this module loads nothing heavy (matplotlib is the optional ``train`` extra)."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

_COLORS = {"weight": "#3a6ea5", "activation": "#e07b39"}
FLOAT_BITS = 32.0


def save_figure(fig, path: str | Path, *, dpi: int) -> Path:
    """Write ``fig`` to ``path`` (creating its folder) and close it; returns the path."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _mode(quantizer: str) -> str:
    """``learned``, ``fixed``/``tqt`` or ``float`` from a row's quantizer description."""
    if quantizer == "float":
        return "float"
    return "fixed" if ("fixed" in quantizer or "tqt" in quantizer) else "learned"


def plot_bitwidths(report: Mapping[str, Any], path: str | Path, title: str | None = None) -> Path:
    """Per-layer weight and activation bits as bars, in forward order (paper Fig. 5 style).

    Args:
      report: :meth:`mpdnn.optim.MemoryReport.to_json` (or its JSON): ``layers`` rows with
        ``path``, ``kind``, ``tensor``, ``quantizer``, ``bits``, ``kb``; the totals
        ``weight_kb``, ``act_max_kb``, ``act_sum_kb`` go into the subtitle.
      path: where the PNG goes (parent folders are created).
      title: first title line; default the report's ``model``.

    Two panels: weights (one bar per layer: its kernel's bits; a bias with other bits is
    marked with a dot) and activations (one bar per site). Learned quantizers are solid bars,
    fixed ones hatched; float tensors are drawn to the top of the axis, hatched and labelled
    ``32``, so that 32-bit bars do not flatten the 2–8-bit ones.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows = list(report["layers"])
    kernels = [r for r in rows if r["kind"] == "weight" and r["tensor"] != "bias"]
    biases = {r["path"]: r for r in rows if r["kind"] == "weight" and r["tensor"] == "bias"}
    acts = [r for r in rows if r["kind"] == "activation"]
    quantized = [r["bits"] for r in rows if _mode(r["quantizer"]) != "float"]
    top = max([8.0, *quantized]) + 1.0

    n = max(len(kernels), len(acts), 1)
    fontsize = 8 if n <= 30 else 6 if n <= 60 else 4
    fig, axes = plt.subplots(2, 1, figsize=(max(8.0, 0.28 * n + 2.0), 7.5), squeeze=True)
    for ax, kind, items in ((axes[0], "weight", kernels), (axes[1], "activation", acts)):
        color = _COLORS[kind]
        for i, r in enumerate(items):
            mode = _mode(r["quantizer"])
            height = top if mode == "float" else r["bits"]
            ax.bar(
                i,
                height,
                width=0.75,
                color="#dddddd" if mode == "float" else color,
                alpha=0.6 if mode == "fixed" else 1.0,
                hatch="//" if mode != "learned" else None,
                edgecolor="black" if mode != "learned" else color,
                linewidth=0.5,
            )
            label = "32" if mode == "float" else f"{r['bits']:g}"
            y = top - 0.9 if mode == "float" else height + 0.1
            ax.text(i, y, label, ha="center", va="bottom", fontsize=fontsize)
            bias = biases.get(r["path"])
            if bias is not None and bias["bits"] != r["bits"]:
                bias_bits = top - 0.5 if _mode(bias["quantizer"]) == "float" else bias["bits"]
                ax.plot(i, bias_bits, "k.", markersize=4)
        ax.set_xticks(range(len(items)))
        ax.set_xticklabels([r["path"] for r in items], rotation=90, fontsize=fontsize)
        ax.set_xlim(-0.6, max(len(items), 1) - 0.4)
        ax.set_ylim(0, top)
        ax.set_ylabel("bits")
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        noun = "weights (kernel bits per layer)" if kind == "weight" else "activations"
        ax.set_title(noun, fontsize=10, loc="left")
        handles = [
            Patch(facecolor=color, edgecolor=color, label="learned"),
            Patch(facecolor=color, alpha=0.6, hatch="//", edgecolor="black", label="fixed"),
            Patch(facecolor="#dddddd", hatch="//", edgecolor="black", label="float (32 b)"),
        ]
        present = {_mode(r["quantizer"]) for r in items}
        handles = [h for h in handles if h.get_label().split(" ")[0] in present]
        if handles:
            ax.legend(
                handles=handles,
                fontsize=8,
                loc="lower right",
                bbox_to_anchor=(1.0, 1.0),
                ncol=len(handles),
                frameon=False,
            )

    subtitle = (
        f"weights {report['weight_kb']:.1f} KB, activations max {report['act_max_kb']:.1f} KB"
        f" / sum {report['act_sum_kb']:.1f} KB per sample (1 KB = 1024 B)"
    )
    width_chars = int(fig.get_figwidth() * 11)
    lines = [
        wrapped
        for line in f"{title or report.get('model', '')}\n{subtitle}".split("\n")
        for wrapped in textwrap.wrap(line, width_chars) or [""]
    ]
    fig.suptitle("\n".join(lines), fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, dpi=130)


def plot_diagnostics(
    evals: list[Mapping[str, Any]],
    path: str | Path,
    *,
    budgets: Mapping[str, float] | None = None,
    title: str | None = None,
) -> Path:
    """The budget search over training, one point per evaluation (``metrics.jsonl``'s
    ``eval`` records): sizes against their limits, the fraction of steps within every
    budget, bit changes per epoch, every tensor's bits, and the multipliers.

    These show at a glance a search that chatters (many bit changes, a low within-budget
    fraction), one that never meets a budget, and where the quantizers froze.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = dict(budgets or {})
    epochs = [r["epoch"] for r in evals]
    fig, axes = plt.subplots(2, 2, figsize=(11, 6.5), sharex=True)
    ax = axes[0][0]
    for size, color in (("weight_kb", "#3a6ea5"), ("act_max_kb", "#e07b39")):
        if size in budgets or size == "weight_kb":
            ax.plot(epochs, [r[size] for r in evals], color=color, label=size)
        if size in budgets:
            ax.axhline(budgets[size], color=color, linestyle="--", linewidth=0.8)
    ax.set_ylabel("KB (dashed: limits)")
    ax.legend(fontsize=8, frameon=False)
    ax = axes[0][1]
    if any("within_budget" in r for r in evals):
        ax.plot(epochs, [r.get("within_budget", float("nan")) for r in evals], color="#2a9d8f")
        ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("steps within every budget")
    ax = axes[1][0]
    ax.bar(epochs, [sum(r.get("bit_changes", {}).values()) for r in evals], width=0.6)
    ax.set_ylabel("bit changes (all tensors)")
    ax.set_xlabel("epoch")
    ax = axes[1][1]
    names = [n for n in (evals[0].get("bits", {}) if evals else {}) if evals]
    for name in names:
        values = [r["bits"][name] for r in evals]
        if max(values) < FLOAT_BITS:
            ax.plot(epochs, values, linewidth=0.8, alpha=0.8)
    ax.set_ylabel("bits per tensor")
    ax.set_xlabel("epoch")
    multipliers = [sum(r.get("multipliers") or [0.0]) for r in evals]
    if multipliers and max(multipliers) > min(multipliers):  # a Lagrangian's, not a fixed λ
        twin = ax.twinx()
        twin.plot(epochs, multipliers, color="k", linestyle=":")
        twin.set_ylabel("Σ multipliers (dotted)")
    frozen = next((r["frozen_step"] for r in evals if r.get("frozen_step") is not None), None)
    if frozen is not None and evals:
        per_epoch = evals[-1]["step"] / evals[-1]["epoch"]
        for row in axes:
            for a in row:
                a.axvline(frozen / per_epoch, color="grey", linewidth=0.8)
    fig.suptitle(
        (title or "budget search") + (" (grey: quantizers frozen)" if frozen is not None else ""),
        fontsize=10,
    )
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)
