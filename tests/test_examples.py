"""Each script in examples/ runs as a user would run it (default options: measured planning, which calibrates this
machine once per test session) and checks its own result. Fresh processes: slow tests (`pytest -m slow`)."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def calibrated(session_calibration):
    """The examples plan by measuring: calibrate once in this process, into the cache their processes share."""

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run(*cmd, cwd=None):
    done = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=900, cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_torch_compile_example():
    assert "sparse ops in" in run(sys.executable, EXAMPLES / "torch_compile.py")


def test_aot_example_loads_in_another_process(tmp_path):
    out = run(sys.executable, EXAMPLES / "aot_build_and_load.py", tmp_path)
    assert "loaded in a fresh process" in out and "output matches eager PyTorch" in out


def test_cli_pipeline_example(tmp_path):
    out = run("bash", EXAMPLES / "cli_pipeline.sh", tmp_path)
    assert "not this machine" in out and "speed-up vs eager" in out
    assert (tmp_path / "plan.json").is_file() and (tmp_path / "artifact-host" / "manifest.json").is_file()
