"""Where kernels are measured: this process or TVM RPC servers. Part of the measurement service (sparsecc/measure/):
kernels are built here, run where the target is, checked against the eager reference, and timed with its clock.

- here, as a kernel runs inside a model whose dense work stays in PyTorch: the median of `CONTEXT_RUNS` calls, each
  right after a PyTorch matmul (codegen/tuning/__init__.py says why back-to-back timings mislead);
- on an RPC server (no PyTorch there): TVM's time_evaluator, the fastest of `REPEAT` repeats of at least
  `MIN_REPEAT_MS` each.
`KernelTimer` is the short form the cost model's calibration and the planner use: build a layer shape's kernel once,
time it on weights of that shape.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import logging
import os
import tempfile
import time
import warnings
from typing import Any, Sequence

import numpy as np
import torch
import tvm

from sparsecc.codegen.converters import SparseLinearSpec
from sparsecc.codegen.targets import configure_threads, runs_here
from sparsecc.codegen.tuning.space import spec_default
from sparsecc.codegen.tuning.tasks import KernelTask
from sparsecc.errors import SparseccError
from sparsecc.kernel_work import KernelKnobs
from sparsecc.measure.clock import Fastest, median_seconds
from sparsecc.settings import RpcSettings
from sparsecc.tolerances import TOLERANCES

log = logging.getLogger(__name__)

MIN_REPEAT_MS = 10  # RPC timing: time_evaluator's repeats
REPEAT = 5
CONTEXT_RUNS = 25  # local timing: calls, each after a PyTorch op of x times a CONTEXT_FEATURES x k matrix
CONTEXT_FEATURES = 256
FUNC = "kernel"


@dataclasses.dataclass
class Candidate:
    knobs: KernelKnobs
    executable: Any  # tvm.runtime.Executable
    library: str | None = None  # exported file, for RPC


class _Counter:
    """Kernel timings taken (time_evaluator calls; tests check a cached compile takes none), candidates built,
    and the seconds spent on each."""

    def __init__(self) -> None:
        self.count = 0
        self.timing_seconds = 0.0
        self.builds = 0
        self.build_seconds = 0.0


MEASUREMENTS = _Counter()


def build_candidate(spec: SparseLinearSpec, knobs: KernelKnobs, target: tvm.target.Target) -> Candidate:
    start = time.perf_counter()
    func = spec.kernel(knobs).with_attr("global_symbol", FUNC)
    cand = Candidate(knobs, tvm.compile(tvm.IRModule({FUNC: func}), target=target))
    MEASUREMENTS.builds += 1
    MEASUREMENTS.build_seconds += time.perf_counter() - start
    return cand


class _Device:
    """One place to run kernels: this process, or one RPC session. Holds the task's arrays there."""

    def __init__(self, name: str, device: Any, session: Any = None):
        self.name = name
        self.device = device
        self.session = session
        self.loaded: dict[KernelKnobs, Any] = {}
        self.arrays: list[Any] = []
        self.task: KernelTask | None = None

    def prepare(self, task: KernelTask, inputs: Sequence[np.ndarray]) -> None:
        if self.task is task:
            return
        self.loaded.clear()
        self.arrays = [tvm.runtime.tensor(a, self.device) for a in inputs]
        self.out = tvm.runtime.tensor(np.zeros((task.spec.m, task.spec.n), dtype=inputs[0].dtype), self.device)
        self.task = task  # held, not its id: a freed task's id is reused by the next one
        if self.session is None:  # the PyTorch op run before each timed kernel (see `time_us`)
            x = torch.from_numpy(inputs[0])
            self.torch_op = (x, torch.randn(CONTEXT_FEATURES, x.shape[1], dtype=x.dtype))

    def module(self, cand: Candidate) -> Any:
        if cand.knobs not in self.loaded:
            if self.session is None:
                self.loaded[cand.knobs] = cand.executable.jit()
            else:
                name = os.path.basename(cand.library)
                self.session.upload(cand.library)
                self.loaded[cand.knobs] = self.session.load_module(name)
        return self.loaded[cand.knobs]

    def run(self, cand: Candidate) -> np.ndarray:
        self.module(cand)[FUNC](*self.arrays, self.out)
        return self.out.numpy()

    def time_us(self, cand: Candidate) -> float:
        """Here: the median over CONTEXT_RUNS calls, each right after a PyTorch op, as inside a model whose
        dense work stays in PyTorch. On an RPC server (no PyTorch there): TVM's time_evaluator, the fastest of
        REPEAT back-to-back repeats of at least MIN_REPEAT_MS."""
        start = time.perf_counter()
        if self.session is None:
            func = self.module(cand)[FUNC]
            x, w = self.torch_op
            with torch.no_grad():
                result = median_seconds(lambda: func(*self.arrays, self.out), CONTEXT_RUNS, warmup=0,
                                        before=lambda: torch.nn.functional.linear(x, w)) * 1e6
        else:
            evaluator = self.module(cand).time_evaluator(FUNC, self.device, number=1, repeat=REPEAT,
                                                         min_repeat_ms=MIN_REPEAT_MS)
            result = min(evaluator(*self.arrays, self.out).results) * 1e6
        MEASUREMENTS.count += 1
        MEASUREMENTS.timing_seconds += time.perf_counter() - start
        return result


