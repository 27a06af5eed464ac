"""1x1 convolutions at ResNet-50 shapes, batch 1, fp32, side by side: PyTorch's dense convolution (oneDNN) on NCHW
and on channels-last inputs, and sparsecc through torch.compile (the user's path) on the same two layouts.

    python benchmarks/pointwise_conv.py                      # 90 % zeros, unstructured
    python benchmarks/pointwise_conv.py --sparsity 0.8 --repeats 40
"""

from __future__ import annotations

import argparse
import logging
import warnings

import torch

import sparsecc.codegen.targets  # noqa: F401  (sizes TVM's pool before anything else starts it)
from sparsecc.measure.clock import interleaved
from sparsecc.sparsify import magnitude_prune_

# (in, out, pixels per side, stride): ResNet-50's bottleneck 1x1 convolutions (reduce, expand, and a strided
# projection shortcut).
SHAPES = {
    "256->64 @56": (256, 64, 56, 1),
    "64->256 @56": (64, 256, 56, 1),
    "512->128 @28": (512, 128, 28, 1),
    "1024->2048 @14/2": (1024, 2048, 14, 2),
}


def measure(c_in: int, c_out: int, side: int, stride: int, sparsity: float, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(c_in, c_out, 1, stride=stride).eval()
    with torch.no_grad():
        magnitude_prune_(conv.weight.data.view(c_out, c_in), sparsity)
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
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    warnings.simplefilter("ignore")
    print(f"1x1 convolutions, batch 1, {args.sparsity:.0%} zeros, {torch.get_num_threads()} threads, median ms")
    header = None
    for name, shape in SHAPES.items():
        try:
            row = measure(*shape, args.sparsity, args.repeats)
        except Exception as exc:  # noqa: BLE001  (a known dynamo guard failure, issue 22's notes: report, go on)
            torch._dynamo.reset()
            print(f"{name:<18}failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
            continue
        if header is None:
            header = list(row)
            print(f"{'layer':<18}" + "".join(f"{h:>24}" for h in header) + "   best sparsecc vs best dense")
        best_dense = min(row["dense NCHW"], row["dense channels-last"])
        best_ours = min(row["sparsecc NCHW"], row["sparsecc channels-last"])
        print(f"{name:<18}" + "".join(f"{row[h]:>24.3f}" for h in header) + f"   {best_dense / best_ours:.2f}x")


if __name__ == "__main__":
    main()
