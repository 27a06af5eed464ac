"""`sparsecc` command line. With no command it runs the demo (the main job)."""

from __future__ import annotations

import argparse
import logging
import sys


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
    level = logging.INFO if getattr(args, "verbose", False) else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    return demo.run(args)
