"""Tuned against untuned sparse kernels at BERT-base's Linear shapes, 128 tokens, fp32, 90 % sparse weights
(unstructured, as CSR, and 16 x 1 blocks), with torch dense (F.linear, MKL) for reference.

Each kernel is tuned with `trials` candidates into a fresh tuning database (a temporary directory unless
--cache-dir is given), then the untuned and the tuned kernel and torch dense are timed interleaved, each call
from Python on ready-made arrays (medians of --repeats runs, ms). GOMP_SPINCOUNT=1000 as in docs/benchmarks.md:
without it PyTorch's spinning OpenMP threads and TVM's pool slow each other down (dense took 15 ms instead of 0.8).

    GOMP_SPINCOUNT=1000 python benchmarks/tuned_kernels.py
    GOMP_SPINCOUNT=1000 python benchmarks/tuned_kernels.py --trials 48 --shapes 768x3072 --blocks 1x1
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time

import torch

import sparsecc.codegen.targets  # noqa: F401  (sizes TVM's pool before anything else starts it)
from sparsecc.sparsify import block_prune_, magnitude_prune_
from sparsecc.measure.clock import interleaved

SHAPES = {"768x768": (768, 768), "3072x768": (3072, 768), "768x3072": (768, 3072)}  # (out, in)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--blocks", nargs="+", default=["1x1", "16x1"], help="block shapes (out x in); 1x1 = CSR")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--cache-dir", help="tuning database directory (default: a fresh temporary one)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import tvm

    from sparsecc.codegen import tuning
    from sparsecc.codegen.tuning import runners
    from sparsecc.codegen.targets import host_target
    from sparsecc.settings import Settings

    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="sparsecc-bench-")
    settings = Settings(cache_dir=cache_dir).resolved()
    threads = settings.threads
    target = host_target(threads)
    cases = []
    for block_s in args.blocks:
        block = tuple(int(v) for v in block_s.split("x"))
        for shape in args.shapes:
            out_f, in_f = SHAPES[shape]
            torch.manual_seed(0)
            w = torch.randn(out_f, in_f)
            if block == (1, 1):
                magnitude_prune_(w, args.sparsity)
            else:
                block_prune_(w, args.sparsity, block)
            bias = torch.randn(out_f)
            cases.append((shape, block_s, w, bias, tuning.KernelTask.from_weight(w, args.tokens, block, bias=bias)))

    start = time.perf_counter()
    stats = tuning.MEASUREMENTS
    count, builds, build_s, timing_s = stats.count, stats.builds, stats.build_seconds, stats.timing_seconds
    report = tuning.tune_weights([c[-1] for c in cases], {"trials": args.trials}, settings)
    seconds = time.perf_counter() - start
    trials = report.trials
    print(f"tuned {len(cases)} kernels, {trials} candidates in {seconds:.1f} s ({seconds / max(trials, 1):.2f} s a "
          f"candidate): {stats.builds - builds} builds, {(stats.build_seconds - build_s) / max(stats.builds - builds, 1):.3f}"
          f" s each; {stats.count - count} timings (confirmations included), "
          f"{(stats.timing_seconds - timing_s) / max(stats.count - count, 1):.3f} s each")
    print(f"database {report.database}")
    print(f"threads: torch {torch.get_num_threads()}, TVM {tvm.runtime.num_threads()}; {args.tokens} tokens, fp32, "
          f"{args.sparsity:.0%} sparse; medians of {args.repeats} interleaved runs, ms")
    print(f"{'weight (out x in)':<18}{'blocks':>7}{'dense':>9}{'untuned':>9}{'tuned':>9}{'tuned/untuned':>15}"
          f"{'vs dense':>10}  tuned knobs (tile, rows/task, token-outer, chains)")
    for (shape, block_s, w, bias, task), result in zip(cases, report.kernels):
        x = torch.randn(args.tokens, w.shape[1])
        arrays = [x, task.indptr, task.indices, task.values, bias, torch.zeros(1, 1)]
        tvm_args = [tvm.runtime.from_dlpack(a.contiguous()) for a in arrays]
        outs = {}
        fns = {}
        for label, knobs in (("untuned", tuning.spec_default(task.spec)), ("tuned", result.knobs)):
            func = runners.build_candidate(task.spec, knobs, target).executable.jit()[runners.FUNC]
            out = torch.empty(args.tokens, w.shape[0])
            outs[label] = out
            tvm_out = tvm.runtime.from_dlpack(out)
            fns[label] = (lambda f=func, o=tvm_out: f(*tvm_args, o))
        with torch.no_grad():
            expected = torch.nn.functional.linear(x, w, bias)
            for label, fn in fns.items():
                fn()
                torch.testing.assert_close(outs[label], expected, rtol=1e-4, atol=1e-4)
            timings = interleaved({"dense": lambda: torch.nn.functional.linear(x, w, bias), **fns},
                                  repeats=args.repeats)
        d, u, t = (timings[k].median_ms for k in ("dense", "untuned", "tuned"))
        kn = result.knobs
        same = " (the untuned knobs: the gap is noise)" if kn == tuning.spec_default(task.spec) else ""
        print(f"{shape:<18}{block_s:>7}{d:>9.3f}{u:>9.3f}{t:>9.3f}{u / t:>14.2f}x{d / t:>9.2f}x  "
              f"{kn.token_tile}, {kn.rows_per_task}, {int(kn.token_outer)}, {kn.chains}{same}", flush=True)


if __name__ == "__main__":
    main()
