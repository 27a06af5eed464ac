"""The sparse kernel's loop orders side by side: threads splitting the rows (each thread all token tiles of its
rows, x^T transposed by all threads together) or the token tiles (each thread whole tiles, transposed by itself),
with x and y row-major (a region's boundary) or token-tiled (inside a region). BERT-base's Linear shapes at 128
tokens, 90 % unstructured CSR, on PyTorch's OpenMP threads as in a compiled model. Every round each variant makes
one untimed call and `--burst` timed ones back to back. Medians, us.

    python benchmarks/loop_orders.py --rounds 200
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import torch
import tvm

import sparsecc.codegen.targets  # noqa: F401  (sizes TVM's pool before anything else starts it)
from sparsecc.codegen.kernels.cpu.bsr import bsr_linear_kernel
from sparsecc.kernel_work import default_knobs, from_token_tiles, to_token_tiles, token_tiled_shape
from sparsecc.codegen.openmp_pool import redirect_parallel_launch
from sparsecc.codegen.targets import host_target
from sparsecc.packing import pack_blocks
from sparsecc.measure.clock import interleaved

TOKENS = 128
SHAPES = {"768x768": (768, 768), "3072x768": (3072, 768), "768x3072": (768, 3072)}  # (out, in)


def variants(n: int, k: int) -> dict[str, tuple]:
    base = default_knobs(TOKENS, n, k, (1, 1), "float32")
    out = {}
    for layout in ("row-major", "tiled"):
        for split in (False, True):
            knobs = dataclasses.replace(base, token_split=split, token_outer=base.token_outer and not split)
            name = f"{layout} / {'tokens' if split else 'rows'}"
            out[name] = (knobs, layout == "tiled")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--burst", type=int, default=5)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    args = parser.parse_args()
    threads = torch.get_num_threads()
    target = host_target(threads)
    print(f"threads {threads}, {target.attrs.get('mcpu')}; {TOKENS} tokens, 90 % CSR; medians of {args.rounds} "
          f"rounds of {args.burst}, us")
    torch.manual_seed(0)
    for shape in args.shapes:
        n, k = SHAPES[shape]
        w = torch.randn(n, k) * (torch.rand(n, k) < 0.1)
        packed = pack_blocks(w, (1, 1))
        columns = str(packed[1].dtype).removeprefix("torch.")
        x, bias = torch.randn(TOKENS, k), torch.randn(n)
        cases = variants(n, k)
        funcs = {f"v{i}": bsr_linear_kernel(TOKENS, n, k, (1, 1), "float32", column_dtype=columns, knobs=knobs,
                                            x_tiled=tiled, y_tiled=tiled).with_attr("global_symbol", f"v{i}")
                 for i, (knobs, tiled) in enumerate(cases.values())}
        with tempfile.TemporaryDirectory() as work:
            library = Path(work) / "kernels.so"
            tvm.compile(tvm.IRModule(funcs), target=target).export_library(str(library))
            module = tvm.runtime.load_module(str(library))
            on_openmp = redirect_parallel_launch(library)
        runs, expected = [], x @ w.t() + bias
        for i, (knobs, tiled) in enumerate(cases.values()):
            tile = min(knobs.token_tile, TOKENS)
            out = torch.empty(token_tiled_shape(TOKENS, n, tile) if tiled else (TOKENS, n))
            inputs = [to_token_tiles(x, tile) if tiled else x, *packed, bias, torch.zeros(1, 1), out]
            tensors = [tvm.runtime.from_dlpack(t.contiguous()) for t in inputs]
            fn = module[f"v{i}"]
            fn(*tensors)
            got = from_token_tiles(out, (TOKENS, n)) if tiled else out
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
            runs.append((fn, tensors))
        timings = interleaved({name: (lambda fn=fn, tensors=tensors: fn(*tensors))
                               for name, (fn, tensors) in zip(cases, runs)}, repeats=args.rounds, burst=args.burst)
        medians = {name: t.median_ms * 1e3 for name, t in timings.items()}
        print(f"\ncsr {shape}" + ("" if on_openmp else " (on TVM's pool: no OpenMP launcher here)"))
        for name, us in medians.items():
            layout = name.split(" / ")[0]
            rows_us = medians[f"{layout} / rows"]
            print(f"  {name:<22}{us:>9.1f}" + (f"   tokens / rows {us / rows_us:.2f}" if name.endswith("tokens")
                                                 else ""))


if __name__ == "__main__":
    main()
