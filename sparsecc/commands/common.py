"""What the subcommands share: reading a .pt2, turning `--option k=v` into options, and JSON to stdout."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
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
    for _ in range(MAX_STAND_INS):
        missing = []
        try:
            with _unregistered_types(missing):
                return torch.export.load(str(file))
        except Exception as exc:
            if not missing:
                raise SparseccError(f"{path} is not a torch.export program that this torch {torch.__version__} can "
                                    f"load: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                                    ) from None
            for name in missing:
                _register_stand_in(name)
    raise SparseccError(f"{path} uses more unknown container types than sparsecc stands in for")


# A program's inputs and outputs may be structured by the model's own classes (transformers' ModelOutput), which
# torch.export.load can only rebuild with that class registered, i.e. with the model's library imported. The
# commands need the structure's leaves only, so such a type is replaced by a dict standing in for it.
MAX_STAND_INS = 8
_UNREGISTERED = re.compile(r"Deserializing (\S+) in pytree is not registered")


@contextlib.contextmanager
def _unregistered_types(missing: list[str]):
    # torch.export.load logs the traceback of this failure as a warning before raising a generic error, so the
    # type's name is read from that log record, and the record is kept off the user's terminal.
    class Catch(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            text = record.getMessage() + (f" {record.exc_info[1]}" if record.exc_info else "")
            found = _UNREGISTERED.findall(text)
            missing.extend(found)
            return not found

    target = logging.getLogger("torch.export")
    catch = Catch()
    target.addFilter(catch)
    try:
        yield
    finally:
        target.removeFilter(catch)


def _register_stand_in(name: str) -> None:
    import torch.utils._pytree as pytree

    stand_in = type(name.rsplit(".", 1)[-1], (dict,), {"__module__": "sparsecc.stand_ins"})
    pytree.register_pytree_node(
        stand_in, lambda d: (list(d.values()), list(d.keys())),
        lambda values, keys: stand_in(zip(keys, values)), serialized_type_name=name)
    logging.getLogger(__name__).info("%s is not importable here; a dict stands in for it", name)


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
