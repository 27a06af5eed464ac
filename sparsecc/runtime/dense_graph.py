"""Graphs where nothing went sparse run where dense work runs fastest: eager PyTorch or Inductor.

sparsecc must never be slower than dense. A graph with no TVM region would otherwise run its ATen ops one by
one through the FX interpreter, which on BERT-base is about 5 % slower than Inductor. With `dense_backend="auto"`
both are timed on the example inputs and the faster is kept; the choice is logged.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Callable, Sequence

from torch import fx

from sparsecc.measure.clock import median_seconds

log = logging.getLogger(__name__)

WARMUP, RUNS = 2, 5


def _median_ms(fn: Callable[[], Any]) -> float:
    return median_seconds(fn, RUNS, WARMUP) * 1e3


def fastest_dense(source: fx.GraphModule, args: Sequence[Any], eager: Callable[[Sequence[Any]], Any],
                  mode: str) -> tuple[str, Callable[[Sequence[Any]], Any]]:
    """("eager" | "inductor", callable over the full argument list) for a graph with no sparse region."""
    if mode == "eager":
        return "eager", eager
    try:
        from torch._inductor.compile_fx import compile_fx

        compiled = compile_fx(copy.deepcopy(source), list(args))
    except Exception as exc:  # Inductor is an optimisation here: any failure leaves the eager graph
        log.warning("sparsecc: Inductor could not compile a dense graph (%s: %s); it runs in eager PyTorch",
                    type(exc).__name__, exc)
        return "eager", eager

    def inductor(a: Sequence[Any]) -> Any:
        return compiled(*a)

    if mode == "inductor":
        return "inductor", inductor
    eager_ms, inductor_ms = _median_ms(lambda: eager(args)), _median_ms(lambda: inductor(args))
    choice = ("inductor", inductor) if inductor_ms < eager_ms else ("eager", eager)
    log.info("sparsecc: dense graph: eager %.2f ms, Inductor %.2f ms; using %s", eager_ms, inductor_ms, choice[0])
    return choice
