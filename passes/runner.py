"""The graph-pass runner: passes edit the graph in place and return how many rewrites they made; the runner owns
the tail every pass would otherwise repeat (dead-code removal after a change, lint, recompile, a log line) and names
a failing pass together with the passes that ran before it (the PyTorch FX pass-infra convention)."""

from __future__ import annotations

import logging
from typing import Callable, Sequence

from torch import fx

from sparsecc.errors import SparseccError
from sparsecc.settings import Settings

log = logging.getLogger(__name__)

# (name, pass): the pass takes the graph and the settings and returns its rewrite count.
GraphPass = tuple[str, Callable[[fx.GraphModule, Settings], int]]


class PassError(SparseccError):
    """A graph pass failed; the message names it and the passes that ran before it."""


def run_passes(gm: fx.GraphModule, settings: Settings, passes: Sequence[GraphPass]) -> dict[str, int]:
    """Run `passes` in order over `gm`; returns each one's rewrite count."""
    done: dict[str, int] = {}
    for name, graph_pass in passes:
        try:
            count = graph_pass(gm, settings)
        except Exception as exc:
            after = f" (after {', '.join(done)})" if done else ""
            raise PassError(f"pass {name}{after} failed: {type(exc).__name__}: {exc}") from exc
        if count:
            gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
        log.info("%s: %d rewrites", name, count)
        done[name] = count
    return done
