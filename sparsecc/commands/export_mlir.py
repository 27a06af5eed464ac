"""`sparsecc export-mlir MODEL.pt2 -o model.mlir`: linalg-on-tensors MLIR whose sparse weights carry the
sparse_tensor encoding of the format sparsecc chose, for MLIR- or IREE-based pipelines."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from sparsecc.commands.common import add_options_argument, load_program, parse_options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("program", metavar="MODEL.pt2", help="a program saved with torch.export.save")
    parser.add_argument("-o", "--output", required=True, metavar="FILE.mlir", help="where to write the MLIR")
    add_options_argument(parser)


def run(args: argparse.Namespace) -> int:
    from sparsecc.artifact import plan_program
    from sparsecc.mlir_export import export_mlir

    program = load_program(args.program)
    text = export_mlir(program, plan_program(program, parse_options(args.option)))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written whole or not at all, like artifacts.
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, out)
    print(out)
    return 0
