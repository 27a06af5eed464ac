"""`sparsecc analyze --plot`: density and predicted gain per layer, for people reading a plan."""

from __future__ import annotations

from typing import Any

from sparsecc.errors import SparseccError


def plot_plan(rows: list[dict[str, Any]], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; no display on build machines
        import matplotlib.pyplot as plt
    except ImportError:
        raise SparseccError("--plot needs matplotlib: pip install 'sparsecc[plot]'") from None
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
