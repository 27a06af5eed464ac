"""Peer engines (DeepSparse, ONNX Runtime) timed in separate processes, for comparison with sparsecc.

DeepSparse 1.8.0 (the last release with a cp311 wheel; 1.9.0 is source-only and does not build) pins
numpy 1.26 and onnx 1.14, so it cannot share the main environment: it gets its own virtual environment
under `<repo>/.peers/deepsparse` (git-ignored), with onnxruntime beside it. The main Python, which has
torch, exports the model to ONNX; `peer_runner.py` loads and times it inside that environment and
saves its first output, which the caller compares with eager PyTorch here.

    python = ensure_peer_env(REPO_ROOT)
    export_onnx(model, (ids, mask, types), tmp / "bert.onnx")
    result = time_in_peer(python, tmp / "bert.onnx", "deepsparse", {"input_ids": ids.numpy(), ...},
                          threads=2, warmup=3, repeats=10)
    np.testing.assert_allclose(np.load(result["outputs_path"]), expected, rtol=1e-3, atol=1e-3)
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal, Mapping, Sequence

import numpy as np
import torch

LOG = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
RUNNER = Path(__file__).resolve().with_name("peer_runner.py")
PEER_PACKAGES = ("deepsparse==1.8.0", "onnxruntime")
# Without these DeepSparse / SparseZoo phone home (analytics, latest-version check) on import.
PEER_ENV = {"NM_DISABLE_ANALYTICS": "1", "NM_VERSION_CHECK": "false"}


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _env() -> dict[str, str]:
    """The environment for subprocesses: the main Python's PYTHONPATH / PYTHONHOME must not leak into the
    peer venv (its numpy 1.26 would meet the main numpy 2), and DeepSparse must not phone home."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")} | PEER_ENV


