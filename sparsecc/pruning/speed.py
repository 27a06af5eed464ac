"""What pruning a layer to a level buys in time, from the cost model's machine model (sparsecc/planning/): the
predicted seconds of dense PyTorch against sparsecc's kernel at that density. The plan still decides each layer's
format afterwards, from its own pricing; this only steers where a `max_error` budget is spent."""

from __future__ import annotations

import logging
from typing import Callable

from sparsecc.pruning.layers import Layer
from sparsecc.pruning.patterns import Pattern
from sparsecc.settings import Settings

log = logging.getLogger(__name__)

# (layer, density) -> (dense seconds, best sparse seconds)
SpeedModel = Callable[[Layer, float], tuple[float, float]]


def speed_model(settings: Settings, pattern: Pattern) -> SpeedModel | None:
    """None with cost_model="break-even" (which predicts nothing)."""
    if settings.cost_model == "break-even":
        return None
    from sparsecc.planning.calibration import machine_model
    from sparsecc.planning.cost_model import predict_dense, predict_sparse

    machine = machine_model(settings)
    block = (pattern.rows, pattern.cols) if pattern.kind == "block" and machine.has_block(
        (pattern.rows, pattern.cols)) else (1, 1)

    def seconds(layer: Layer, density: float) -> tuple[float, float]:
        n, k = layer.shape
        tokens = max(1, layer.tokens)
        dense = predict_dense(machine, n, k, tokens)
        stored = max(1, round(density * n * k / (block[0] * block[1])))
        sparse = predict_sparse(machine, n, k, tokens, block, stored)
        return dense, sparse if sparse is not None else float("inf")

    return seconds
