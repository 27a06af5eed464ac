"""The sparse kernel's knobs swept by hand on one weight per shape: every combination of the given token tiles,
accumulator chains, rows per task and loop orders, built and checked as the tuner does, timed in interleaved rounds
(median of the rounds, microseconds), fastest first, next to the defaults and PyTorch's dense F.linear.
Combinations whose accumulators pass TVM's stack limit are kept when asked (`--past-stack-limit`), to show what
that limit costs.

    python benchmarks/knob_sweep.py --density 0.1
    python benchmarks/knob_sweep.py --density 0.2 --shapes 3072x768 --rows 8 32
    python benchmarks/knob_sweep.py --density 0.1 --block 16x1 --tiles 8 16 32 --chains 1 --past-stack-limit
"""

from __future__ import annotations

import argparse
import itertools
import logging
import statistics

import torch
from kernel_alone import pair  # benchmarks/ is the script's folder, on sys.path

import sparsecc.codegen.targets  # noqa: F401  (sizes TVM's pool before anything else starts it)
from sparsecc.codegen.targets import host_target
from sparsecc.codegen.tuning.runners import local_runner
from sparsecc.codegen.tuning.space import canonical, spec_default
from sparsecc.codegen.tuning.tasks import KernelTask
from sparsecc.kernel_work import KernelKnobs, prefers_token_outer
from sparsecc.measure.dense import dense_linear_seconds
from sparsecc.planning.calibration import random_blocked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", type=pair, default=[(3072, 768), (768, 3072), (768, 768)],
                        help="out x in")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--density", type=float, default=0.1, help="fraction of blocks kept")
    parser.add_argument("--block", type=pair, default=(1, 1), help="r x c; 1x1 is CSR")
    parser.add_argument("--tiles", nargs="+", type=int, default=[16, 32, 64])
    parser.add_argument("--chains", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--rows", nargs="+", type=int, default=[8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--top", type=int, default=8, help="fastest combinations printed per shape")
    parser.add_argument("--past-stack-limit", action="store_true",
                        help="also time knobs whose accumulators exceed the stack limit (KernelKnobs.fits)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    threads = torch.get_num_threads()
    runner = local_runner(host_target(threads), threads)
    print(f"{threads} threads; {args.tokens} tokens; {args.block[0]}x{args.block[1]} blocks at {args.density:.0%}; "
          f"median of {args.rounds} interleaved rounds, us")
    try:
        for n, k in args.shapes:
            task = KernelTask.from_weight(random_blocked(n, k, args.block, args.density), args.tokens, args.block)
            inputs = task.inputs()
            reference = task.reference(inputs)
            default = spec_default(task.spec, threads)
            knobs = [default]
            for tile, chains, rows, split in itertools.product(args.tiles, args.chains, args.rows, (True, False)):
                candidate = canonical(KernelKnobs(tile, rows, prefers_token_outer(k), chains, split), task.spec)
                if candidate not in knobs and (args.past_stack_limit or candidate.fits(args.block, "float32")):
                    knobs.append(candidate)
            built = [runner.build(task.spec, kn) for kn in knobs]
            rounds = [runner.measure(task, inputs, reference, built) for _ in range(args.rounds)]
            us = [statistics.median(r[i] for r in rounds) if all(r[i] is not None for r in rounds) else None
                  for i in range(len(knobs))]
            dense = dense_linear_seconds(n, k, args.tokens) * 1e6
            print(f"{n}x{k}: dense {dense:.0f} us; defaults {default}: {us[0]:.0f} us")
            ranked = sorted((t, kn) for t, kn in zip(us, knobs) if t is not None)
            for t, kn in ranked[:args.top]:
                mark = "" if kn.fits(args.block, "float32") else "  (past the stack limit)"
                print(f"  {t:8.0f} us  {dense / t:5.2f}x dense  tile {kn.token_tile:>3} chains {kn.chains} rows "
                      f"{kn.rows_per_task:>2} {'token split' if kn.token_split else 'row split'}"
                      f"{' token-outer' if kn.token_outer else ''}{mark}")
    finally:
        runner.close()


if __name__ == "__main__":
    main()
