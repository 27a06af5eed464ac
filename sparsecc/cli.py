"""`sparsecc` command line. With no command it runs the demo (the main job)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

# PyTorch's OpenMP threads spin after each op on the cores TVM's kernels need next (README, Performance).
# libgomp reads this when torch loads, so the demo restarts itself with it unless the user chose a setting.
OMP_TUNING = {"GOMP_SPINCOUNT": "1000"}
OMP_VARIABLES = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")


def main(argv: list[str] | None = None) -> int:
    from sparsecc import demo

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="sparsecc", description="sparsecc: a PyTorch compiler for sparse models")
    commands = parser.add_subparsers(dest="command")
    demo_parser = commands.add_parser("demo", help="compile a pruned BERT-style encoder and time it (default)")
    demo.add_arguments(demo_parser)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["demo", *argv]
    args = parser.parse_args(argv)
    if not any(v in os.environ for v in OMP_VARIABLES):
        os.execve(sys.executable, [sys.executable, "-m", "sparsecc", *argv], {**os.environ, **OMP_TUNING})
    level = logging.INFO if getattr(args, "verbose", False) else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    return demo.run(args)
