"""The prune stage's work: calibrate once, draw each layer's sensitivity curve from the statistics, spread the
budget, prune, and measure what it cost the model. The graph's constants are replaced by new pruned tensors
(passes/prune_weights.py); the tensors they came from, which may be the user's, are not written to."""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from typing import Any, Sequence

import torch
from torch import fx

from sparsecc.progress import progress_bar
from sparsecc.pruning.allocation import LEVELS, Curve, first_reaching, greedy_sequence, last_within, sparsity_of
from sparsecc.pruning.calibration_inputs import calibration_batches
from sparsecc.pruning.layers import Layer, Statistics, gather_statistics, outputs_with, prunable_layers
from sparsecc.pruning.methods import prune_matrix, relative_error
from sparsecc.pruning.model_error import model_error
from sparsecc.pruning.patterns import Pattern
from sparsecc.pruning.report import LayerPrune, PruneReport
from sparsecc.pruning.speed import speed_model
from sparsecc.settings import PruneSettings, Settings

log = logging.getLogger(__name__)

# Pruned matrices kept between the allocations a max_error search measures (most layers keep their level from
# one to the next, and the second-order method costs tens of ms a layer).
CACHE_BYTES = 512 << 20
# Where each layer is pruned alone to see what its error costs the model, and on how many calibration batches.
PROBE_LEVEL = 0.6
PROBE_BATCHES = 2
# With max_error, what removing all of a layer's elements is worth when it buys no speed, as a fraction of the
# layer's dense time.
SIZE_WEIGHT = 1e-3


class _Pruned:
    """Pruned (out, in) matrices by (layer, level), computed once while they fit in CACHE_BYTES."""

    def __init__(self, gm: fx.GraphModule, stats: Statistics, prune: PruneSettings, pattern: Pattern):
        self.gm, self.stats, self.prune, self.pattern = gm, stats, prune, pattern
        self.cache: collections.OrderedDict[tuple[str, float], torch.Tensor] = collections.OrderedDict()
        self.bytes = 0

    def dense(self, layer: Layer) -> torch.Tensor:
        return layer.matrix(self.gm).detach()

    def get(self, layer: Layer, level: float) -> torch.Tensor:
        key = (layer.attr, level)
        hit = self.cache.get(key)
        if hit is not None:
            self.cache.move_to_end(key)
            return hit
        matrix = prune_matrix(self.prune.method, self.dense(layer), self.stats.grams[layer.attr], level, self.pattern)
        self.cache[key] = matrix
        self.bytes += matrix.numel() * matrix.element_size()
        while self.bytes > CACHE_BYTES and len(self.cache) > 1:
            _, old = self.cache.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()
        return matrix


def prune_graph(gm: fx.GraphModule, inputs: Sequence[Any], names: Sequence[str],
                settings: Settings) -> tuple[dict[str, torch.Tensor], PruneReport]:
    """The pruned value of each pruned constant (attr -> tensor as stored) and the report. `gm` is left as it was."""
    start = time.perf_counter()
    prune = settings.prune
    pattern = Pattern.parse(prune.pattern)
    layers, skipped = prunable_layers(gm, settings, pattern)
    batches = calibration_batches(prune.calibration, inputs, names)
    if not layers:
        log.warning("sparsecc prune: no weight to prune (%s)",
                    "; ".join(f"{n}: {why}" for n, why in skipped.items()) or "no weight feeds a matrix product")
        return {}, PruneReport(prune.method, pattern.label, _budget(prune, pattern), prune.metric, 0.0, 0.0,
                               len(batches), time.perf_counter() - start, (), tuple(skipped.items()))
    stats = gather_statistics(gm, layers, batches)
    pruned = _Pruned(gm, stats, prune, pattern)
    speed = speed_model(settings, pattern)  # None with cost_model="break-even"
    levels = (0.0, pattern.fixed_sparsity) if pattern.fixed_sparsity is not None else LEVELS

    def evaluate(allocation: Sequence[float]) -> float:
        values = {layer.attr: layer.stored(pruned.get(layer, level))
                  for layer, level in zip(layers, allocation) if level}
        return model_error(outputs_with(gm, values, batches), stats.outputs, prune.metric)

    curves: list[Curve] = []
    model_curve: list[tuple[float, float, float | None]] = []
    if prune.allocation == "uniform":
        chosen = _uniform(prune, pattern, levels, len(layers), evaluate)
    else:
        # Speed steers only a max_error budget; target_sparsity counts elements.
        curves = _curves(layers, levels, pruned, speed if prune.max_error is not None else None, stats)
        curves = _scaled_to_the_model(curves, layers, pruned, gm, batches, stats)
        sequence = greedy_sequence(curves)
        if prune.max_error is not None:
            index, measured = last_within(len(sequence), lambda i: evaluate(_levels(curves, sequence[i])),
                                          prune.max_error)
            for i, error in sorted(measured.items()):
                model_curve.append((sparsity_of(curves, sequence[i]), error,
                                    _predicted(layers, _levels(curves, sequence[i]), speed)))
            allocation = sequence[index]
        else:  # target_sparsity, or an N:M pattern without a budget: every layer it fits
            allocation = first_reaching(curves, sequence, prune.target_sparsity or 1.0)
        chosen = _levels(curves, allocation)
    finished = _finish(layers, chosen, pruned, speed, evaluate)
    report = dataclasses.replace(
        finished.report, calibration_batches=len(batches), seconds=time.perf_counter() - start,
        skipped=tuple(skipped.items()), model_curve=tuple(model_curve) + finished.report.model_curve,
        curves=tuple((layer.name, c.levels, c.errors) for layer, c in zip(layers, curves)))
    log.info("%s", report.table())
    return finished.values, report


