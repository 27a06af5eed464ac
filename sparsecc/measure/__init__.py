"""The measurement service: every timing sparsecc takes goes through here.

- `clock`: medians of repeated calls, the fastest of interleaved rounds, and the interleaved min / median / max
  table the demo, the CLI and benchmarks/ print. No TVM, no torch.
- `dense`: PyTorch's own dense Linear and read bandwidth, as the cost model's calibration and the planner time them.
- Kernels are run where they were built: codegen/tuning/runners.py (this process or TVM RPC servers), whose timings
  use the same clock.

Users: calibration and candidate timing (sparsecc/planning/), tuning (codegen/tuning/), the dense-backend choice
(sparsecc/runtime/dense_graph.py), plan quality and the benchmarks.
"""
