"""ResNet-50 (transformers ResNetConfig() defaults, random weights, 224x224, fp32) with every convolution except
the stem magnitude-pruned, timed side by side in one run: eager PyTorch on NCHW and channels-last inputs,
Inductor (channels-last), sparsecc through torch.compile on both layouts, and DeepSparse / ONNX Runtime on the
same weights exported to ONNX (benchmarks/peers.py, their own virtual environment, run right after the others).
Every candidate's logits are checked against eager before it is timed.

    python benchmarks/resnet50.py --sparsity 0.9 0.8
    python benchmarks/resnet50.py --batch 16 --peers sparsecc-cl inductor
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

import sparsecc  # noqa: F401  (registers the backend)
import sparsecc.codegen.targets  # noqa: F401  (sizes TVM's pool before anything else starts it)
from sparsecc.measure.clock import interleaved, timing_table
from sparsecc.sparsify import magnitude_prune_

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/peers.py

IN_PROCESS = ("eager-cl", "inductor", "sparsecc", "sparsecc-cl")
ONNX_ENGINES = ("deepsparse", "onnxruntime")


def resnet50(sparsity: float) -> torch.nn.Module:
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    model = ResNetForImageClassification(ResNetConfig()).eval()
    stem = model.resnet.embedder.embedder.convolution
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d) and module is not stem and sparsity > 0:
                magnitude_prune_(module.weight.data.view(module.out_channels, -1), sparsity)
    return model


def measure(sparsity: float, batch: int, repeats: int, peers: list[str], workdir: Path) -> dict:
    model = resnet50(sparsity)
    x = torch.randn(batch, 3, 224, 224)
    x_cl = x.to(memory_format=torch.channels_last)
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    candidates = {"eager": lambda: model(x).logits}
    compile_s = {}
    with torch.no_grad():
        expected = model(x).logits
        for name in (p for p in peers if p in IN_PROCESS):
            start = time.perf_counter()
            inp = x_cl if name.endswith("-cl") or name == "inductor" else x
            if name == "eager-cl":
                fn = model_cl
            elif name == "inductor":
                fn = torch.compile(model_cl)
            else:
                fn = torch.compile(copy.deepcopy(model_cl if name.endswith("-cl") else model), backend="sparsecc")
            torch.testing.assert_close(fn(inp).logits, expected, rtol=1e-3, atol=1e-3)
            compile_s[name] = round(time.perf_counter() - start, 1)
            candidates[name] = lambda fn=fn, inp=inp: fn(inp).logits
        results = interleaved(candidates, repeats=repeats)
    engines = [p for p in peers if p in ONNX_ENGINES]
    if engines:
        from peers import time_onnx_engines

        results.update(time_onnx_engines(model, {"pixel_values": x}, expected, engines, repeats,
                                         workdir / f"resnet50_{sparsity}.onnx", compile_s))
    print(f"\nResNet-50, batch {batch}, convolutions {sparsity:.0%} zeros (compile s: {compile_s})")
    print(timing_table(results, baseline="eager"))
    return {k: v.median_ms for k, v in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.9])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--peers", nargs="+", default=[*IN_PROCESS, *ONNX_ENGINES],
                        choices=[*IN_PROCESS, *ONNX_ENGINES])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    warnings.simplefilter("ignore")
    print(f"threads {torch.get_num_threads()}, torch {torch.__version__}, median ms")
    with tempfile.TemporaryDirectory() as workdir:
        for sparsity in args.sparsity:
            measure(sparsity, args.batch, args.repeats, args.peers, Path(workdir))


if __name__ == "__main__":
    main()
