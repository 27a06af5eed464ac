"""PyTorch's dense work, timed as the cost model's calibration and the planner need it."""

from __future__ import annotations

import torch

from sparsecc.measure.clock import median_seconds

RUNS = 10


def dense_linear_seconds(n: int, k: int, tokens: int, dtype: torch.dtype = torch.float32, runs: int = RUNS) -> float:
    """Median seconds for F.linear(x, W, b) in PyTorch with W (n, k) on `tokens` rows."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, k, generator=g, dtype=dtype)
    w = torch.randn(n, k, generator=g, dtype=dtype)
    b = torch.randn(n, generator=g, dtype=dtype)
    with torch.no_grad():
        return median_seconds(lambda: torch.nn.functional.linear(x, w, b), runs)


def seconds_to_sum(size: int, runs: int = RUNS) -> float:
    """Seconds to read `size` bytes (a sum over them): the read bandwidth of a working set of that size."""
    t = torch.ones(size // 4)
    return median_seconds(lambda: t.sum(), runs)
