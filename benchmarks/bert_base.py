"""BERT-base (12 layers, hidden 768, batch 1, sequence 128, random weights from BertConfig) with every Linear
magnitude-pruned, timed side by side: eager PyTorch, Inductor (torch.compile default), sparsecc, and, in their
own virtual environment (benchmarks/peers.py), DeepSparse 1.8.0 and ONNX Runtime on the same model exported
to ONNX. In-process candidates are interleaved; the two ONNX engines run in a subprocess right after them.
Every candidate's output is checked against eager before it is timed.

    python benchmarks/bert_base.py --sparsity 0.9 0.8 0.95 0
    GOMP_SPINCOUNT=1000 python benchmarks/bert_base.py ...   # PyTorch's OpenMP threads stop spinning sooner
    python benchmarks/bert_base.py --peers sparsecc sparsecc-tvm-pool   # kernels on PyTorch's threads vs TVM's pool
    python benchmarks/bert_base.py --peers sparsecc sparsecc-offload-all   # attention, layer norm in TVM too

Each sparsecc candidate compiles its own copy of the model (so each keeps its own kernels).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import BertConfig, BertModel

import sparsecc
import sparsecc.codegen.targets  # noqa: F401  (sizes TVM's pool before anything else starts it)
from sparsecc.sparsify import prune_linears_
from sparsecc.measure.clock import interleaved, timing_table
from sparsecc.tolerances import assert_outputs_close


# In-process candidates compiled with sparsecc, and their options.
SPARSECC_VARIANTS = {"sparsecc": {}, "sparsecc-tvm-pool": {"thread_pool": "tvm"},
                     "sparsecc-openmp-pool": {"thread_pool": "openmp"}, "sparsecc-offload-all": {"offload": "all"}}
IN_PROCESS = ("inductor", *SPARSECC_VARIANTS)
ONNX_ENGINES = ("deepsparse", "onnxruntime")


REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/peers.py


def measure(sparsity: float, repeats: int, peers: list[str], workdir: Path, block: tuple[int, int] | None) -> dict:
    torch.manual_seed(0)
    model = BertModel(BertConfig()).eval()
    prune_linears_(model, sparsity, block)
    ids = torch.randint(0, model.config.vocab_size, (1, 128))
    candidates, compile_s = {"eager": lambda: model(ids)}, {}
    with torch.no_grad():
        expected = model(ids).last_hidden_state
        for name in (p for p in peers if p in IN_PROCESS):
            start = time.perf_counter()
            if name in SPARSECC_VARIANTS:
                fn = torch.compile(copy.deepcopy(model), backend="sparsecc", options=SPARSECC_VARIANTS[name] or None)
            else:
                fn = torch.compile(model)
            assert_outputs_close(fn(ids).last_hidden_state, expected)  # agree before timing anything
            compile_s[name] = round(time.perf_counter() - start, 1)
            candidates[name] = lambda fn=fn: fn(ids)
        results = interleaved(candidates, repeats=repeats)
    engines = [p for p in peers if p in ONNX_ENGINES]
    if engines:
        results.update(_time_onnx_engines(model, ids, expected, engines, repeats, workdir / f"bert_{sparsity}.onnx",
                                          compile_s))
    print(f"\nsparsity {sparsity:.0%}  (compile s: {compile_s})")
    print(timing_table(results, baseline="eager"))
    return {"sparsity": sparsity, "compile_s": compile_s,
            "median_ms": {k: round(v.median_ms, 2) for k, v in results.items()},
            "min_ms": {k: round(v.min_ms, 2) for k, v in results.items()},
            "max_ms": {k: round(v.max_ms, 2) for k, v in results.items()}}


def _time_onnx_engines(model, ids, expected, engines, repeats, onnx_path: Path, compile_s: dict) -> dict:
    from peers import time_onnx_engines

    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    return time_onnx_engines(model, inputs, expected, engines, repeats, onnx_path, compile_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.9])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--peers", nargs="+", default=["inductor", "sparsecc", *ONNX_ENGINES],
                        choices=list(IN_PROCESS + ONNX_ENGINES))
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--block", help="prune Linears in whole r x c blocks (out x in), e.g. 16x1; default unstructured")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    import os

    import tvm

    print(f"threads: torch {torch.get_num_threads()}, TVM {tvm.runtime.num_threads()} "
          f"(TVM_BIND_THREADS={os.environ.get('TVM_BIND_THREADS')}, "
          f"TVM_THREAD_POOL_SPIN_COUNT={os.environ.get('TVM_THREAD_POOL_SPIN_COUNT')}, "
          f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}); "
          f"torch {torch.__version__}, sparsecc {sparsecc.__version__}, {platform.machine()}")
    with tempfile.TemporaryDirectory() as workdir:
        block = tuple(int(v) for v in args.block.split("x")) if args.block else None
        print("pattern:", f"{block[0]}x{block[1]} blocks" if block else "unstructured")
        rows = [measure(s, args.repeats, args.peers, Path(workdir), block) for s in args.sparsity]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
