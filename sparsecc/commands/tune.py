"""`sparsecc tune MODEL.pt2 --trials N`: tune the sparse kernels of a program and store the results in the
tuning database, so later builds of it (on any machine sharing the cache) take the tuned kernels."""

from __future__ import annotations

import argparse

from sparsecc.commands.common import add_options_argument, load_program, parse_options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("program", metavar="MODEL.pt2", help="a program saved with torch.export.save")
    parser.add_argument("--trials", type=int, default=16, help="kernel variants measured per kernel (default 16)")
    parser.add_argument("--retune", action="store_true", help="measure again even where the database has results")
    parser.add_argument("--rpc-tracker", metavar="HOST:PORT", help="measure on the RPC servers of this tracker")
    parser.add_argument("--rpc-key", metavar="KEY", help="the key those servers registered under")
    parser.add_argument("--rpc-sessions", type=int, default=1, help="RPC servers measuring at once")
    parser.add_argument("--target", default="host", help="as for `sparsecc build`")
    add_options_argument(parser)


def run(args: argparse.Namespace) -> int:
    from sparsecc.artifact.exporter import compile_program, user_inputs
    from sparsecc.errors import OptionError
    from sparsecc.settings import Settings

    tune = {"trials": args.trials, "retune": args.retune}
    if args.rpc_tracker or args.rpc_key:
        if not (args.rpc_tracker and args.rpc_key):
            raise OptionError("--rpc-tracker and --rpc-key go together")
        tune["rpc"] = {"tracker": args.rpc_tracker, "key": args.rpc_key, "sessions": args.rpc_sessions}
    options = {**parse_options(args.option), "target": args.target, "tune": tune, "stop_after": "lower",
               "verify": False, "on_failure": "raise"}
    program = load_program(args.program)
    state = compile_program(program, user_inputs(program, None), Settings.from_options(options))
    report = state.tuning
    if report is None or not report.kernels:
        print("no sparse kernels to tune in this program")
        return 0
    print(report.table())
    print(f"\n{report.trials} measurements on {report.measured_on} in {report.seconds:.1f} s; database {report.database}")
    return 0
