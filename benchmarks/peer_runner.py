"""Time one ONNX model on DeepSparse or ONNX Runtime and print one JSON line.

Runs INSIDE the peers virtual environment (see `benchmarks/peers.py`), never in the main Python:
DeepSparse 1.8.0 pins numpy 1.26 and onnx 1.14, which clash with the main environment, so this script
imports only numpy and the engine. It checks nothing itself; it saves the first output of the first
run as `output0.npy` under --out-dir so the caller can compare it with eager PyTorch.

    python peer_runner.py --engine deepsparse --model bert.onnx --inputs inputs/ --threads 2 \\
        --warmup 3 --repeats 10 --out-dir out/
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np

# DeepSparse / SparseZoo otherwise send analytics and a version check over the network on import
# (with nothing reachable these only cost time and warnings). Set before deepsparse is imported.
os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
os.environ.setdefault("NM_VERSION_CHECK", "false")


def load_inputs(path: Path) -> dict[str, np.ndarray]:
    """Named inputs from an .npz file or a directory of `<input name>.npy` files."""
    if path.is_dir():
        return {f.stem: np.load(f) for f in sorted(path.glob("*.npy"))}
    with np.load(path) as archive:
        return {name: archive[name] for name in archive.files}


def ordered(graph_inputs: list[str], inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The arrays in the graph's input order; both engines need exactly the graph's inputs (an exporter
    may drop an input the graph does not use), C-contiguous for DeepSparse."""
    missing = [name for name in graph_inputs if name not in inputs]
    if missing:
        raise SystemExit(f"inputs {missing} missing; given {sorted(inputs)}, graph wants {graph_inputs}")
    return [np.ascontiguousarray(inputs[name]) for name in graph_inputs]


def deepsparse_session(model: str, inputs: dict[str, np.ndarray], threads: int) -> tuple[Callable, str]:
    import deepsparse

    engine = deepsparse.compile_model(model, batch_size=1, num_cores=threads)
    arrays = ordered(engine.input_names, inputs)
    return (lambda: engine.run(arrays)), deepsparse.__version__


def onnxruntime_session(model: str, inputs: dict[str, np.ndarray], threads: int) -> tuple[Callable, str]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1  # one request at a time, like the other candidates
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    feed = dict(zip(names, ordered(names, inputs)))
    return (lambda: session.run(None, feed)), ort.__version__


ENGINES = {"deepsparse": deepsparse_session, "onnxruntime": onnxruntime_session}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", required=True, choices=sorted(ENGINES))
    parser.add_argument("--model", required=True, type=Path, help="the .onnx file")
    parser.add_argument("--inputs", required=True, type=Path, help=".npz, or a directory of <name>.npy")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out-dir", required=True, type=Path)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    start = time.perf_counter()
    run, version = ENGINES[args.engine](str(args.model), load_inputs(args.inputs), args.threads)
    compile_s = time.perf_counter() - start

    args.out_dir.mkdir(parents=True, exist_ok=True)
    outputs_path = args.out_dir / "output0.npy"
    np.save(outputs_path, run()[0])  # the first run doubles as the first warm-up run
    for _ in range(args.warmup - 1):
        run()
    samples = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        run()
        samples.append((time.perf_counter() - t0) * 1e3)

    print(json.dumps({"engine": args.engine, "version": version, "threads": args.threads,
                      "compile_s": round(compile_s, 2), "min_ms": min(samples),
                      "median_ms": statistics.median(samples), "max_ms": max(samples),
                      "outputs_path": str(outputs_path.resolve())}), flush=True)


if __name__ == "__main__":
    main()
