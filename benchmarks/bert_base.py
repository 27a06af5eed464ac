"""BERT-base (12 layers, hidden 768, batch 1, sequence 128, random weights from BertConfig) with every Linear
magnitude-pruned, timed side by side: eager PyTorch, Inductor (torch.compile default) and sparsecc.

    python benchmarks/bert_base.py --sparsity 0.9 0.8 0.95 0
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time

import torch
from transformers import BertConfig, BertModel

import sparsecc
import sparsecc.codegen.targets  # noqa: F401  (sizes TVM's pool before anything else starts it)
from sparsecc.sparsify import prune_linears_
from sparsecc.timing import interleaved, timing_table
from sparsecc.tolerances import assert_outputs_close


def measure(sparsity: float, repeats: int, peers: list[str]) -> dict:
    torch.manual_seed(0)
    model = BertModel(BertConfig()).eval()
    prune_linears_(model, sparsity)
    ids = torch.randint(0, model.config.vocab_size, (1, 128))
    candidates, compile_s = {"eager": lambda: model(ids)}, {}
    with torch.no_grad():
        expected = model(ids).last_hidden_state
        for name in peers:
            start = time.perf_counter()
            fn = torch.compile(model, backend="sparsecc") if name == "sparsecc" else torch.compile(model)
            assert_outputs_close(fn(ids).last_hidden_state, expected)  # agree before timing anything
            compile_s[name] = round(time.perf_counter() - start, 1)
            candidates[name] = lambda fn=fn: fn(ids)
        results = interleaved(candidates, repeats=repeats)
    print(f"\nsparsity {sparsity:.0%}  (compile s: {compile_s})")
    print(timing_table(results, baseline="eager"))
    return {"sparsity": sparsity, "compile_s": compile_s,
            "median_ms": {k: round(v.median_ms, 2) for k, v in results.items()},
            "min_ms": {k: round(v.min_ms, 2) for k, v in results.items()},
            "max_ms": {k: round(v.max_ms, 2) for k, v in results.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.9])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--peers", nargs="+", default=["inductor", "sparsecc"], choices=["inductor", "sparsecc"])
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    import os

    import tvm

    print(f"threads: torch {torch.get_num_threads()}, TVM {tvm.runtime.num_threads()} "
          f"(TVM_BIND_THREADS={os.environ.get('TVM_BIND_THREADS')}, "
          f"TVM_THREAD_POOL_SPIN_COUNT={os.environ.get('TVM_THREAD_POOL_SPIN_COUNT')}); "
          f"torch {torch.__version__}, sparsecc {sparsecc.__version__}, {platform.machine()}")
    rows = [measure(s, args.repeats, args.peers) for s in args.sparsity]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
