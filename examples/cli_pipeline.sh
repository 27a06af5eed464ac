#!/usr/bin/env bash
# The sparsecc CLI as a build pipeline uses it: export a program, look at the plan, build, inspect, benchmark.
#   bash examples/cli_pipeline.sh [WORK_DIR]
set -euo pipefail
work="${1:-$(mktemp -d)}"
mkdir -p "$work" && cd "$work"

# 1. The model owner saves a torch.export program (here: a pruned MLP with random weights).
python - <<'PY'
import torch
from sparsecc.sparsify import prune_linears_
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(768, 3072), torch.nn.GELU(), torch.nn.Linear(3072, 768)).eval()
prune_linears_(model, 0.9)
torch.export.save(torch.export.export(model, (torch.randn(128, 768),)), "mlp.pt2")
PY

# 2. The pipeline: plan (JSON for machines), build for this CPU and for aarch64, inspect, benchmark.
sparsecc analyze mlp.pt2 --json > plan.json
sparsecc build mlp.pt2 -o artifact-host
sparsecc build mlp.pt2 -o artifact-aarch64 --target aarch64
sparsecc inspect artifact-aarch64
sparsecc bench artifact-host --repeats 10
echo "artifacts in $work"