class DeviceLost(SparseccError):
    """An RPC server went away in the middle of a measurement: the search stops (what it measured of that kernel
    is not stored as if the search had finished)."""


def _alive(dev: _Device) -> bool:
    """Whether `dev` still answers: a candidate that failed leaves its session working, a dead server does not."""
    if dev.session is None:
        return True  # this process
    try:
        dev.session.get_function("runtime.NumThreads")()
    except Exception:  # noqa: BLE001  (any failure to answer means the session is unusable)
        return False
    return True


class Runner:
    """Measures candidates of one task on its devices; more than one device measure in parallel threads."""

    description = "local"

    def __init__(self, devices: list[_Device], target: tvm.target.Target, export: bool = False):
        self.devices = devices
        self.target = target
        self.export = export
        self._tmp = tempfile.TemporaryDirectory(prefix="sparsecc-tune-") if export else None
        self._pool = (concurrent.futures.ThreadPoolExecutor(len(devices), thread_name_prefix="sparsecc-tune")
                      if len(devices) > 1 else None)

    @property
    def parallel(self) -> int:
        return len(self.devices)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
        for dev in self.devices:
            dev.loaded.clear()
            dev.session = None
        if self._tmp is not None:
            self._tmp.cleanup()

    def build(self, spec: SparseLinearSpec, knobs: KernelKnobs) -> Candidate:
        cand = build_candidate(spec, knobs, self.target)
        if self.export:
            ext = ".so" if runs_here(self.target) else ".tar"
            digest = hashlib.sha1(repr((spec, knobs)).encode()).hexdigest()[:16]
            cand.library = os.path.join(self._tmp.name, f"sparsecc_{digest}{ext}")
            cand.executable.export_library(cand.library)
        return cand

    def measure(self, task: KernelTask, inputs: Sequence[np.ndarray], expected: np.ndarray,
                cands: Sequence[Candidate]) -> list[float | None]:
        """Time of each candidate in microseconds, None when it failed or computed a wrong result."""
        tol = TOLERANCES.get(getattr(torch, task.spec.dtype), {})

        def one(dev: _Device, cand: Candidate) -> float | None:
            try:
                dev.prepare(task, inputs)
                got = dev.run(cand)
                if not np.allclose(got, expected, rtol=tol.get("rtol", 1e-5), atol=tol.get("atol", 1e-5)):
                    worst = float(np.max(np.abs(got - expected)))
                    warnings.warn(f"sparsecc tune: {task.spec.name} with {cand.knobs} differs from the reference "
                                  f"(max abs error {worst:.3g}); candidate dropped", stacklevel=2)
                    return None
                return dev.time_us(cand)
            except Exception as exc:  # a candidate that fails to load or run is dropped, not fatal
                if not _alive(dev):  # ... unless the server is gone: every later candidate would "fail" too
                    raise DeviceLost(f"the RPC server behind {dev.name} stopped answering ({type(exc).__name__}: "
                                     f"{exc})") from exc
                log.warning("tune: %s with %s failed on %s: %s", task.spec.name, cand.knobs, dev.name, exc)
                return None

        if self._pool is None:
            return [one(self.devices[0], c) for c in cands]
        # Each device measures its share of the batch in order; devices run in parallel.
        shares = [list(range(i, len(cands), len(self.devices))) for i in range(len(self.devices))]

        def share(i: int) -> list[tuple[int, float | None]]:
            return [(j, one(self.devices[i], cands[j])) for j in shares[i]]

        results: list[float | None] = [None] * len(cands)
        for part in self._pool.map(share, range(len(self.devices))):
            for j, t in part:
                results[j] = t
        return results

    def confirm(self, task: KernelTask, inputs: Sequence[np.ndarray], cands: Sequence[Candidate],
                rounds: int) -> list[float]:
        """The candidates timed again, interleaved, on one device: the fastest of `rounds` timings each."""
        dev = self.devices[0]
        dev.prepare(task, inputs)
        best = Fastest().rounds({i: (lambda c=cand: dev.time_us(c)) for i, cand in enumerate(cands)}, rounds)
        return [best[i] for i in range(len(cands))]


