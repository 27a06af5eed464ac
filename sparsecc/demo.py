"""The main job: a BERT-style encoder, pruned, compiled by sparsecc for this CPU, checked and timed.

    python -m sparsecc            # BERT-base shape: 12 layers, sequence 128, batch 1, Linears 90 % zeros
    python -m sparsecc --layers 2 --no-inductor
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import torch

log = logging.getLogger("sparsecc.demo")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", type=int, default=12, help="encoder layers (BERT-base: 12)")
    parser.add_argument("--sparsity", type=float, default=0.9, help="fraction of zeros in each Linear")
    parser.add_argument("--seq", type=int, default=128, help="sequence length")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per candidate")
    parser.add_argument("--no-inductor", action="store_true", help="skip torch.compile's default backend")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    try:
        from transformers import BertConfig, BertModel
    except ImportError:
        log.error("the demo needs transformers: pip install 'sparsecc[demo]'")
        return 2

    import sparsecc
    from sparsecc.report import plan_table
    from sparsecc.sparsify import prune_linears_
    from sparsecc.measure.clock import interleaved, timing_table
    from sparsecc.tolerances import assert_outputs_close

    torch.manual_seed(args.seed)
    model = BertModel(BertConfig(num_hidden_layers=args.layers)).eval()
    prune_linears_(model, args.sparsity)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq))
    threads = torch.get_num_threads()
    omp = ", ".join(f"{v}={os.environ[v]}" for v in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY") if v in os.environ)
    print(f"BERT-style encoder: {args.layers} layers, hidden 768, batch {args.batch}, sequence {args.seq}, "
          f"Linears {args.sparsity:.0%} zeros, {threads} threads ({omp or 'default OpenMP settings'}; "
          "the same for every candidate)")

    with torch.no_grad():
        start = time.perf_counter()
        compiled = torch.compile(model, backend="sparsecc")
        out = compiled(ids)
        compile_s = time.perf_counter() - start
        assert_outputs_close(out.last_hidden_state, model(ids).last_hidden_state)
        graphs = [g for g in sparsecc.compiled_graphs() if g.state is not None and g.state.plan is not None]
        print(f"\nsparsecc compiled in {compile_s:.1f} s; output matches eager PyTorch\n")
        for g in graphs:
            print(plan_table(g.state.plan))
        sparse_ops = sum(g.state.sparse_ops for g in graphs)
        print(f"\n{sparse_ops} matrix products run as TVM sparse kernels")

        candidates = {"eager": lambda: model(ids), "sparsecc": lambda: compiled(ids)}
        if not args.no_inductor:
            start = time.perf_counter()
            inductor = torch.compile(model)
            inductor(ids)
            print(f"Inductor compiled in {time.perf_counter() - start:.1f} s")
            candidates["inductor"] = lambda: inductor(ids)
        results = interleaved(candidates, repeats=args.repeats)
    print()
    print(timing_table(results, baseline="eager"))
    return 0


