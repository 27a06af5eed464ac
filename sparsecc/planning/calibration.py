"""The cost model's micro-benchmark: measures this machine once per target and thread count, fits the machine model
(sparsecc/planning/cost_model.py) and stores it in the cache (`<cache dir>/machines/`), where later compiles find it.

What it measures (about 30 s on 2 cores; every figure the fastest of ROUNDS rounds):
- read bandwidth for working sets from 256 KiB to 32 MiB (a PyTorch sum over a tensor of that size);
- PyTorch's dense matmul at 1 to 256 tokens (its multiply-add rate) and on a tiny matrix (its call overhead);
- sparsecc's sparse kernel for each block shape the planner can choose, on a few layers that exercise each term
  of the model: 1 to 512 tokens, x^T inside and outside L2, three densities. Layers of one shape share one kernel,
  so each (shape, tokens, block) is built once and timed at every density.
The fit is a least-squares fit with non-negative coefficients of relative error, so small layers weigh as much as
big ones.

    python -m sparsecc.planning.calibration            # calibrate again, store it in the cache and print it
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

import sparsecc
from sparsecc.cache import default_cache_dir
from sparsecc.kernel_work import TEMPLATE_VERSION
from sparsecc.planning.cost_model import (BLOCK_TERMS, MODEL_VERSION, REFERENCE, SHARED_TERMS, BlockCoefficients,
                                 MachineModel, block_key, predict_dense, predict_sparse, sparse_work)
from sparsecc.measure.clock import Fastest
from sparsecc.measure.dense import dense_linear_seconds, seconds_to_sum
from sparsecc.progress import progress_bar
from sparsecc.settings import Settings

log = logging.getLogger(__name__)

# Block shapes the planner chooses from (passes/analyze_weights.BLOCK_SHAPES) and CSR.
BLOCKS = ((1, 1), (1, 4), (4, 1), (8, 1), (16, 1), (4, 4), (8, 8))
# (out, in, tokens) of the calibration layers, and the densities of stored blocks each is timed at.
LAYERS = ((512, 512, 1), (2048, 1024, 1), (512, 512, 8), (2048, 1024, 8), (512, 512, 32), (1024, 2048, 128),
          (256, 2048, 128), (1024, 1024, 512))
DENSITIES = (0.05, 0.3, 0.7)
BANDWIDTH_SIZES = (1 << 18, 1 << 20, 1 << 22, 1 << 25)
DENSE_TOKENS = (1, 4, 16, 64, 256)
ROUNDS = 2

_memo: dict[str, MachineModel] = {}
_lock = threading.Lock()


def machine_key(target_text: str, threads: int) -> str:
    parts = (target_text, threads, MODEL_VERSION, TEMPLATE_VERSION, sparsecc.__version__, torch.__version__)
    return hashlib.sha1(repr(parts).encode()).hexdigest()[:20]


def machine_model(settings: Settings) -> MachineModel:
    """The calibrated model of the machine `settings` target, from memory, the cache, or a new calibration. Targets
    that do not run here get the reference figures. `settings` resolved (`Settings.resolved`)."""
    from sparsecc.codegen.targets import runs_here, target_of

    threads = settings.threads
    target = target_of(settings)
    if not runs_here(target):
        return REFERENCE
    key = machine_key(str(target), threads)
    with _lock:
        if key in _memo:
            return _memo[key]
        path = _cache_path(settings.cache_dir, key)
        model = _read(path, threads)
        if model is None:
            log.info("calibrating the cost model for %s with %d threads (once; stored in %s)", target, threads, path)
            model = calibrate(target, threads)
            _write(path, model)
        _memo[key] = model
        return model


def _cache_path(cache_dir: str | None, key: str) -> Path:
    return default_cache_dir(cache_dir) / "machines" / f"{key}.json"


def _read(path: Path, threads: int | None = None) -> MachineModel | None:
    """The calibration stored at `path`, or None: none there, or one that cannot be used (truncated, not JSON, of
    another shape, for another thread count), which is measured again with a warning naming the file."""
    try:
        text = path.read_text()
    except (FileNotFoundError, NotADirectoryError):  # none stored (NotADirectory: a file where machines/ would be)
        return None
    except (OSError, ValueError) as exc:  # unreadable file, or bytes that are not UTF-8
        log.warning("cost model: ignoring unreadable calibration %s (%s); measuring again", path, exc)
        return None
    try:
        model = MachineModel.from_json(text)
        _check(model, threads)
    # from_json of arbitrary JSON fails with any of these (a list has no .pop, a number no keys, ...)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("cost model: ignoring unreadable calibration %s (%s: %s); measuring again", path,
                    type(exc).__name__, exc)
        return None
    return model


def _check(model: MachineModel, threads: int | None) -> None:
    """ValueError where a stored model is not one `calibrate` could have written: JSON of the right keys can still
    hold strings, negative or non-finite figures, which would make every prediction (and so the plan) wrong."""
    def figure(name: str, value, positive: bool = False) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
                value <= 0 if positive else value < 0):
            raise ValueError(f"{name} is {value!r}, not a {'positive' if positive else 'non-negative'} number")

    if model.calibrated is not True or not isinstance(model.description, str):
        raise ValueError("not a calibration")
    for name in ("threads", "lanes", "l2_bytes"):
        if not isinstance(getattr(model, name), int):
            raise ValueError(f"{name} is {getattr(model, name)!r}, not an integer")
        figure(name, getattr(model, name), positive=True)
    if threads is not None and model.threads != threads:
        raise ValueError(f"measured with {model.threads} threads, not {threads}")
    for name in ("bandwidth", "dense_rate"):
        points = getattr(model, name)
        if not points or any(len(p) != 2 for p in points):
            raise ValueError(f"{name} is not a list of (size, rate) pairs")
        for x, y in points:
            figure(name, x, positive=True)
            figure(name, y, positive=True)
        if any(a[0] >= b[0] for a, b in zip(points, points[1:])):
            raise ValueError(f"{name} is not in increasing order")
    for name in ("dense_overhead", "launch", "transpose", "output", "spill"):
        figure(name, getattr(model, name))
    if not isinstance(model.blocks, dict) or not model.blocks:
        raise ValueError("no block coefficients")
    for key, coefficients in model.blocks.items():
        for field in dataclasses.fields(coefficients):
            figure(f"blocks[{key}].{field.name}", getattr(coefficients, field.name))


def _write(path: Path, model: MachineModel) -> None:
    """Store `model` at `path` whole or not at all: written to a temporary file beside it, flushed to disk, then
    renamed over it, so a process killed (or a disk filling) mid-write never leaves half a calibration there."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".calibration-", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(model.to_json())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:  # a read-only or full cache costs a calibration per process, nothing else
        log.warning("cost model: could not store the calibration in %s (%s); each process will measure it again. "
                    "Make %s writable, with free space, or set SPARSECC_CACHE_DIR (the cache_dir option) to a "
                    "directory that is.", path, exc, path.parent)
    finally:
        if tmp is not None:  # the half-written temporary file, not left to fill the disk further
            with contextlib.suppress(OSError):
                os.unlink(tmp)