def _run(cmd: Sequence[str], what: str, timeout: float | None = None) -> subprocess.CompletedProcess:
    """Run `cmd`, raising a RuntimeError with the tail of its output if it fails."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, env=_env())
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{_tail(proc.stdout + proc.stderr)}")
    return proc


def ensure_peer_env(root: Path) -> Path:
    """Create `<root>/.peers/deepsparse` with DeepSparse 1.8.0 and ONNX Runtime unless it already imports
    both; returns the environment's python. Built from the running interpreter, so it must be a
    Python DeepSparse 1.8.0 has wheels for (3.8 to 3.11)."""
    env_dir = Path(root) / ".peers" / "deepsparse"
    python = env_dir / "bin" / "python"
    check = [python, "-c", "import deepsparse, onnxruntime"]
    if python.exists() and subprocess.run([str(c) for c in check], capture_output=True, env=_env()).returncode == 0:
        LOG.info("peer environment ready: %s", env_dir)
        return python
    start = time.perf_counter()
    if not python.exists():
        LOG.info("creating virtual environment %s", env_dir)
        _run([sys.executable, "-m", "venv", env_dir], "creating the peer virtual environment")
    LOG.info("installing %s into %s (about 20 s on a fast network)", " ".join(PEER_PACKAGES), env_dir)
    _run([python, "-m", "pip", "install", "--disable-pip-version-check", *PEER_PACKAGES],
         f"pip install {' '.join(PEER_PACKAGES)}")
    _run(check, "importing deepsparse and onnxruntime in the peer environment")
    LOG.info("peer environment installed in %.0f s", time.perf_counter() - start)
    return python


def ensure_export_deps(root: Path = REPO_ROOT) -> None:
    """Make `onnx` importable in the main Python, which the TorchScript exporter needs to write the file
    even with no custom ops. If it is missing, onnx and protobuf (its only dependency the main
    environment lacks) go into `<root>/.peers/onnx-export` with --no-deps and that folder is appended to
    sys.path, so the shared main environment is left untouched and its packages still take precedence."""
    site = Path(root) / ".peers" / "onnx-export"
    if site.is_dir() and str(site) not in sys.path:
        sys.path.append(str(site))
    try:
        import onnx  # noqa: F401
        return
    except ImportError:
        pass
    LOG.info("installing onnx for the exporter into %s", site)
    _run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-deps", "--target", site,
          "onnx", "protobuf"], "pip install onnx protobuf")
    if str(site) not in sys.path:
        sys.path.append(str(site))
    importlib.invalidate_caches()
    import onnx  # noqa: F401


class _ByName(torch.nn.Module):
    """Calls the model with its inputs as keywords and returns plain tensors. The TorchScript exporter
    pads positional args with every remaining default of `forward`, which collides with transformers'
    config-default decorators ("got multiple values for argument 'use_cache'"), and it cannot name
    outputs inside a ModelOutput."""

    def __init__(self, model: torch.nn.Module, input_names: Sequence[str]):
        super().__init__()
        self.model, self.input_names = model, list(input_names)

    def forward(self, *args):
        out = self.model(**dict(zip(self.input_names, args)))
        return out.to_tuple() if hasattr(out, "to_tuple") else out


def export_onnx(model: torch.nn.Module, example_inputs: tuple, path, input_names: Sequence[str] | None = None,
                output_names: Sequence[str] | None = None) -> Path:
    """Export with the TorchScript exporter (dynamo=False) at opset 17 with fixed shapes: DeepSparse 1.8's
    onnx 1.14 reads opsets up to 19, and it compiles for one static shape anyway. Input names default to
    the leading parameter names of `model.forward`, so the runner can feed `<name>.npy` files by name;
    outputs keep the model's order and, for a transformers ModelOutput, its field names
    (last_hidden_state first)."""
    if input_names is None:
        input_names = list(inspect.signature(model.forward).parameters)[: len(example_inputs)]
    if output_names is None:  # name a ModelOutput's fields instead of leaving "onnx::Gather_1492"
        with torch.no_grad():
            out = model(**dict(zip(input_names, example_inputs)))
        output_names = list(out.keys()) if hasattr(out, "keys") else None
    ensure_export_deps()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(_ByName(model, input_names).eval(), tuple(example_inputs), str(path), dynamo=False,
                          opset_version=17, input_names=list(input_names), output_names=output_names)
    return path


def time_in_peer(python: Path, onnx_path: Path, engine: Literal["deepsparse", "onnxruntime"],
                 inputs: Mapping[str, np.ndarray], threads: int, warmup: int, repeats: int,
                 out_dir: Path | None = None, timeout: float = 1800) -> dict:
    """Time `onnx_path` on `engine` in a subprocess of the peer environment's `python`.

    `inputs` (name -> array, e.g. int64 token ids) are saved as `<out_dir>/inputs/<name>.npy`; out_dir
    defaults to `<onnx file stem>-<engine>` beside the model. Returns the runner's JSON: min_ms,
    median_ms, max_ms, outputs_path (the first output of the first run, .npy), compile_s, version."""
    onnx_path = Path(onnx_path)
    out_dir = Path(out_dir) if out_dir is not None else onnx_path.with_name(f"{onnx_path.stem}-{engine}")
    input_dir = out_dir / "inputs"
    input_dir.mkdir(parents=True, exist_ok=True)
    for stale in input_dir.glob("*.npy"):
        stale.unlink()
    for name, array in inputs.items():
        np.save(input_dir / f"{name}.npy", np.ascontiguousarray(array))
    cmd = [python, RUNNER, "--engine", engine, "--model", onnx_path, "--inputs", input_dir,
           "--threads", threads, "--warmup", warmup, "--repeats", repeats, "--out-dir", out_dir]
    LOG.info("timing %s on %s with %d threads", onnx_path.name, engine, threads)
    proc = _run(cmd, f"{engine} runner", timeout=timeout)
    # The engines may print banners to stdout; the runner's JSON is its last line.
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["outputs_path"] = Path(result["outputs_path"])
    return result


def time_onnx_engines(model: torch.nn.Module, inputs: Mapping[str, torch.Tensor], expected: torch.Tensor,
                      engines: Sequence[str], repeats: int, onnx_path: Path, compile_s: dict) -> dict:
    """Export `model` on `inputs` (name -> tensor, in forward's order) and time it on each engine in the peer
    environment, each first output checked against `expected`; returns engine -> sparsecc.measure.clock.Timing and
    records each engine's compile seconds in `compile_s`."""
    from sparsecc.measure.clock import Timing

    python = ensure_peer_env(REPO_ROOT)
    export_onnx(model, tuple(inputs.values()), onnx_path, input_names=list(inputs))
    feeds = {name: t.numpy() for name, t in inputs.items()}
    results = {}
    for engine in engines:
        r = time_in_peer(python, onnx_path, engine, feeds, threads=torch.get_num_threads(), warmup=3, repeats=repeats)
        torch.testing.assert_close(torch.from_numpy(np.load(r["outputs_path"])), expected, rtol=1e-3, atol=1e-3)
        compile_s[engine] = round(r["compile_s"], 1)
        results[engine] = Timing(r["min_ms"], r["median_ms"], r["max_ms"])
    Path(onnx_path).unlink()
    return results

