"""`sparsecc prune MODEL.pt2 --calibration FILE -o PRUNED.pt2`: the same program with pruned weights, and a report
of what each layer lost. The input file is not changed."""

from __future__ import annotations

import argparse
import logging
import warnings
from typing import Any

from sparsecc.commands.common import add_options_argument, load_program, parse_options, print_json

log = logging.getLogger(__name__)


def add_prune_arguments(parser: argparse.ArgumentParser) -> None:
    """The `prune` option's keys as flags (shared with `sparsecc analyze --prunable`)."""
    parser.add_argument("--calibration", metavar="FILE.safetensors",
                        help="calibration batches: one tensor per input (keyed by input name or input_<i>), "
                             "example-sized batches stacked along dimension 0; default: the program's example inputs")
    parser.add_argument("--method", choices=("magnitude", "wanda", "sparsegpt"), default="sparsegpt")
    parser.add_argument("--pattern", default="unstructured", help="'unstructured' (default), 'N:M' such as 2:4, or "
                                                                  "'RxC' blocks such as 16x1")
    parser.add_argument("--metric", choices=("relative_l2", "cosine"), default="relative_l2",
                        help="how --max-error measures the model's outputs")
    parser.add_argument("--allocation", choices=("sensitivity", "uniform"), default="sensitivity")
    parser.add_argument("--include", action="append", metavar="GLOB", help="prune only weights matching (repeatable)")


def prune_option(args: argparse.Namespace, **budget: Any) -> dict[str, Any]:
    option = {"method": args.method, "pattern": args.pattern, "metric": args.metric, "allocation": args.allocation,
              "calibration": args.calibration, **{k: v for k, v in budget.items() if v is not None}}
    if args.include:
        option["include"] = args.include
    return option


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("program", metavar="MODEL.pt2", help="a program saved with torch.export.save")
    parser.add_argument("-o", "--output", required=True, metavar="PRUNED.pt2", help="the pruned program to write")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--max-error", type=float, metavar="E", help="largest model error on the calibration set")
    budget.add_argument("--target-sparsity", type=float, metavar="S", help="fraction of the weights to zero")
    add_prune_arguments(parser)
    parser.add_argument("--plot", metavar="FILE.png", help="draw the sensitivity curves and the model's error curve")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    add_options_argument(parser)


def pruned_state(program: Any, option: dict[str, Any], extra: dict[str, Any]) -> Any:
    from sparsecc.artifact.exporter import compile_program, user_inputs
    from sparsecc.settings import Settings

    settings = Settings.from_options({**extra, "prune": option, "stop_after": "prune", "on_failure": "raise"})
    return compile_program(program, user_inputs(program, None), settings)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from sparsecc.errors import SparseccError

    if args.max_error is None and args.target_sparsity is None and ":" not in args.pattern:
        raise SparseccError("give a budget: --max-error E or --target-sparsity S (an N:M pattern needs none)")
    program = load_program(args.program)
    option = prune_option(args, max_error=args.max_error, target_sparsity=args.target_sparsity, inplace=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = pruned_state(program, option, parse_options(args.option))  # writes into `program`'s weights
    kept = [str(w.message) for w in caught if "inplace=True cannot write" in str(w.message)]
    for message in kept:
        log.warning("%s", message)
    report = state.pruning
    torch.export.save(program, args.output)
    log.info("prune: wrote %s", args.output)
    if args.json:
        print_json(dataclasses.asdict(report))
    else:
        print(report.table())
    if args.plot:
        from sparsecc.commands.plot import plot_pruning

        plot_pruning(report, args.plot)
    return 0
