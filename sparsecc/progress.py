"""Progress of long work (tuning, calibration): a tqdm bar on a terminal, INFO logs otherwise."""

from __future__ import annotations

import logging
from typing import Callable

log = logging.getLogger("sparsecc")


def progress_bar(total: int, desc: str, unit: str) -> tuple[Callable[[int, str], None], Callable[[], None]]:
    """(update(n, note), close) for `total` steps."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        bar = tqdm(total=total, desc=desc, unit=unit, disable=None, leave=False)

        def update(n: int, note: str) -> None:
            bar.update(n)
            bar.set_postfix_str(note, refresh=False)

        return update, bar.close
    done = [0]

    def update(n: int, note: str) -> None:
        done[0] += n
        log.info("%s: %d/%d %ss (%s)", desc, done[0], total, unit, note)

    return update, lambda: None
