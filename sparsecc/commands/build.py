"""`sparsecc build MODEL.pt2 -o DIR`: compile a torch.export program into an artifact directory."""

from __future__ import annotations

import argparse
import logging

from sparsecc.commands.common import add_options_argument, load_program, parse_options

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("program", metavar="MODEL.pt2", help="a program saved with torch.export.save")
    parser.add_argument("-o", "--output", required=True, metavar="DIR", help="artifact directory to write")
    parser.add_argument("--target", default="host",
                        help="'host' (default), 'aarch64', 'x86_64', or a JSON LLVM target "
                             '(\'{"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "neoverse-n1"}\')')
    parser.add_argument("--tune", type=int, default=None, metavar="N", help="tune each kernel with N trials")
    add_options_argument(parser)


def run(args: argparse.Namespace) -> int:
    from sparsecc.artifact import export

    options = {**parse_options(args.option), "target": args.target}
    if args.tune is not None:
        options["tune"] = {"trials": args.tune}
    program = load_program(args.program)
    path = export(program, None, args.output, source_file=args.program, **options)
    print(path)
    return 0
