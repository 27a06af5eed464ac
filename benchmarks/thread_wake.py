"""What waking idle threads costs on this machine: a PyTorch Linear (128 x 768 x 768, fp32) timed back to back, and
right after the process slept or spun for a while, on 2 threads and on 1. Medians of 200 calls, ms. Explains why
benchmarks that interleave candidates one call at a time charge each call for the threads that slept meanwhile
(see --burst in benchmarks/linear_kernels.py).

    GOMP_SPINCOUNT=1000 python benchmarks/thread_wake.py
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from sparsecc.measure.clock import median_seconds


def median_ms(fn: Callable[[], object], before: Callable[[], object] | None = None, calls: int = 200) -> float:
    return median_seconds(fn, calls, warmup=0, before=before) * 1e3


def spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def main() -> None:
    x, layer = torch.randn(128, 768), torch.nn.Linear(768, 768)
    print(f"{'threads':<9}{'back to back':>14}{'after 4 ms sleep':>18}{'after 0.5 ms sleep':>20}{'after 4 ms spin':>17}")
    with torch.no_grad():
        for threads in (torch.get_num_threads(), 1):
            torch.set_num_threads(threads)
            run = lambda: layer(x)  # noqa: E731
            print(f"{threads:<9}{median_ms(run):>14.3f}{median_ms(run, lambda: time.sleep(0.004)):>18.3f}"
                  f"{median_ms(run, lambda: time.sleep(0.0005)):>20.3f}{median_ms(run, lambda: spin(0.004)):>17.3f}")


if __name__ == "__main__":
    main()