# ------------------------------------------------------------------------------------------------ measurement

def random_blocked(n: int, k: int, block: tuple[int, int], density: float, seed: int = 0) -> torch.Tensor:
    """An (n, k) weight where each r x c block is kept (fully non-zero) with probability `density`."""
    r, c = block
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(n // r, k // c, generator=g) < density
    mask = keep.repeat_interleave(r, 0).repeat_interleave(c, 1)
    return torch.randn(n, k, generator=g) * mask


# --------------------------------------------------------------------------------------------------- fitting

def _nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Least squares with coefficients >= 0: refit without the columns that came out negative."""
    active = np.ones(a.shape[1], dtype=bool)
    x = np.zeros(a.shape[1])
    for _ in range(a.shape[1]):
        sol, *_ = np.linalg.lstsq(a[:, active], b, rcond=None)
        x[:] = 0
        x[active] = sol
        if (sol >= 0).all():
            break
        active[np.flatnonzero(active)[sol < 0]] = False
    return np.clip(x, 0, None)


def fit_sparse(base: MachineModel, samples: list[tuple[int, int, int, tuple[int, int], int, float]]) -> MachineModel:
    """Fit the kernel's coefficients to samples (n, k, tokens, block, stored blocks, seconds)."""
    blocks = sorted({s[3] for s in samples})
    cols = list(SHARED_TERMS) + [f"{block_key(b)}.{f}" for b in blocks for f in BLOCK_TERMS]
    a = np.zeros((len(samples), len(cols)))
    rhs = np.zeros(len(samples))
    for i, (n, k, tokens, block, stored, seconds) in enumerate(samples):
        w = sparse_work(base, n, k, tokens, block, stored)
        row = {price: getattr(w, work) for price, work in SHARED_TERMS.items()}
        row.update({f"{block_key(block)}.{price}": getattr(w, work) for price, work in BLOCK_TERMS.items()})
        a[i] = [row.get(c, 0.0) for c in cols]
        rhs[i] = max(seconds - w.stream_seconds, 0.0)
        a[i] /= seconds  # relative error
        rhs[i] /= seconds
    x = dict(zip(cols, _nnls(a, rhs)))
    coeffs = {block_key(b): BlockCoefficients(**{f: x[f"{block_key(b)}.{f}"] for f in BLOCK_TERMS}) for b in blocks}
    return dataclasses.replace(base, blocks=coeffs, **{price: x[price] for price in SHARED_TERMS})


def _cache_bytes(level: int, default: int) -> int:
    try:
        text = Path(f"/sys/devices/system/cpu/cpu0/cache/index{level}/size").read_text().strip()
        return int(text[:-1]) * 1024 if text.endswith("K") else int(text)
    except (OSError, ValueError):
        return default


def _lanes(target) -> int:
    from sparsecc.codegen.targets import cpu_features

    features = set(cpu_features(target))
    if "avx512f" in features:
        return 16
    if "avx" in features or "avx2" in features:
        return 8
    return 4  # SSE, NEON


def calibrate(target, threads: int, progress: bool = True) -> MachineModel:
    from sparsecc.codegen.tuning.runners import KernelTimer

    start = time.perf_counter()
    steps = len(BANDWIDTH_SIZES) + len(DENSE_TOKENS) + 1 + len(BLOCKS) * len(LAYERS)
    update, close = progress_bar(ROUNDS * steps, "sparsecc calibrate", "step") if progress else (
        lambda n, s: None, lambda: None)
    # Every figure is the fastest of ROUNDS rounds: load from other processes only ever adds time, and it must not
    # tilt the comparison of dense and sparse figures measured seconds apart.
    best = Fastest()
    keep = best.keep
    timer = KernelTimer(target, threads)
    stored: dict[tuple, int] = {}
    try:
        for _ in range(ROUNDS):
            for size in BANDWIDTH_SIZES:
                keep(("bandwidth", size), seconds_to_sum(size))
                update(1, "bandwidth")
            keep(("overhead",), dense_linear_seconds(8, 8, 1))
            update(1, "dense")
            for tokens in DENSE_TOKENS:
                keep(("dense", tokens), dense_linear_seconds(1024, 1024, tokens))
                update(1, "dense")
            for block in BLOCKS:
                for n, k, tokens in LAYERS:
                    for i, density in enumerate(DENSITIES):
                        key = (n, k, tokens, block, density)
                        seconds, stored[key] = timer.seconds(random_blocked(n, k, block, density, i), tokens, block)
                        keep(key, seconds)
                    update(1, block_key(block))
    finally:
        timer.close()
        close()
    overhead = best[("overhead",)]
    base = dataclasses.replace(
        REFERENCE, description=f"{target} ({threads} threads)", calibrated=True, threads=threads,
        lanes=_lanes(target), l2_bytes=_cache_bytes(2, 1 << 20),
        bandwidth=tuple((size, size / best[("bandwidth", size)]) for size in BANDWIDTH_SIZES),
        dense_rate=tuple((t, 1024 * 1024 * t / max(best[("dense", t)] - overhead, 1e-9)) for t in DENSE_TOKENS),
        dense_overhead=overhead)
    samples = [(*key[:4], stored[key], best[key]) for key in stored]  # key: (n, k, tokens, block, density)
    model = fit_sparse(base, samples)
    errors = [abs(predict_sparse(model, n, k, t, b, s) / sec - 1) for n, k, t, b, s, sec in samples]
    log.info("cost model calibrated in %.1f s; sparse kernel fit: median error %.0f %%, worst %.0f %%",
             time.perf_counter() - start, 100 * statistics.median(errors), 100 * max(errors))
    return model


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from sparsecc.codegen.targets import host_target

    threads = torch.get_num_threads()
    target = host_target(threads)
    model = calibrate(target, threads)
    key = machine_key(str(target), threads)
    _write(_cache_path(None, key), model)
    _memo[key] = model
    print(model.to_json())  # the command's output
    for n, k in ((768, 768), (3072, 768), (768, 3072)):
        for tokens in (1, 128):
            print(f"{n}x{k} x {tokens} tokens: dense {predict_dense(model, n, k, tokens) * 1e6:.0f} us")


if __name__ == "__main__":
    main()
