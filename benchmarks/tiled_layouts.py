"""Each kernel of a BERT-base encoder layer (128 tokens, Linears 90 % unstructured CSR) in the layouts it would have
without token-tiled hand-over (row-major in and out) and with it (codegen/tiled_layout.py: x, y, residual, q, k,
v tiled), built for this machine, checked against each other, and timed interleaved: every round each variant
makes one untimed call and `--burst` timed ones back to back (as inside a model, threads awake). Medians, us.

    python benchmarks/tiled_layouts.py --rounds 60
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import tvm

import sparsecc.codegen.targets  # noqa: F401  (sizes TVM's pool before anything else starts it)
from sparsecc.codegen.kernels.cpu.attention import attention_kernel, query_tile
from sparsecc.codegen.kernels.cpu.bsr import bsr_linear_kernel
from sparsecc.kernel_work import from_token_tiles, to_token_tiles, token_tiled_shape
from sparsecc.codegen.kernels.cpu.layer_norm import layer_norm_kernel
from sparsecc.codegen.targets import host_target
from sparsecc.packing import pack_blocks

TOKENS, WIDTH, FFN, HEADS = 128, 768, 3072, 12
TILE = 32


def linear_case(n: int, k: int, activation: str, residual: bool):
    w = torch.randn(n, k) * (torch.rand(n, k) < 0.1)
    packed = pack_blocks(w, (1, 1))
    x, bias, res = torch.randn(TOKENS, k), torch.randn(n), torch.randn(TOKENS, n)
    columns = str(packed[1].dtype).removeprefix("torch.")

    def variant(tiled: bool):
        kernel = bsr_linear_kernel(TOKENS, n, k, (1, 1), "float32", activation, residual, column_dtype=columns,
                                   x_tiled=tiled, y_tiled=tiled, residual_tiled=tiled and residual)
        r = (to_token_tiles(res, TILE) if tiled else res) if residual else torch.zeros(1, 1)
        out = torch.empty(token_tiled_shape(TOKENS, n, TILE) if tiled else (TOKENS, n))
        return kernel, [to_token_tiles(x, TILE) if tiled else x, *packed, bias, r], out

    name = f"csr {n}x{k}" + (f" {activation}" if activation != "none" else "") + (" +residual" if residual else "")
    return name, variant, (TOKENS, n)


def attention_case():
    q, k, v = (torch.randn(1, TOKENS, WIDTH) for _ in range(3))
    assert query_tile(TOKENS, "float32") == TILE

    def variant(tiled: bool):
        names = frozenset({"q", "k", "v", "out"} if tiled else ())
        kernel = attention_kernel(1, TOKENS, HEADS, WIDTH // HEADS, 0.125, "float32", names)
        out = torch.empty(token_tiled_shape(TOKENS, WIDTH, TILE) if tiled else (1, TOKENS, WIDTH))
        return kernel, [to_token_tiles(t, TILE) if tiled else t for t in (q, k, v)], out

    return f"attention 1x{TOKENS}x{HEADS}x{WIDTH // HEADS}", variant, (1, TOKENS, WIDTH)


def layer_norm_case():
    x, weight, bias = torch.randn(TOKENS, WIDTH), torch.randn(WIDTH), torch.randn(WIDTH)

    def variant(tiled: bool):
        kernel = layer_norm_kernel(TOKENS, WIDTH, 1e-12, "float32", True, tiled, tiled)
        out = torch.empty(token_tiled_shape(TOKENS, WIDTH, TILE) if tiled else (TOKENS, WIDTH))
        return kernel, [to_token_tiles(x, TILE) if tiled else x, weight, bias], out

    return f"layer norm {TOKENS}x{WIDTH}", variant, (TOKENS, WIDTH)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--burst", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    target = host_target(torch.get_num_threads())
    cases = [linear_case(WIDTH, WIDTH, "none", False), linear_case(WIDTH, WIDTH, "none", True),
             linear_case(FFN, WIDTH, "gelu", False), linear_case(WIDTH, FFN, "none", True),
             attention_case(), layer_norm_case()]
    print(f"threads {torch.get_num_threads()}, {target.attrs.get('mcpu')}; medians of {args.rounds} rounds, us")
    print(f"{'kernel':<28}{'row-major':>11}{'tiled':>9}  tiled / row-major")
    for name, variant, shape in cases:
        runs = []
        for tiled in (False, True):
            kernel, inputs, out = variant(tiled)
            lib = tvm.compile(tvm.IRModule({"k": kernel.with_attr("global_symbol", "k")}), target=target)
            tensors = [tvm.runtime.from_dlpack(t.contiguous()) for t in (*inputs, out)]
            runs.append((lib["k"], tensors, out, tiled))
        results = []
        for fn, tensors, out, tiled in runs:
            fn(*tensors)
            results.append(from_token_tiles(out, shape) if tiled else out)
        torch.testing.assert_close(results[1], results[0], rtol=1e-4, atol=1e-4)  # the layouts agree
        samples: list[list[float]] = [[], []]
        for _ in range(args.rounds):
            for i, (fn, tensors, _, _) in enumerate(runs):
                fn(*tensors)
                start = time.perf_counter()
                for _ in range(args.burst):
                    fn(*tensors)
                samples[i].append((time.perf_counter() - start) / args.burst * 1e6)
        row, tiled = (statistics.median(s) for s in samples)
        print(f"{name:<28}{row:>11.1f}{tiled:>9.1f}  {tiled / row:.2f}")


if __name__ == "__main__":
    main()
