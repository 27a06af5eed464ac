"""`sparsecc analyze MODEL.pt2`: what sparsecc would do with each weight, before anything is built."""

from __future__ import annotations

import argparse
from typing import Any

from sparsecc.commands.common import add_options_argument, load_program, parse_options, print_json
from sparsecc.commands.prune import add_prune_arguments, prune_option, pruned_state

# Levels `--prunable` prints a column for (the curves hold more; --json has them all).
SHOWN_LEVELS = (0.5, 0.6, 0.7, 0.8, 0.9)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("program", metavar="MODEL.pt2", help="a program saved with torch.export.save")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    parser.add_argument("--plot", metavar="FILE.png", help="also draw density and predicted gain per layer")
    parser.add_argument("--prunable", action="store_true",
                        help="instead: each weight's output error at each sparsity on the calibration inputs "
                             "(sensitivity curves; nothing is changed)")
    add_prune_arguments(parser)
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


def prunable(args: argparse.Namespace) -> int:
    # A budget is needed to run the stage; the curves do not depend on it, and the pruned copy is thrown away.
    option = prune_option(args, target_sparsity=None if ":" in args.pattern else 0.5)
    report = pruned_state(load_program(args.program), option, parse_options(args.option)).pruning
    curves = [{"weight": name, "levels": list(levels), "errors": [round(e, 6) for e in errors]}
              for name, levels, errors in report.curves]
    if args.json:
        print_json({"method": report.method, "pattern": report.pattern, "curves": curves,
                    "skipped": [list(s) for s in report.skipped]})
        return 0
    shown = [lv for lv in SHOWN_LEVELS if any(lv in c["levels"] for c in curves)] or sorted(
        {lv for c in curves for lv in c["levels"] if lv})
    header = ["weight"] + [f"{lv:.0%}" for lv in shown]
    rows = [[c["weight"]] + [f"{c['errors'][c['levels'].index(lv)]:.2e}" if lv in c["levels"] else "-"
                             for lv in shown] for c in curves]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print(f"relative output error of each layer at each sparsity ({report.method}, {report.pattern}, "
          f"{report.calibration_batches} calibration batches)")
    for r in [header, *rows]:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(r)).rstrip())
    for name, why in report.skipped:
        print(f"not prunable: {name} ({why})")
    return 0


def run(args: argparse.Namespace) -> int:
    from sparsecc.artifact import plan_program

    if args.prunable:
        return prunable(args)
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
