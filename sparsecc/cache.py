"""Where sparsecc keeps what it measured: the tuning database, the cost model's calibrations, the OpenMP launcher.

One directory: the `cache_dir` option, else $SPARSECC_CACHE_DIR, else $XDG_CACHE_HOME/sparsecc, else ~/.cache/sparsecc.
A compile resolves it once (`Settings.resolved`) and every stage uses that directory.
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
