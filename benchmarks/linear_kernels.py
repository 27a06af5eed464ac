"""Workload 1: one Linear at BERT-base shapes, 128 tokens, fp32, side by side:
torch dense (F.linear, MKL), torch.sparse CSR (MKL), and sparsecc through torch.compile (the user's path,
DLPack crossings included).

    python benchmarks/linear_kernels.py
    python benchmarks/linear_kernels.py --sparsity 0.9 --shapes 768x768
    python benchmarks/linear_kernels.py --sparsity 0.9 --block 16x1     # 16 x 1 blocks (out x in)
    python benchmarks/linear_kernels.py --burst 5     # each turn: 1 untimed call, 5 timed (threads already awake)
    python benchmarks/linear_kernels.py --nm 2:4 1:4 1:8   # N:M pruned (n of every m inputs) instead of --sparsity
"""

from __future__ import annotations

import argparse
import logging
import warnings

import torch

import sparsecc.codegen.targets  # noqa: F401  (sizes TVM's pool before anything else starts it)
from sparsecc.sparsify import block_prune_, magnitude_prune_, nm_prune_
from sparsecc.measure.clock import interleaved

SHAPES = {"768x768": (768, 768), "3072x768": (3072, 768), "768x3072": (768, 3072)}  # (out, in)


def measure(out_f: int, in_f: int, sparsity: float, tokens: int, repeats: int,
            block: tuple[int, int] | None, burst: int, nm: tuple[int, int] | None = None) -> dict:
    torch.manual_seed(0)
    layer = torch.nn.Linear(in_f, out_f).eval()
    with torch.no_grad():
        if nm is not None:
            nm_prune_(layer.weight.data, *nm)
        elif block is None:
            magnitude_prune_(layer.weight.data, sparsity)
        else:
            block_prune_(layer.weight.data, sparsity, block)
    x = torch.randn(tokens, in_f)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's "sparse CSR is beta" notice
        w_csr = layer.weight.detach().to_sparse_csr()
    bias = layer.bias.detach()
    compiled = torch.compile(layer, backend="sparsecc", options={"on_failure": "raise", "min_weight_numel": 1})
    with torch.no_grad():
        expected = layer(x)
        torch.testing.assert_close(compiled(x), expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(torch.addmm(bias.unsqueeze(1), w_csr, x.t()).t(), expected, rtol=1e-4, atol=1e-4)
        results = interleaved({
            "torch dense": lambda: layer(x),
            "torch.sparse CSR": lambda: torch.addmm(bias.unsqueeze(1), w_csr, x.t()).t(),
            "sparsecc": lambda: compiled(x),
        }, repeats=repeats, burst=burst)
    import sparsecc

    state = sparsecc.compiled_graphs()[-1].state
    kernels = [gv.name_hint for gv in state.irmodule.functions if "_linear_" in gv.name_hint] if state.irmodule else []
    chosen = ",".join(c.candidate for c in state.plan.choices.values())
    torch._dynamo.reset()
    # The plan's choice, and "+const" where the kernel took the row length as a constant.
    return {**{k: v.median_ms for k, v in results.items()},
            "chosen": chosen + ("+const" if any("_ell" in k for k in kernels) else "")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9, 0.95, 0.98])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--burst", type=int, default=1,
                        help="timed calls per turn after one untimed call (threads awake); 1: one call per turn")
    parser.add_argument("--block", help="prune whole r x c blocks (out x in), e.g. 16x1; default unstructured")
    parser.add_argument("--nm", nargs="+", help="prune n of every m inputs instead, e.g. 2:4 1:8")
    args = parser.parse_args()
    if args.nm and args.block:
        parser.error("--nm and --block are two different prunings: give one")
    logging.basicConfig(level=logging.WARNING)
    import tvm

    block = tuple(int(v) for v in args.block.split("x")) if args.block else None
    print(f"threads: torch {torch.get_num_threads()}, TVM {tvm.runtime.num_threads()}; {args.tokens} tokens, fp32; "
          f"{'N:M' if args.nm else 'unstructured' if block is None else f'{block[0]}x{block[1]} blocks'}; "
          f"medians of {args.repeats} interleaved turns of {args.burst} call(s), ms")
    print(f"{'weight (out x in)':<18}{'sparsity':>9}{'dense':>9}{'CSR':>9}{'sparsecc':>10}"
          f"{'vs dense':>10}{'vs CSR':>8}  plan")
    patterns = [tuple(int(v) for v in p.split(":")) for p in args.nm] if args.nm else [None] * len(args.sparsity)
    for shape in args.shapes:
        for s, nm in zip(args.sparsity if not args.nm else [1 - n / m for n, m in patterns], patterns):
            r = measure(*SHAPES[shape], s, args.tokens, args.repeats, block, args.burst, nm)
            d, c, ours = r["torch dense"], r["torch.sparse CSR"], r["sparsecc"]
            label = f"{s:.0%}" if nm is None else f"{nm[0]}:{nm[1]}"
            print(f"{shape:<18}{label:>9}{d:>9.3f}{c:>9.3f}{ours:>10.3f}{d / ours:>9.2f}x{c / ours:>7.2f}x  {r['chosen']}", flush=True)


if __name__ == "__main__":
    main()
