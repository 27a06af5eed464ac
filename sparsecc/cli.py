"""`sparsecc` command line. With no command it runs the demo (the main job).

Exit status: 0 on success; 1 with a one-line reason on stderr when sparsecc cannot do what was asked; 2 for a
usage error. Logs and progress go to stderr, data to stdout.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# PyTorch's OpenMP threads spin after each op on the cores TVM's kernels need next (README, Performance).
# libgomp reads this when torch loads, so commands that time things restart themselves with it unless the user
# chose a setting.
OMP_TUNING = {"GOMP_SPINCOUNT": "1000"}
OMP_VARIABLES = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")
TIMED_COMMANDS = ("demo", "bench")

# name -> (module, help)
COMMANDS = {
    "demo": ("sparsecc.demo", "compile a pruned BERT-style encoder and time it (default)"),
    "analyze": ("sparsecc.commands.analyze", "per-weight density, structure, chosen format and predicted gain"),
    "build": ("sparsecc.commands.build", "compile a torch.export program (.pt2) into an artifact directory"),
    "inspect": ("sparsecc.commands.inspect_artifact", "what an artifact holds and what it was built for"),
    "prune": ("sparsecc.commands.prune", "prune a .pt2's dense weights within an error or sparsity budget"),
    "tune": ("sparsecc.commands.tune", "tune the sparse kernels of a .pt2 into the tuning database"),
    "bench": ("sparsecc.commands.bench", "latency of an artifact against eager dense PyTorch"),
    "export-mlir": ("sparsecc.commands.export_mlir", "linalg MLIR with sparse_tensor encodings on sparse weights"),
}


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="sparsecc", description="sparsecc: a PyTorch compiler for sparse models")
    logs = argparse.ArgumentParser(add_help=False)
    logs.add_argument("-v", "--verbose", action="store_true", help="debug logs")
    logs.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    commands = top.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text, parents=[logs])
        importlib.import_module(module).add_arguments(sub)
    return top


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a in COMMANDS or a in ("-h", "--help") for a in argv):
        argv = ["demo", *argv]
    args = parser().parse_args(argv)
    if args.command in TIMED_COMMANDS and not any(v in os.environ for v in OMP_VARIABLES):
        os.execve(sys.executable, [sys.executable, "-m", "sparsecc", *argv], {**os.environ, **OMP_TUNING})
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    if args.command == "demo" and not args.verbose:
        level = logging.WARNING  # the demo prints its own report
    logging.basicConfig(level=level, format="%(levelname)s: %(message)s", stream=sys.stderr)
    from sparsecc.errors import SparseccError

    try:
        return importlib.import_module(COMMANDS[args.command][0]).run(args)
    except SparseccError as exc:
        print(f"sparsecc {args.command}: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"sparsecc {args.command}: interrupted", file=sys.stderr)
        return 130
