"""Spreading a pruning budget over the layers.

Each layer has a sensitivity curve: the relative error of its output (on the calibration inputs) at each
candidate level, and a gain per level: elements removed, or, where a machine model prices the kernels, the
predicted seconds saved (nothing below the density where the sparse kernel beats dense). Starting from nothing
pruned, the allocator repeatedly moves the one layer whose next move buys the most gain per unit of added error,
where a move may jump several levels at once (a layer gains no speed until it passes its break-even, so single
steps would never start it). The sequence of allocations it passes through is what the budget picks from: the
first to reach `target_sparsity`, or the last whose measured model error stays within `max_error`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

# Candidate levels of a layer (fractions of its weights that become zero).
LEVELS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
# Added to each error difference: a free move (no error) is still ranked by its gain.
ERROR_FLOOR = 1e-9


@dataclasses.dataclass(frozen=True)
class Curve:
    """One layer's candidate levels, with the relative output error and the gain of each (level 0 first)."""

    levels: tuple[float, ...]
    errors: tuple[float, ...]
    gains: tuple[float, ...]
    numel: int


def greedy_sequence(curves: Sequence[Curve]) -> list[tuple[int, ...]]:
    """Allocations (a level index per layer) from nothing pruned to as far as any move still gains, each one move
    past the one before."""
    state = [0] * len(curves)
    sequence = [tuple(state)]
    while True:
        best = None
        for i, curve in enumerate(curves):
            at = state[i]
            for j in range(at + 1, len(curve.levels)):
                gain = curve.gains[j] - curve.gains[at]
                if gain <= 0:
                    continue
                cost = max(curve.errors[j] - curve.errors[at], 0.0) + ERROR_FLOOR
                ratio = gain / cost
                if best is None or ratio > best[0]:
                    best = (ratio, i, j)
        if best is None:
            return sequence
        state[best[1]] = best[2]
        sequence.append(tuple(state))


def sparsity_of(curves: Sequence[Curve], allocation: Sequence[int]) -> float:
    """Fraction of all the layers' elements an allocation removes."""
    total = sum(c.numel for c in curves)
    removed = sum(c.levels[a] * c.numel for c, a in zip(curves, allocation))
    return removed / total if total else 0.0


def first_reaching(curves: Sequence[Curve], sequence: Sequence[tuple[int, ...]], target: float) -> tuple[int, ...]:
    for allocation in sequence:
        if sparsity_of(curves, allocation) >= target - 1e-9:
            return allocation
    return sequence[-1]


def uniform(curves: Sequence[Curve], level: float) -> tuple[int, ...]:
    """Every layer at the candidate level nearest `level` (N:M layers: pruned when `level` > 0)."""
    return tuple(min(range(len(c.levels)), key=lambda j: abs(c.levels[j] - level)) for c in curves)


def last_within(count: int, error_of: Callable[[int], float], budget: float) -> tuple[int, dict[int, float]]:
    """The largest index in [0, count) whose measured error is within `budget`, by bisection (errors grow along
    an allocation sequence, give or take noise), and every error measured on the way."""
    measured: dict[int, float] = {}

    def error(i: int) -> float:
        if i not in measured:
            measured[i] = error_of(i)
        return measured[i]

    low, high = 0, count - 1
    if error(high) <= budget:
        return high, measured
    while high - low > 1:
        middle = (low + high) // 2
        if error(middle) <= budget:
            low = middle
        else:
            high = middle
    return low, measured
