"""What the subcommands share: reading a .pt2, turning `--option k=v` into options, and JSON to stdout."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from sparsecc.errors import OptionError, SparseccError


def add_options_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--option", "-O", action="append", default=[], metavar="KEY=VALUE",
                        help="a sparsecc option, as for torch.compile(options=...); VALUE is read as JSON when it "
                             "parses (0.3, true, \"x\"), else as a string. Repeatable.")


def parse_options(pairs: list[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise OptionError(f"--option {pair!r} is not KEY=VALUE")
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    return options


def load_program(path: str) -> Any:
    import torch

    file = Path(path)
    if not file.is_file():
        raise SparseccError(f"{path}: no such file (expected a program saved with torch.export.save)")
    try:
        return torch.export.load(str(file))
    except Exception as exc:
        raise SparseccError(f"{path} is not a torch.export program that this torch {torch.__version__} can load: "
                            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
