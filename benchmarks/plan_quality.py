"""Cost model quality: for a varied set of layers (30-99 % sparse; unstructured, skewed rows and six block shapes;
64 to 4096 features; 1 to 512 tokens), the format the planner picks against every candidate measured here: dense
PyTorch and sparsecc's kernel in CSR and each block shape that fits. Targets (issue 4): the choice within 15 % of
the fastest candidate for at least 90 % of layers, and never more than 5 % slower than dense.

    python benchmarks/plan_quality.py                 # 60 layers, about 10 minutes on 2 cores
    python benchmarks/plan_quality.py --layers 20 --seed 1 --json out.json   # also every measurement, as JSON
    python benchmarks/plan_quality.py --noise a.json b.json   # two runs of one layer set: the measurement's own noise
    python benchmarks/plan_quality.py --clear     # four layers where one side wins by far; exit 1 if the plan errs

`--noise` scores an oracle that picks each layer's fastest candidate by run A's measurements against run B's: the
most any planner can score when judged by a measurement as noisy as this one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import random
import statistics

import torch

import sparsecc.codegen.targets  # noqa: F401  (sizes TVM's pool before anything else starts it)
from sparsecc.codegen.targets import host_target
from sparsecc.planning.calibration import machine_model
from sparsecc.planning.plan_quality import PATTERNS, Layer, judge
from sparsecc.settings import Settings

SIZES = (64, 256, 768, 1024, 3072, 4096)
TOKENS = (1, 8, 32, 128, 512)
SPARSITIES = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
MAX_MACS = 1.0e9  # keeps one dense run under ~15 ms here, the whole benchmark near 10 minutes


# Layers where one side wins by a wide margin (moved here from the unit tests: it is a timing, not a behaviour). The
# calibrated planner must never pick a format slower than dense, and must go sparse on the layers marked so, where a
# sparse kernel runs several times faster than dense. Which side wins is fixed here, not read off the judge's
# timings: on the half-dense layer a fully stored 8x1 kernel can time at half of PyTorch's GEMM in one run and not
# in the next, and the calibrated planner does not claim that case (cost_model="measured" does).
CLEAR_LAYERS = [
    (Layer(1024, 1024, 128, 0.98, "random"), True),  # very sparse
    (Layer(1024, 1024, 128, 0.5, "random"), False),  # half dense
    (Layer(768, 768, 32, 0.95, "16x1"), True),  # blocks
    (Layer(64, 64, 8, 0.5, "random"), False),  # tiny: call overheads
]


def clear_layers(machine, threads: int) -> int:
    """Judge CLEAR_LAYERS with the calibrated planner; 1 when a choice is slower than dense or misses a clear win."""
    verdicts = judge([layer for layer, _ in CLEAR_LAYERS], machine, host_target(threads), threads, rounds=3)
    failed = 0
    for v, (_, sparse_pays) in zip(verdicts, CLEAR_LAYERS):
        wrong = v.vs_dense > 1.05 or (sparse_pays and (v.chosen == "dense" or v.vs_dense > 0.6))
        failed += wrong
        print(f"{v.layer.name:<32} chose {v.chosen:<8} {v.vs_best:.2f}x the fastest ({v.best}), {v.vs_dense:.2f}x "
              f"dense{'  <- wrong' if wrong else ''}")
    print(f"{len(verdicts) - failed}/{len(verdicts)} clear cases right")
    return 1 if failed else 0


def layers(count: int, seed: int) -> list[Layer]:
    rng = random.Random(seed)
    out: list[Layer] = []
    while len(out) < count:
        n, k, t = rng.choice(SIZES), rng.choice(SIZES), rng.choice(TOKENS)
        pattern = rng.choice(PATTERNS)
        if pattern not in ("random", "skewed"):
            r, c = (int(v) for v in pattern.split("x"))
            if n % r or k % c:
                continue
        if n * k * t <= MAX_MACS:
            out.append(Layer(n, k, t, rng.choice(SPARSITIES), pattern))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=2, help="timings per candidate (the fastest counts)")
    parser.add_argument("--cost-model", default="measured", choices=("calibrated", "measured"),
                        help="the planner judged (default: %(default)s)")
    parser.add_argument("--json", help="write every layer's measured and predicted seconds per candidate here")
    parser.add_argument("--noise", nargs=2, metavar=("A", "B"), help="compare two --json runs instead of measuring")
    parser.add_argument("--clear", action="store_true", help="judge only the layers where one side wins by far")
    args = parser.parse_args()
    if args.noise:
        noise(*args.noise)
        return
    logging.basicConfig(level=logging.WARNING)
    threads = torch.get_num_threads()
    machine = machine_model(Settings().resolved())
    if args.clear:
        raise SystemExit(clear_layers(machine, threads))
    print(f"planner: cost_model={args.cost_model}; machine model: {machine.description}; {threads} threads; "
          f"fastest of {args.rounds} medians per candidate")
    print(f"{'layer':<32}{'chosen':>9}{'best':>9}{'dense us':>10}{'chosen us':>11}{'best us':>9}"
          f"{'vs best':>9}{'vs dense':>9}{'pred/meas':>10}")
    verdicts = []
    for layer in layers(args.layers, args.seed):
        v = judge([layer], machine, host_target(threads), threads, args.rounds, args.cost_model)[0]
        verdicts.append(v)
        error = v.predicted[v.chosen] / v.measured[v.chosen]
        print(f"{layer.name:<32}{v.chosen:>9}{v.best:>9}{v.measured['dense'] * 1e6:>10.0f}"
              f"{v.measured[v.chosen] * 1e6:>11.0f}{v.measured[v.best] * 1e6:>9.0f}{v.vs_best:>9.2f}"
              f"{v.vs_dense:>9.2f}{error:>10.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"layer": dataclasses.asdict(v.layer), "chosen": v.chosen, "measured": v.measured,
                        "predicted": v.predicted} for v in verdicts], f, indent=1)
    within = sum(v.vs_best <= 1.15 for v in verdicts)
    slower = [v for v in verdicts if v.vs_dense > 1.05]
    errors = [abs(p / v.measured[c] - 1) for v in verdicts for c, p in v.predicted.items()]
    print(f"\nchosen within 15 % of the fastest: {within}/{len(verdicts)} ({within / len(verdicts):.0%}; target 90 %)")
    print(f"chosen more than 5 % slower than dense: {len(slower)} (target 0)"
          + "".join(f"\n  {v.layer.name}: {v.chosen} {v.vs_dense:.2f}x dense" for v in slower))
    print(f"sparse picked on {sum(v.chosen != 'dense' for v in verdicts)} layers; dense fastest on "
          f"{sum(v.best == 'dense' for v in verdicts)}")
    print(f"prediction error over all candidates: median {statistics.median(errors):.0%}, "
          f"90th percentile {sorted(errors)[int(0.9 * len(errors))]:.0%}")


def noise(path_a: str, path_b: str) -> None:
    with open(path_a) as fa, open(path_b) as fb:
        runs = json.load(fa), json.load(fb)
    if [d["layer"] for d in runs[0]] != [d["layer"] for d in runs[1]]:
        raise SystemExit("the two runs measured different layers (use the same --layers and --seed)")
    for first, second in (runs, runs[::-1]):
        hits = 0
        for da, db in zip(first, second):
            common = set(da["measured"]) & set(db["measured"])
            pick = min(common, key=da["measured"].get)
            hits += db["measured"][pick] <= 1.15 * min(db["measured"][c] for c in common)
        planner = sum(d["measured"][d["chosen"]] <= 1.15 * min(d["measured"].values()) for d in second)
        print(f"fastest by one run, judged by the other: within 15 % on {hits}/{len(first)}; "
              f"that run's planner: {planner}/{len(second)}")


if __name__ == "__main__":
    main()
