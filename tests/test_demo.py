"""The main job, run as a user runs it, at a small size, with the default options (measured planning)."""

import re
import subprocess
import sys

import pytest


@pytest.mark.slow  # a fresh process that calibrates the cost model (about a minute here) before it plans
def test_main_job_compiles_checks_and_reports(session_calibration):
    cmd = [sys.executable, "-m", "sparsecc", "--layers", "1", "--seq", "16", "--repeats", "2", "--no-inductor"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "output matches eager PyTorch" in out.stdout
    # The encoder's six Linears are 90 % zeros: sparse kernels run them several times faster than dense at any
    # token count, so the measured plan takes them. The pooler (one token) may measure either way.
    row = re.search(r"^encoder\.layer\.0\.intermediate\.dense\.weight\s+768x3072\s+0\.100\s+-\s+(\S+)\s+(.*)$",
                    out.stdout, re.M)
    assert row is not None and row.group(1) in ("csr", "bsr") and "measured at" in row.group(2), out.stdout
    sparse = re.search(r"(\d+) matrix products run as TVM sparse kernels", out.stdout)
    assert sparse is not None and int(sparse.group(1)) in (6, 7), out.stdout
    assert "sparsecc" in out.stdout.split("speed-up vs eager")[1]
