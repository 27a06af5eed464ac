"""Compile time of BERT-base (12 layers, Linears 90 % zeros, sequence 128): from the torch.compile call to the
first result, in a fresh process each time, with an empty cache ("cold") and again with the cache the cold run
left ("warm"). Prints the seconds of each run and the pipeline's stage times of the last one.

    python benchmarks/compile_time.py [--runs 2] [--layers 12] [-O cost_model=measured]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, time, torch
from transformers import BertConfig, BertModel
import sparsecc
from sparsecc.sparsify import prune_linears_
torch.manual_seed(0)
model = BertModel(BertConfig(num_hidden_layers=int(sys.argv[1]))).eval()
prune_linears_(model, 0.9)
ids = torch.randint(0, model.config.vocab_size, (1, 128))
with torch.no_grad():
    start = time.perf_counter()
    torch.compile(model, backend="sparsecc", options=json.loads(sys.argv[2]) or None)(ids)
    seconds = time.perf_counter() - start
stages = {}
for graph in sparsecc.compiled_graphs():
    for state in graph.states:
        for name, s in state.seconds.items():
            stages[name] = stages.get(name, 0.0) + s
print(json.dumps({"seconds": seconds, "stages": stages}))
"""


def run_once(layers: int, cache: str, options: dict) -> dict:
    env = {**os.environ, "SPARSECC_CACHE_DIR": cache}
    done = subprocess.run([sys.executable, "-c", CHILD, str(layers), json.dumps(options)], capture_output=True,
                          text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2, help="cold + warm pairs")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("-O", dest="options", action="append", default=[], metavar="KEY=VALUE",
                        help="a compile option, e.g. cost_model=calibrated (strings only)")
    args = parser.parse_args()
    options = dict(o.split("=", 1) for o in args.options)
    cold, warm = [], []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="sparsecc-cache-") as cache:
            cold.append(run_once(args.layers, cache, options))
            warm.append(run_once(args.layers, cache, options))
    for name, runs in (("cold cache", cold), ("warm cache", warm)):
        secs = [r["seconds"] for r in runs]
        print(f"{name:<12} median {statistics.median(secs):6.1f} s   runs: {', '.join(f'{s:.1f}' for s in secs)}")
        print("             stages of the last run: " +
              ", ".join(f"{k} {v:.1f}" for k, v in runs[-1]["stages"].items()))


if __name__ == "__main__":
    main()
