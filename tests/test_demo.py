"""The main job, run as a user runs it, at a small size."""

import subprocess
import sys


def test_main_job_compiles_checks_and_reports():
    cmd = [sys.executable, "-m", "sparsecc", "--layers", "1", "--seq", "16", "--repeats", "2", "--no-inductor"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "output matches eager PyTorch" in out.stdout
    assert "encoder.layer.0.intermediate.dense.weight" in out.stdout and " csr " in out.stdout
    assert "7 matrix products run as TVM sparse kernels" in out.stdout
    assert "sparsecc" in out.stdout.split("speed-up vs eager")[1]
