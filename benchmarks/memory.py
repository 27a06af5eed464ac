"""Memory of a compiled BERT-base (batch 1, sequence 128, every Linear pruned): bytes of the packed sparse weights
against the dense weights they replace, and the peak RSS of a process that runs the model eagerly against one
that compiles and runs it with sparsecc. Each runs in its own subprocess, since peak RSS is per process.

    python benchmarks/memory.py --sparsity 0.9
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, warnings
warnings.simplefilter("ignore")
import torch
from transformers import BertConfig, BertModel
from sparsecc.sparsify import prune_linears_
torch.manual_seed(0)
model = prune_linears_(BertModel(BertConfig()).eval(), float(sys.argv[2]))
ids = torch.randint(0, model.config.vocab_size, (1, 128))
result = {}
with torch.no_grad():
    if sys.argv[1] == "sparsecc":
        import sparsecc
        from sparsecc.packing import pack_choice
        compiled = torch.compile(model, backend="sparsecc")
        for _ in range(3):
            compiled(ids)
        plan = sparsecc.compiled_graphs()[-1].state.plan
        packed = dense = 0
        for key, choice in plan.choices.items():
            if choice.format.value == "dense":
                continue
            weight = model.get_parameter(plan.weights[key].name).detach()
            dense += weight.numel() * weight.element_size()
            packed += sum(t.numel() * t.element_size() for t in pack_choice(weight, choice))
        result.update(dense_bytes=dense, packed_bytes=packed, packed_over_dense=round(packed / dense, 3))
    else:
        for _ in range(3):
            model(ids)
result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(result))
"""


def run(mode: str, sparsity: float) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode, str(sparsity)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsity", type=float, default=0.9)
    args = parser.parse_args()
    eager, ours = run("eager", args.sparsity), run("sparsecc", args.sparsity)
    print(json.dumps({"eager": eager, "sparsecc": ours}))


if __name__ == "__main__":
    main()
