"""Where sparsecc keeps what it measured: the tuning database, the cost model's calibrations, the OpenMP launcher.

One directory: the `cache_dir` option, else $SPARSECC_CACHE_DIR, else $XDG_CACHE_HOME/sparsecc, else ~/.cache/sparsecc.
A compile resolves it once (`Settings.resolved`) and every stage uses that directory.

Everything in it can be measured or built again, so no fault of it stops a compile: a damaged entry (tuning.sqlite,
machines/*.json, openmp/*.so) is detected, discarded and rebuilt with a warning naming the file; where the directory
cannot be written (read-only, full), results are used but not stored, with one warning. Writers replace whole files
(a temporary file renamed into place) or go through sqlite's transactions, so a process killed mid-write, or several
compiling at once, leave nothing half-written. tests/test_cache_faults.py checks each case.
"""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir(option: str | os.PathLike | None = None) -> Path:
    """The cache directory: the option, else $SPARSECC_CACHE_DIR, else $XDG_CACHE_HOME/sparsecc, else
    ~/.cache/sparsecc."""
    if option is not None:
        return Path(option).expanduser()
    env = os.environ.get("SPARSECC_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "sparsecc"
