"""What the planner knows of this machine, and how it learns it.

- `cost_model`: predicted time of a layer in each format, from a machine model (no TVM, no timing).
- `calibration`: the micro-benchmark that fits the machine model once per target, stored in the cache.
- `candidate_timing`: timing a weight's close candidates on the weight itself (`cost_model="measured"`).
- `pricing` / `target_pricing`: what the plan pass is handed to price with, and how the pipeline builds it.
- `tuning_db`: the sqlite database of timings and tuned knobs the planner and the tuner keep.
- `plan_quality`: how good the planner's choices are against every candidate measured.
"""
