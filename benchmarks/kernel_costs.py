"""Where one sparse kernel's time goes: the same layer built four ways, x and y in their plain (tokens, features)
layout or in the kernels' token-tiled one (`token_tiled_shape`, what one sparse kernel hands the next), at the
given density and with no stored values at all. The differences price the parts of a call:

- transpose: plain - x_tiled (x into (tiles, K, 32) before the product);
- write-back: plain - y_tiled (each output row's values stored one per token, `rows_per_task` at a time);
- fixed: both tiled at density 0 (launch, task spans, per-row set-up, epilogue);
- per value: what is left, per stored value and 32-token tile, on each of the threads.

Each kernel is checked against the eager reference, then timed with TVM's time evaluator (back to back: threads
awake), the four variants interleaved over `--rounds` rounds; medians, microseconds.

    python benchmarks/kernel_costs.py
    python benchmarks/kernel_costs.py --shapes 768x768 --density 0.2 --rounds 40
"""

from __future__ import annotations

import argparse
import logging
import statistics

import numpy as np
import torch
import tvm

import sparsecc.codegen.targets  # noqa: F401  (sizes TVM's pool before anything else starts it)
from sparsecc.planning.calibration import random_blocked
from sparsecc.kernel_work import from_token_tiles, to_token_tiles, token_tiled_shape
from sparsecc.codegen.targets import host_target
from sparsecc.codegen.tuning import KernelTask

from kernel_alone import pair  # benchmarks/ is the script's own directory

VARIANTS = {"plain": (False, False), "x_tiled": (True, False), "y_tiled": (False, True), "both": (True, True)}


class Variant:
    """One layout variant of a task's kernel, built, checked and ready to time."""

    def __init__(self, task: KernelTask, x_tiled: bool, y_tiled: bool, target):
        spec = task.spec
        tile = spec.token_tile(None)
        func = spec.kernel(x_tiled=x_tiled, y_tiled=y_tiled).with_attr("global_symbol", "kernel")
        self.lib = tvm.compile(tvm.IRModule({"kernel": func}), target=target)
        inputs = task.inputs()
        expected = task.reference(inputs)
        if x_tiled:
            inputs[0] = to_token_tiles(torch.from_numpy(inputs[0]), tile).numpy()
        y_shape = token_tiled_shape(spec.m, spec.n, tile) if y_tiled else (spec.m, spec.n)
        dev = tvm.cpu()
        self.args = [tvm.runtime.tensor(a, dev) for a in inputs] + [tvm.runtime.tensor(np.zeros(y_shape, expected.dtype), dev)]
        self.lib.mod["kernel"](*self.args)
        y = self.args[-1].numpy()
        y = from_token_tiles(torch.from_numpy(y), (spec.m, spec.n)).numpy() if y_tiled else y
        np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
        self.timer = self.lib.mod.time_evaluator("kernel", dev, number=20, repeat=1)

    def us(self) -> float:
        return self.timer(*self.args).results[0] * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", type=pair, default=[(768, 768), (3072, 768), (768, 3072)],
                        help="out x in")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--density", type=float, default=0.1, help="fraction of weights stored (CSR)")
    parser.add_argument("--rounds", type=int, default=25)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    threads = torch.get_num_threads()
    target = host_target(threads)
    print(f"{threads} threads, {args.tokens} tokens, CSR at {args.density:.0%} stored; medians of {args.rounds} "
          "interleaved rounds, us")
    print(f"{'weight':<10}{'plain':>8}{'x_tiled':>9}{'y_tiled':>9}{'both':>8}{'empty':>8}"
          f"{'transpose':>11}{'write-back':>12}{'ns/value':>10}")
    for n, k in args.shapes:
        weight = random_blocked(n, k, (1, 1), args.density)
        task = KernelTask.from_weight(weight, args.tokens)
        empty = KernelTask.from_weight(torch.zeros(n, k), args.tokens)
        variants = {name: Variant(task, *layout, target) for name, layout in VARIANTS.items()}
        variants["empty"] = Variant(empty, True, True, target)
        samples: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, variant in variants.items():
                samples[name].append(variant.us())
        t = {name: statistics.median(s) for name, s in samples.items()}
        tiles = token_tiled_shape(args.tokens, k, task.spec.token_tile(None))[0]
        per_value = (t["both"] - t["empty"]) * 1e3 * threads / (task.stored_blocks * tiles)
        print(f"{f'{n}x{k}':<10}{t['plain']:>8.0f}{t['x_tiled']:>9.0f}{t['y_tiled']:>9.0f}{t['both']:>8.0f}"
              f"{t['empty']:>8.0f}{t['plain'] - t['x_tiled']:>11.0f}{t['plain'] - t['y_tiled']:>12.0f}"
              f"{per_value:>10.3f}", flush=True)


if __name__ == "__main__":
    main()
