"""sparsecc's sparse kernel alone (no torch.compile, no model): each (shape, tokens, block, density) built with
the default knobs, checked against the eager reference and timed as the tuner times it (right after a PyTorch
matmul), next to PyTorch's dense F.linear. Median of 3 timings, microseconds.

    python benchmarks/kernel_alone.py
    python benchmarks/kernel_alone.py --shapes 3072x768 --tokens 128 --densities 0.25 0.5 0.75 --blocks 1x1 8x8
    python benchmarks/kernel_alone.py --shapes 3072x768 --tokens 128 --activation gelu   # with a fused epilogue
    python benchmarks/kernel_alone.py --tokens 128 --densities 0.1 --skewed   # rows thinning out from 2x to 0
"""

from __future__ import annotations

import argparse
import logging
import statistics

import torch

import sparsecc.codegen.targets  # noqa: F401  (sizes TVM's pool before anything else starts it)
from sparsecc.codegen.tuning.runners import KernelTimer
from sparsecc.measure.dense import dense_linear_seconds
from sparsecc.planning.calibration import random_blocked
from sparsecc.kernel_work import ACTIVATIONS
from sparsecc.codegen.targets import host_target
from sparsecc.planning.plan_quality import Layer, make_weight


def pair(text: str) -> tuple[int, int]:
    a, b = text.split("x")
    return int(a), int(b)


def skewed(n: int, k: int, density: float) -> torch.Tensor:
    return make_weight(Layer(n, k, 1, 1.0 - density, "skewed"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", type=pair, default=[(3072, 768), (768, 3072), (768, 768)],
                        help="out x in")
    parser.add_argument("--tokens", nargs="+", type=int, default=[16, 128, 512])
    parser.add_argument("--densities", nargs="+", type=float, default=[0.02, 0.1],
                        help="fraction of blocks kept")
    parser.add_argument("--blocks", nargs="+", type=pair, default=[(1, 1)], help="r x c; 1x1 is CSR")
    parser.add_argument("--activation", default="none", choices=ACTIVATIONS, help="fused epilogue")
    parser.add_argument("--skewed", action="store_true",
                        help="row density falling linearly from 2x the density to 0 (1x1 blocks) instead of uniform")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    threads = torch.get_num_threads()
    timer = KernelTimer(host_target(threads), threads)
    if args.skewed and args.blocks != [(1, 1)]:
        parser.error("--skewed makes unstructured weights: leave --blocks at 1x1")
    print(f"{threads} threads; activation {args.activation}; {'skewed' if args.skewed else 'uniform'} rows; "
          "median of 3 timings, us")
    print(f"{'weight':<11}{'tokens':>7}{'block':>7}{'density':>9}{'kernel':>10}{'dense':>10}{'vs dense':>10}")
    try:
        for n, k in args.shapes:
            for tokens in args.tokens:
                dense = dense_linear_seconds(n, k, tokens) * 1e6
                for block in args.blocks:
                    for density in args.densities:
                        weight = skewed(n, k, density) if args.skewed else random_blocked(n, k, block, density)
                        us = statistics.median(timer.seconds(weight, tokens, block, args.activation)[0] for _ in range(3)) * 1e6
                        shape, shape_b = f"{n}x{k}", f"{block[0]}x{block[1]}"
                        print(f"{shape:<11}{tokens:>7}{shape_b:>7}{density:>9.0%}{us:>10.0f}{dense:>10.0f}"
                              f"{dense / us:>9.2f}x", flush=True)
    finally:
        timer.close()


if __name__ == "__main__":
    main()
