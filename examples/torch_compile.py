"""torch.compile with the sparsecc backend on a pruned MLP, checked against eager PyTorch.

    python examples/torch_compile.py
"""

import logging

import torch

import sparsecc
from sparsecc.sparsify import prune_linears_


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    model = torch.nn.Sequential(torch.nn.Linear(768, 3072), torch.nn.GELU(), torch.nn.Linear(3072, 768)).eval()
    prune_linears_(model, 0.9)
    x = torch.randn(128, 768)

    compiled = torch.compile(model, backend="sparsecc", options={"on_failure": "raise"})
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)

    graph = sparsecc.compiled_graphs()[-1]
    print(graph.report())
    print(f"{graph.state.sparse_ops} sparse ops in {len(graph.state.regions)} TVM regions")


if __name__ == "__main__":
    main()
