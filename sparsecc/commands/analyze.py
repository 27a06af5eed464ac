"""`sparsecc analyze MODEL.pt2`: what sparsecc would do with each weight, before anything is built."""

from __future__ import annotations

import argparse
from typing import Any

from sparsecc.commands.common import add_options_argument, load_program, parse_options, print_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("program", metavar="MODEL.pt2", help="a program saved with torch.export.save")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    parser.add_argument("--plot", metavar="FILE.png", help="also draw density and predicted gain per layer")
    add_options_argument(parser)


def rows(plan: Any) -> list[dict[str, Any]]:
    out = []
    for key, w in plan.weights.items():
        c = plan.choices[key]
        out.append({
            "weight": w.name, "shape": list(w.shape), "density": round(w.density, 6), "nm": w.nm_label(),
            "format": c.format.value, "block": list(c.block) if c.block else None,
            "predicted_gain": round(1.0 / c.est_cost, 3) if c.est_cost > 0 else None, "reason": c.reason,
            "predicted_us": dict(c.predictions),  # per candidate, with -O cost_model=calibrated
        })
    return out


def run(args: argparse.Namespace) -> int:
    from sparsecc.artifact import plan_program
    from sparsecc.report import plan_table

    plan = plan_program(load_program(args.program), parse_options(args.option))
    table = rows(plan)
    if args.json:
        print_json({"weights": table})
    else:
        print(plan_table(plan))
        sparse = [r for r in table if r["format"] != "dense"]
        print(f"\n{len(sparse)} of {len(table)} weights sparse")
    if args.plot:
        from sparsecc.commands.plot import plot_plan

        plot_plan(table, args.plot)
    return 0
