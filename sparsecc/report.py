"""Human-readable reports of what sparsecc found and chose."""

from __future__ import annotations

from sparsecc.formats import SparsePlan


def plan_table(plan: SparsePlan) -> str:
    rows = [("weight", "shape as multiplied", "density", "N:M", "format", "reason")]
    for key, w in plan.weights.items():
        c = plan.choices[key]
        fmt = c.format.value + (f" {c.block[0]}x{c.block[1]}" if c.block else "")
        shape = "x".join(map(str, w.shape))
        if len(w.shape) > 2 and w.matrix:  # a convolution's weight, multiplied as (out, in * kh * kw)
            shape += f" as {'x'.join(map(str, w.matrix))}"
        rows.append((w.name, shape, f"{w.density:.3f}", w.nm_label() or "-", fmt, c.reason))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(cell.ljust(widths[i]) if i < 5 else cell for i, cell in enumerate(r)) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
