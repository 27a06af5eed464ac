"""ELL (rows padded to one length, the length baked into the kernel) against CSR's kernel, which reads each row's
length from indptr, on the same weight: rows that are already of one length (N:M pruning), rows within a few values
of each other, and magnitude-pruned rows (lengths spread binomially). Kernels called directly (no torch.compile),
interleaved in turns of one untimed and `--burst` timed batches of 20 calls after each other; PyTorch's dense
F.linear alongside. Medians, microseconds per call.

    python benchmarks/ell_rows.py
    python benchmarks/ell_rows.py --shapes 3072x768 --density 0.1 --burst 3 --repeats 15
"""

from __future__ import annotations

import argparse
import logging

import torch
import tvm

from kernel_alone import pair

import sparsecc.codegen.targets  # noqa: F401  (sizes TVM's pool before anything else starts it)
from sparsecc.codegen.kernels.cpu.bsr import bsr_linear_kernel
from sparsecc.codegen.targets import host_target
from sparsecc.packing import pack_blocks, pack_ell, uniform_row_blocks
from sparsecc.sparsify import magnitude_prune_
from sparsecc.measure.clock import interleaved

CALLS = 20  # per timed batch: one kernel call is 0.1-0.5 ms, below the timer's useful resolution on this VM


def rows_of(n: int, k: int, density: float, kind: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    if kind == "random":
        magnitude_prune_(w, 1.0 - density)
        return w
    per_row = torch.full((n,), round(density * k))
    if kind == "near":  # lengths spread over +-3 % of the mean
        spread = max(1, round(0.03 * density * k))
        per_row += torch.randint(-spread, spread + 1, (n,), generator=g)
    keep = torch.rand(n, k, generator=g).argsort(dim=1) < per_row.unsqueeze(1)
    return w * keep


def kernel_call(x: torch.Tensor, w: torch.Tensor, ell: bool, target):
    m, k = x.shape
    n = w.shape[0]
    packed = (pack_ell if ell else pack_blocks)(w)
    kernel = bsr_linear_kernel(m, n, k, (1, 1), "float32", column_dtype=str(packed[1].dtype).removeprefix("torch."),
                               row_blocks=uniform_row_blocks(packed[0]) if ell else None)
    fn = tvm.compile(tvm.IRModule({"k": kernel.with_attr("global_symbol", "k")}), target=target)["k"]
    out = torch.empty(m, n)
    args = [tvm.runtime.from_dlpack(a.contiguous()) for a in (x, *packed, torch.zeros(n), torch.zeros(1, 1), out)]
    fn(*args)
    torch.testing.assert_close(out, x @ w.t(), rtol=1e-4, atol=1e-3)
    return lambda: [fn(*args) for _ in range(CALLS)], int(packed[2].shape[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", type=pair, default=[(768, 768), (3072, 768), (768, 3072)],
                        help="out x in")
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--burst", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    threads = torch.get_num_threads()
    target = host_target(threads)
    print(f"{threads} threads, {args.tokens} tokens, density {args.density}; medians of {args.repeats} turns, "
          f"us per call")
    print(f"{'weight':<10}{'rows':>8}{'padding':>9}{'dense':>9}{'csr':>9}{'ell':>9}{'ell/csr':>9}")
    for n, k in args.shapes:
        shape = f"{n}x{k}"
        x = torch.randn(args.tokens, k)
        for kind in ("uniform", "near", "random"):
            w = rows_of(n, k, args.density, kind)
            dense_w = w.clone()
            csr, nnz = kernel_call(x, w, False, target)
            ell, stored = kernel_call(x, w, True, target)
            with torch.no_grad():
                t = interleaved({"dense": lambda: [torch.nn.functional.linear(x, dense_w) for _ in range(CALLS)],
                                 "csr": csr, "ell": ell}, repeats=args.repeats, burst=args.burst)
            us = {name: v.median_ms / CALLS * 1e3 for name, v in t.items()}
            print(f"{shape:<10}{kind:>8}{stored / nnz - 1:>8.1%}{us['dense']:>9.1f}{us['csr']:>9.1f}{us['ell']:>9.1f}"
                  f"{us['ell'] / us['csr']:>8.3f}x", flush=True)


if __name__ == "__main__":
    main()
