"""Autotuning of the sparse kernel template (codegen/kernels/cpu/bsr.py), remembered in a persistent database.

Search and measurement are apart: `space` (the knob sets), `tasks` (a kernel and the weight it is measured on),
`runners` (where kernels are built and timed: here or on RPC servers), `knob_search` (the walk over the space, the
database, the graph-level entry `tune_graph`).

With the `tune` option (`{"trials": 16}`), the lower stage calls `tune_graph` before building: each distinct
sparse kernel of the graph gets its knobs (`KernelKnobs`) from the tuning database (sparsecc/planning/tuning_db.py) or,
when the database has nothing tuned with at least that many trials, from a search measured here or on TVM RPC
servers. The chosen knobs go into the sparse_linear nodes' meta (`KNOBS_META`), where the converter reads them.

Why a search over the template's knobs and not meta_schedule
------------------------------------------------------------
- meta_schedule tunes by rewriting a schedulable (block-structured) PrimFunc with its schedule rules. The kernel
  here is hand-written TIR: its loops, tiles, unrolling and parallel split are written out, with no blocks for
  the rules to act on. Checked: meta_schedule's design space for the 128 x 768 x 768 CSR kernel
  (TuneContext(space_generator="post-order-apply").generate_design_space()) is one schedule with zero
  instructions, i.e. nothing to search, and producing it took 17 s here. Exposing the knobs to it would mean
  rewriting the kernel as block-structured compute plus a custom schedule rule per knob, and paying its builder.
- Cost per candidate with the knob search, this 2-core machine, the six BERT-base kernels of
  benchmarks/tuned_kernels.py (32 trials each): 0.30 s a candidate all in (114 candidates in 35 s), of which
  0.12 s is building the PrimFunc alone (TVMScript + `tvm.compile` of a one-function module) and 0.07 s each
  timing; the rest is the correctness check and the confirmation timings. meta_schedule as measured on this
  project (shared tvm-notes): about 10 s a candidate with its default builder (each builder process imports
  tvm.s_tir.tensor_intrin, 40 s), 0.44 s with a custom builder, 2.2 s a trial end to end (32 trials in 70 s).
- Result: tuned kernels 1.09-1.51x faster than untuned on four of the six BERT-base kernels at 90 % sparsity,
  no change on the two 768 x 768 ones (benchmarks/tuned_kernels.py; run-to-run noise is about 5 %).

What is searched
----------------
KernelKnobs: token tile (4-128 tokens), output rows per parallel task (2-64, the thread split), token tiles
inside or outside the parallel loop, accumulator chains (1-8, the unrolling of the non-zero loop into
independent FMA chains). Only combinations whose accumulators fit the stack are kept (see
`KernelKnobs.fits`), and equivalent ones (a tile longer than the token count, fewer rows than one
block-row, ...) are merged: at 128 tokens, fp32, 210 candidates for CSR, 100 for 4 x 1 blocks, 18 for 16 x 1.
`trials` candidates are measured: first the defaults (and a stored best, when the database holds a shorter
search), then rounds of all unmeasured neighbours of the best so far (one knob one step away), and random
candidates when no neighbour is left. The block shape is not a
knob here: the planner chose it, and the weight is packed in it before lowering.

Measurement
-----------
Each candidate is built alone, run once and checked against the eager reference of sparse_linear on the layer's
real packed weight (a candidate that disagrees is dropped with a warning), then timed:
- here, as it will run inside a model whose dense work stays in PyTorch: `CONTEXT_RUNS` calls, each right
  after a PyTorch matmul, median. TVM's time_evaluator runs the kernel back to back instead, and that hides
  most of what differs inside a model. 768 x 3072, CSR, 90 %, medians of 4 rounds: back to back, the defaults
  (tile 32, 8 rows, token-outer, 4 chains) took 0.84 ms, the same without token-outer 0.91 ms, and tile 64,
  32 rows, 2 chains, token-outer 0.81 ms; interleaved with a dense PyTorch Linear (as the benchmark and a
  model run them) 1.10, 0.99 and 0.88 ms: the order of the first two flips and the best gains 20 % instead
  of 4 %. The kernel's parallel loops meet PyTorch's OpenMP threads still spinning on the cores; token-outer
  has one parallel loop per token tile, so it pays that more often (docs/design.md, Threads).
- on an RPC server, with TVM's time_evaluator (no PyTorch there): the fastest of `REPEAT` repeats of at least
  `MIN_REPEAT_MS` each (interference only ever adds time).
At the end the `CONFIRM_TOP` fastest and the defaults are timed again, interleaved, `CONFIRM_ROUNDS` times
(fastest of the rounds); the defaults stay unless a candidate beats them by `KEEP_DEFAULT_MARGIN` (knob sets
within a few % of each other, e.g. at 768 x 768 with 16 x 1 blocks, swap places from run to run). Noise on this
shared machine is large (identical kernels measured up to 2x apart under load), which is why the confirmation
exists.

Which layer a shared kernel is tuned on
---------------------------------------
Layers of one shape share one kernel (design.md, point 5), but their patterns differ. A kernel gets one knob set,
tuned on the layer of its group with the most stored blocks (the slowest; the others are alike in the models
seen, random or magnitude pruning at one density), and the database key carries that layer's pattern hash.

Distributed measurement
-----------------------
With `tune={"trials": N, "rpc": {"tracker": "host:9190", "key": "cpu", "sessions": 4}}` candidates are built
here and measured on RPC servers registered with a TVM tracker under that key (`python -m tvm.exec.rpc_tracker`,
`TVM_NUM_THREADS=<cores> python -m tvm.exec.rpc_server --tracker host:9190 --key cpu` on each machine): each
candidate library is exported (a .so, or a .tar the server links when the target is another architecture),
uploaded, loaded and timed on the server's CPU with tensors created there. `sessions` servers measure at
once, each batch of candidates spread over them. The servers must be machines of the target's kind.
"""

from sparsecc.codegen.tuning.runners import MEASUREMENTS, KernelTimer, Runner, local_runner, rpc_runner
from sparsecc.codegen.tuning.knob_search import KernelTuning, TuningReport, search, tune_graph, tune_tasks, tune_weights
from sparsecc.codegen.tuning.space import candidate_space, canonical, neighbours, spec_default
from sparsecc.codegen.tuning.tasks import KernelTask, graph_tasks

__all__ = ["MEASUREMENTS", "KernelTask", "KernelTimer", "KernelTuning", "Runner", "TuningReport", "candidate_space",
           "canonical", "graph_tasks", "local_runner", "neighbours", "rpc_runner", "search", "spec_default",
           "tune_graph", "tune_tasks", "tune_weights"]
