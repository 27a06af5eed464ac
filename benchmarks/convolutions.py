"""Convolutions at ResNet-50 shapes, batch 1, fp32, side by side: PyTorch's dense convolution (oneDNN) on NCHW
and on channels-last inputs, and sparsecc through torch.compile (the user's path) on the same two layouts. 1x1
convolutions run as sparse products (passes/pointwise_conv.py), k x k ones through the direct kernel
(passes/direct_conv.py); the plan measures both against dense and may keep a layer dense.

    python benchmarks/convolutions.py                      # 90 % zeros, unstructured
    python benchmarks/convolutions.py --sparsity 0.8 --repeats 40 --only 3x3
"""

from __future__ import annotations

import argparse
import logging
import warnings

import torch

import sparsecc.codegen.targets  # noqa: F401  (sizes TVM's pool before anything else starts it)
from sparsecc.measure.clock import interleaved
from sparsecc.sparsify import magnitude_prune_

# (in, out, pixels per side, kernel, stride): ResNet-50's bottleneck 1x1 convolutions (reduce, expand, a strided
# projection shortcut), its 3x3 ones (at each stage, and a strided one), and the 256->256 3x3 layers.
SHAPES = {
    "1x1 256->64 @56": (256, 64, 56, 1, 1),
    "1x1 64->256 @56": (64, 256, 56, 1, 1),
    "1x1 512->128 @28": (512, 128, 28, 1, 1),
    "1x1 1024->2048 @14/2": (1024, 2048, 14, 1, 2),
    "3x3 64->64 @56": (64, 64, 56, 3, 1),
    "3x3 128->128 @28": (128, 128, 28, 3, 1),
    "3x3 256->256 @14": (256, 256, 14, 3, 1),
    "3x3 512->512 @7": (512, 512, 7, 3, 1),
    "3x3 128->128 @56/2": (128, 128, 56, 3, 2),
    "3x3 256->256 @56": (256, 256, 56, 3, 1),
    "3x3 256->256 @28": (256, 256, 28, 3, 1),
}


def measure(c_in: int, c_out: int, side: int, kernel: int, stride: int, sparsity: float,
            repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2).eval()
    with torch.no_grad():
        magnitude_prune_(conv.weight.data.view(c_out, -1), sparsity)
    x = torch.randn(1, c_in, side, side)
    x_cl = x.to(memory_format=torch.channels_last)
    options = {"on_failure": "raise", "min_weight_numel": 1}
    nchw, cl = (torch.compile(conv, backend="sparsecc", options=options, dynamic=False) for _ in range(2))
    with torch.no_grad():
        expected = conv(x)
        for compiled, inp in ((nchw, x), (cl, x_cl)):
            torch.testing.assert_close(compiled(inp), expected, rtol=1e-4, atol=1e-4)
        results = interleaved({
            "dense NCHW": lambda: conv(x),
            "dense channels-last": lambda: conv(x_cl),
            "sparsecc NCHW": lambda: nchw(x),
            "sparsecc channels-last": lambda: cl(x_cl),
        }, repeats=repeats)
    torch._dynamo.reset()
    return {k: v.median_ms for k, v in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--only", default="", help="run the layers whose name contains this")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    warnings.simplefilter("ignore")
    print(f"convolutions, batch 1, {args.sparsity:.0%} zeros, {torch.get_num_threads()} threads, median ms")
    header = None
    for name, shape in SHAPES.items():
        if args.only not in name:
            continue
        try:
            row = measure(*shape, args.sparsity, args.repeats)
        except Exception as exc:  # noqa: BLE001  (a known dynamo guard failure, issue 22's notes: report, go on)
            torch._dynamo.reset()
            print(f"{name:<22}failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
            continue
        if header is None:
            header = list(row)
            print(f"{'layer':<22}" + "".join(f"{h:>24}" for h in header) + "   best sparsecc vs best dense")
        best_dense = min(row["dense NCHW"], row["dense channels-last"])
        best_ours = min(row["sparsecc NCHW"], row["sparsecc channels-last"])
        print(f"{name:<22}" + "".join(f"{row[h]:>24.3f}" for h in header) + f"   {best_dense / best_ours:.2f}x")


if __name__ == "__main__":
    main()