def _scaled_to_the_model(curves: list[Curve], layers: Sequence[Layer], pruned: _Pruned, gm: fx.GraphModule,
                         batches: Sequence[tuple], stats: Statistics) -> list[Curve]:
    """Each curve rescaled so that its error is in units of the model's output error. A layer's own relative error
    does not say what it costs the model: a feed-forward output dominated by a few large channels loses little of
    its energy yet moves the normalised residual stream a lot. So each layer is pruned alone once, at a probe
    level, and the model's squared relative error (errors of separate layers add roughly in energy) over the
    layer's own error at that level scales its whole curve."""
    probe_batches = batches[:PROBE_BATCHES]
    expected = stats.outputs[:PROBE_BATCHES]
    scaled = []
    update, close = progress_bar(len(layers), "sparsecc prune: probing the model", "layer")
    try:
        for layer, curve in zip(layers, curves):
            j = min(range(1, len(curve.levels)), key=lambda i: abs(curve.levels[i] - PROBE_LEVEL))
            alone = {layer.attr: layer.stored(pruned.get(layer, curve.levels[j]))}
            energy = model_error(outputs_with(gm, alone, probe_batches), expected, "relative_l2") ** 2
            factor = energy / curve.errors[j] if curve.errors[j] > 0 else 1.0
            scaled.append(dataclasses.replace(curve, errors=tuple(e * factor for e in curve.errors)))
            update(1, layer.name)
    finally:
        close()
    return scaled


def _uniform(prune: PruneSettings, pattern: Pattern, levels: Sequence[float], count: int, evaluate) -> list[float]:
    """Every layer at one level: the budget's (N:M: its own), or the highest candidate within max_error."""
    if prune.max_error is not None:
        index, _ = last_within(len(levels), lambda i: evaluate([levels[i]] * count), prune.max_error)
        return [levels[index]] * count
    return [pattern.fixed_sparsity or prune.target_sparsity] * count


def _levels(curves: Sequence[Curve], allocation: Sequence[int]) -> list[float]:
    return [c.levels[a] for c, a in zip(curves, allocation)]


def _curves(layers: Sequence[Layer], levels: Sequence[float], pruned: _Pruned, speed, stats: Statistics) -> list[Curve]:
    update, close = progress_bar(len(layers), "sparsecc prune: sensitivity", "layer")
    curves = []
    try:
        for layer in layers:
            dense = pruned.dense(layer)
            gram = stats.grams[layer.attr]
            errors = tuple(relative_error(dense, pruned.get(layer, level), gram) if level else 0.0 for level in levels)
            density = float(torch.count_nonzero(dense)) / layer.numel
            if speed is None:
                gains = tuple(level * layer.numel for level in levels)
            else:
                # Seconds saved, plus a little per element removed: speed decides, and a level that buys no speed
                # still ranks (after every one that does) by the size it saves.
                dense_seconds, _ = speed(layer, 1.0)
                per_element = SIZE_WEIGHT * dense_seconds / layer.numel
                base = min(speed(layer, density))
                gains = tuple(max(0.0, base - min(speed(layer, min(density, 1.0 - level))))
                              + per_element * level * layer.numel for level in levels)
            curves.append(Curve(tuple(levels), errors, gains, layer.numel))
            update(1, layer.name)
    finally:
        close()
    return curves


def _predicted(layers: Sequence[Layer], levels: Sequence[float], speed) -> float | None:
    if speed is None:
        return None
    return sum(min(speed(layer, 1.0 - level)) for layer, level in zip(layers, levels))


def _budget(prune: PruneSettings, pattern: Pattern) -> str:
    if prune.target_sparsity is not None:
        return f"target_sparsity={prune.target_sparsity:g}"
    if prune.max_error is not None:
        return f"max_error={prune.max_error:g} ({prune.metric})"
    return f"{pattern.label} on every layer it fits"


@dataclasses.dataclass(frozen=True)
class _Finished:
    values: dict[str, torch.Tensor]  # attr -> pruned tensor as stored
    report: PruneReport  # what the pruning itself knows; prune_graph adds the rest


def _finish(layers: Sequence[Layer], chosen: Sequence[float], pruned: _Pruned, speed, evaluate) -> _Finished:
    """Each layer at its chosen level, the report's rows, and the model error measured on the calibration batches."""
    prune, pattern = pruned.prune, pruned.pattern
    values: dict[str, torch.Tensor] = {}
    rows = []
    update, close = progress_bar(len(layers), "sparsecc prune: pruning", "layer")
    try:
        for layer, level in zip(layers, chosen):
            dense = pruned.dense(layer)
            before = float(torch.count_nonzero(dense)) / layer.numel
            matrix = pruned.get(layer, level) if level else dense
            after = float(torch.count_nonzero(matrix)) / layer.numel
            if level:
                values[layer.attr] = layer.stored(matrix)
            times = speed(layer, after) if speed is not None else (None, None)
            rows.append(LayerPrune(layer.name, layer.shape, round(before, 6), round(after, 6),
                                   relative_error(dense, matrix, pruned.stats.grams[layer.attr]), *times))
            update(1, layer.name)
    finally:
        close()
    error = evaluate(chosen)
    total = sum(layer.numel for layer in layers)
    sparsity = 1.0 - sum(r.density * layer.numel for r, layer in zip(rows, layers)) / total
    report = PruneReport(prune.method, pattern.label, _budget(prune, pattern), prune.metric, error, sparsity, 0, 0.0,
                         tuple(rows), model_curve=((sparsity, error, _predicted(layers, chosen, speed)),))
    return _Finished(values, report)
