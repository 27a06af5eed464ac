"""Clocks: how sparsecc times anything.

- `median_seconds`: the median of repeated calls (after warm-up calls), optionally each right after another call
  (the PyTorch op a kernel follows inside a model).
- `Fastest`: the fastest time seen per key over rounds. Load from other processes only ever adds time, so the
  fastest of a few interleaved rounds compares candidates measured seconds apart fairly.
- `interleaved`: the candidates run A B C A B C ... after warm-up, min / median / max per candidate, for the demo,
  `sparsecc bench` and benchmarks/.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable, Hashable, Mapping


def median_seconds(fn: Callable[[], object], runs: int, warmup: int = 1,
                   before: Callable[[], object] | None = None) -> float:
    """Median seconds of `runs` calls of `fn` after `warmup` untimed ones; `before` runs untimed ahead of each."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(runs):
        if before is not None:
            before()
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


class Fastest(dict):
    """key -> the fastest time `keep` was given for it."""

    def keep(self, key: Hashable, seconds: float) -> float:
        self[key] = min(seconds, self.get(key, float("inf")))
        return self[key]

    def rounds(self, timers: Mapping[Hashable, Callable[[], float]], rounds: int) -> "Fastest":
        """`rounds` rounds over `timers` (each returns one timing), interleaved, keeping each key's fastest."""
        for _ in range(rounds):
            for key, timer in timers.items():
                self.keep(key, timer())
        return self


@dataclasses.dataclass(frozen=True)
class Timing:
    min_ms: float
    median_ms: float
    max_ms: float


def interleaved(candidates: Mapping[str, Callable[[], object]], repeats: int = 20,
                warmup: int = 3, burst: int = 1) -> dict[str, Timing]:
    """`burst` > 1: each turn makes one untimed call and then `burst` timed ones back to back, which measures a
    candidate with its threads already awake. With one call per turn, each call also pays for waking threads
    that slept while the previous candidate ran (on this project's VMs up to 1 ms after a few ms idle)."""
    if burst < 1:
        raise ValueError(f"burst must be at least 1, got {burst}")
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            if burst > 1:
                fn()
            for _ in range(burst):
                start = time.perf_counter()
                fn()
                samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: Timing(min(s), statistics.median(s), max(s)) for name, s in samples.items()}


def timing_table(results: Mapping[str, Timing], baseline: str) -> str:
    base = results[baseline].median_ms
    lines = [f"{'':<22}{'min ms':>10}{'median ms':>12}{'max ms':>10}  speed-up vs {baseline}"]
    for name, t in results.items():
        lines.append(f"{name:<22}{t.min_ms:>10.2f}{t.median_ms:>12.2f}{t.max_ms:>10.2f}  {base / t.median_ms:>6.2f}x")
    return "\n".join(lines)