def local_runner(target: tvm.target.Target, threads: int) -> Runner:
    configure_threads(threads)
    return Runner([_Device("local", tvm.cpu())], target)


def rpc_runner(rpc: RpcSettings, target: tvm.target.Target, threads: int) -> Runner:
    """Sessions from the tracker, one per `rpc.sessions`."""
    from tvm import rpc as tvm_rpc

    host, port = rpc.address
    try:
        tracker = tvm_rpc.connect_tracker(host, port)
    except Exception as exc:
        raise SparseccError(f"tune: cannot reach the RPC tracker at {rpc.tracker}: {exc}") from exc
    devices = []
    try:
        # A request for a key no server has waits forever in the tracker's queue: check first.
        servers = sum(1 for info in tracker.summary().get("server_info", [])
                      if str(info.get("key", "")).split(":", 1)[-1] == rpc.key)
    except Exception as exc:
        tracker.close()
        raise SparseccError(f"tune: the RPC tracker at {rpc.tracker} did not answer: {exc}") from exc
    if servers == 0:
        tracker.close()
        raise SparseccError(f"tune: no RPC server is registered with key {rpc.key!r} at the tracker {rpc.tracker}")
    if servers < rpc.sessions:
        log.warning("tune: %d sessions asked for, %d servers registered with key %r; using %d", rpc.sessions,
                    servers, rpc.key, servers)
    try:
        for i in range(min(rpc.sessions, servers)):
            sess = tracker.request(rpc.key, priority=rpc.priority, session_timeout=rpc.session_timeout)
            _check_remote(sess, target, threads)
            devices.append(_Device(f"rpc:{rpc.key}#{i}", sess.cpu(0), sess))
    except Exception as exc:
        raise SparseccError(f"tune: could not get {rpc.sessions} session(s) with key {rpc.key!r} from the tracker at "
                            f"{rpc.tracker}: {exc}") from exc
    finally:
        tracker.close()
    runner = Runner(devices, target, export=True)
    runner.description = f"rpc:{rpc.tracker}/{rpc.key}"
    return runner


_GENERIC_CPUS = ("", "generic", "x86-64", "x86-64-v2", "x86-64-v3", "x86-64-v4")


def _check_remote(sess: Any, target: tvm.target.Target, threads: int) -> None:
    # TVM sizes a server's pool from TVM_NUM_THREADS (else half the hardware threads) when it starts; the call
    # that resizes it takes a CPU list, which RPC cannot pass. So the server has to be started right.
    try:
        used = int(sess.get_function("runtime.NumThreads")())
        if used != threads:
            warnings.warn(f"sparsecc tune: the RPC server runs kernels on {used} threads, the target on {threads}; "
                          f"start the servers with TVM_NUM_THREADS={threads}", stacklevel=3)
    except Exception as exc:
        log.warning("tune: could not ask the RPC server for its thread count: %s", exc)
    try:
        remote_cpu = str(sess.get_function("target.llvm_get_system_cpu")())
    except Exception:
        return
    mcpu = str(target.attrs.get("mcpu", ""))
    if mcpu not in _GENERIC_CPUS and remote_cpu != mcpu:
        warnings.warn(f"sparsecc tune: kernels are built for CPU {mcpu!r} but the RPC server's CPU is {remote_cpu!r}; "
                      "the timings may not hold on the target", stacklevel=3)


class KernelTimer:
    """Builds sparsecc's kernel for a layer shape once and times it on weights of that shape (calibration, the
    planner's candidate timing, benchmarks)."""

    def __init__(self, target, threads: int):
        self.runner = local_runner(target, threads)
        self._built: dict = {}

    def seconds(self, weight: torch.Tensor, tokens: int, block: tuple[int, int],
                activation: str = "none", ell: bool = False) -> tuple[float, int]:
        """(seconds, stored blocks) of the kernel on `weight` (`ell`: packed with rows padded to one length),
        checked against the eager reference."""
        task = KernelTask.from_weight(weight, tokens, block, activation=activation, ell=ell)
        if task.spec not in self._built:
            self._built[task.spec] = self.runner.build(task.spec, spec_default(task.spec))
        inputs = task.inputs()
        us = self.runner.measure(task, inputs, task.reference(inputs), [self._built[task.spec]])[0]
        if us is None:
            raise RuntimeError(f"the {block[0]}x{block[1]} kernel for {task.spec.name} failed or disagreed with the "
                               "eager reference")
        return us * 1e-6, task.stored_blocks

    def close(self) -> None:
        self.runner.close()
