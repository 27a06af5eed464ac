"""Human-readable reports of what sparsecc found and chose."""

from __future__ import annotations

from sparsecc.formats import SparsePlan


def plan_table(plan: SparsePlan) -> str:
    rows = [("weight", "shape as multiplied", "density", "format", "reason")]
    for key, w in plan.weights.items():
        c = plan.choices[key]
        rows.append((w.name, "x".join(map(str, w.shape)), f"{w.density:.3f}", c.format.value, c.reason))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(widths[i]) if i < 4 else cell for i, cell in enumerate(r)) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
