"""Save BERT-base (random weights, every Linear magnitude-pruned) as a torch.export program for the CLI benchmarks.

    python benchmarks/save_bert_program.py bert.pt2 [--sparsity 0.9] [--seq 128]
"""

from __future__ import annotations

import argparse

import torch
from transformers import BertConfig, BertModel

from sparsecc.sparsify import prune_linears_


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = BertModel(BertConfig()).eval()
    prune_linears_(model, args.sparsity)
    ids = torch.randint(0, model.config.vocab_size, (1, args.seq))
    torch.export.save(torch.export.export(model, (ids,)), args.output)


if __name__ == "__main__":
    main()
