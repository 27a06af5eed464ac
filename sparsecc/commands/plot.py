"""`sparsecc analyze --plot`: density and predicted gain per layer, for people reading a plan."""

from __future__ import annotations

from typing import Any

from sparsecc.errors import SparseccError


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; no display on build machines
        import matplotlib.pyplot as plt
    except ImportError:
        raise SparseccError("--plot needs matplotlib: pip install 'sparsecc[plot]'") from None
    return plt


def plot_plan(rows: list[dict[str, Any]], path: str) -> None:
    plt = _pyplot()
    names = [r["weight"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6.0, 0.3 * len(rows)), 6), sharex=True)
    colours = ["tab:gray" if r["format"] == "dense" else "tab:blue" for r in rows]
    top.bar(range(len(rows)), [r["density"] for r in rows], color=colours)
    top.set_ylabel("density (non-zeros)")
    top.set_title("grey: stays dense, blue: sparse")
    bottom.bar(range(len(rows)), [r["predicted_gain"] or 0.0 for r in rows], color=colours)
    bottom.axhline(1.0, color="black", linewidth=0.8)
    bottom.set_ylabel("predicted speed-up vs dense")
    bottom.set_xticks(range(len(rows)), names, rotation=90, fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_pruning(report: Any, path: str) -> None:
    """Left: each layer's output error against its sparsity (the sensitivity curves). Right: the model's measured
    error against the pruned layers' sparsity for each allocation measured, with their predicted time."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    for name, levels, errors in report.curves:
        left.plot(levels[1:], errors[1:], linewidth=0.8, label=name)
    left.set_yscale("log")
    left.set_xlabel("sparsity of the layer")
    left.set_ylabel("relative output error of the layer")
    left.set_title(f"{report.method}, {report.pattern}")
    if 0 < len(report.curves) <= 12:
        left.legend(fontsize=6)
    points = sorted(report.model_curve)
    right.plot([p[0] for p in points], [p[1] for p in points], "o-", color="tab:red")
    right.set_xlabel("sparsity of the pruned layers")
    right.set_ylabel(f"model error ({report.metric})", color="tab:red")
    timed = [p for p in points if p[2] is not None]
    if timed:
        twin = right.twinx()
        twin.plot([p[0] for p in timed], [p[2] * 1e3 for p in timed], "s--", color="tab:blue")
        twin.set_ylabel("predicted ms of the pruned layers", color="tab:blue")
    right.set_title(report.budget)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
