"""The direct sparse convolution kernel alone (codegen/kernels/cpu/direct_conv.py, plus the padding and phase split
ahead of it) against PyTorch's dense convolution on the same geometry, batch 1, fp32: its knobs swept by hand (rows
per task, input-channel chunk, output-channel group), and the density where it stops paying (break-even), both
built and checked against F.conv2d as the planner does (sparsecc/planning/conv_timing.py). Median microseconds.

    python benchmarks/direct_conv.py                                   # defaults and dense, 90 % zeros
    python benchmarks/direct_conv.py --sweep --shapes 256x56          # every knob combination
    python benchmarks/direct_conv.py --densities 0.1 0.2 0.3 0.4      # break-even against dense
"""

from __future__ import annotations

import argparse
import itertools
import logging

import torch

import sparsecc.codegen.targets  # noqa: F401  (sizes TVM's pool before anything else starts it)
from sparsecc.codegen.targets import host_target
from sparsecc.conv_work import ConvKnobs
from sparsecc.passes.direct_conv import ConvGeometry, phase_weight
from sparsecc.planning.conv_timing import DirectConvTimer, dense_conv_seconds
from sparsecc.sparsify import magnitude_prune_


def geometry(channels: int, side: int, kernel: int = 3) -> ConvGeometry:
    return ConvGeometry(1, channels, (side, side), channels, (kernel, kernel), (1, 1), (kernel // 2,) * 2, (1, 1),
                        (side, side), "float32")


def pruned_weight(geo: ConvGeometry, density: float) -> torch.Tensor:
    w = torch.randn(geo.out_channels, geo.channels, *geo.kernel, generator=torch.Generator().manual_seed(0))
    magnitude_prune_(w.view(geo.out_channels, -1), 1 - density)
    return w


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["256x56", "256x28", "256x14", "64x56", "512x7"],
                        help="CHANNELSxSIDE, 3x3 C->C convolutions")
    parser.add_argument("--densities", type=float, nargs="+", default=[0.1])
    parser.add_argument("--sweep", action="store_true", help="every combination of --rows, --chunks, --groups")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--chunks", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--groups", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    timer = DirectConvTimer(host_target(torch.get_num_threads()))
    print(f"target {host_target(torch.get_num_threads())}, {torch.get_num_threads()} threads, median us")
    for shape in args.shapes:
        channels, side = (int(v) for v in shape.split("x"))
        geo = geometry(channels, side)
        dense = dense_conv_seconds(geo, args.runs)
        print(f"\n3x3 {channels}->{channels} @{side}: dense {dense * 1e6:.0f} us "
              f"({2 * geo.macs / dense / 1e9:.0f} GFLOP/s)")
        knob_sets = [ConvKnobs(r, c, g) for r, c, g in itertools.product(args.rows, args.chunks, args.groups)] \
            if args.sweep else [ConvKnobs()]
        for density in args.densities:
            w = pruned_weight(geo, density)
            matrix = phase_weight(w, geo)
            rows = sorted((timer.seconds(w, matrix, geo, k, args.runs), k) for k in knob_sets)
            for seconds, knobs in rows[:8]:
                print(f"  density {density:.2f}  {knobs}  {seconds * 1e6:8.0f} us  {dense / seconds:5.2f}x dense")


if __name__ == "__main__":
    main()
