"""Autotuning of the sparse kernel template (codegen/kernels/bsr.py), remembered in a persistent database.

With the `tune` option (`{"trials": 16}`), the lower stage calls `tune_graph` before building: each distinct
sparse kernel of the graph gets its knobs (`KernelKnobs`) from the tuning database (sparsecc/tuning_db.py) or,
when the database has nothing tuned with at least that many trials, from a search measured here or on TVM RPC
servers. The chosen knobs go into the sparse_linear nodes' meta (`KNOBS_META`), where the converter reads them.

Why a search over the template's knobs and not meta_schedule
------------------------------------------------------------
- meta_schedule tunes by rewriting a schedulable (block-structured) PrimFunc with its schedule rules. The kernel
  here is hand-written TIR: its loops, tiles, unrolling and parallel split are written out, with no blocks for
  the rules to act on. Checked: meta_schedule's design space for the 128 x 768 x 768 CSR kernel
  (TuneContext(space_generator="post-order-apply").generate_design_space()) is one schedule with zero
  instructions, i.e. nothing to search, and producing it took 17 s here. Exposing the knobs to it would mean
  rewriting the kernel as block-structured compute plus a custom schedule rule per knob, and paying its builder.
- Cost per candidate with the knob search, this 2-core machine, the six BERT-base kernels of
  benchmarks/tuned_kernels.py (32 trials each): 0.30 s a candidate all in (114 candidates in 35 s), of which
  0.12 s is building the PrimFunc alone (TVMScript + `tvm.compile` of a one-function module) and 0.07 s each
  timing; the rest is the correctness check and the confirmation timings. meta_schedule as measured on this
  project (shared tvm-notes): about 10 s a candidate with its default builder (each builder process imports
  tvm.s_tir.tensor_intrin, 40 s), 0.44 s with a custom builder, 2.2 s a trial end to end (32 trials in 70 s).
- Result: tuned kernels 1.09-1.51x faster than untuned on four of the six BERT-base kernels at 90 % sparsity,
  no change on the two 768 x 768 ones (benchmarks/tuned_kernels.py; run-to-run noise is about 5 %).

What is searched
----------------
KernelKnobs: token tile (4-128 tokens), output rows per parallel task (2-64, the thread split), token tiles
inside or outside the parallel loop, accumulator chains (1-8, the unrolling of the non-zero loop into
independent FMA chains). Only combinations whose accumulators fit the stack are kept (see
`KernelKnobs.fits`), and equivalent ones (a tile longer than the token count, fewer rows than one
block-row, ...) are merged: at 128 tokens, fp32, 210 candidates for CSR, 100 for 4 x 1 blocks, 18 for 16 x 1.
`trials` candidates are measured: first the defaults (and a stored best, when the database holds a shorter
search), then rounds of all unmeasured neighbours of the best so far (one knob one step away), and random
candidates when no neighbour is left. The block shape is not a
knob here: the planner chose it, and the weight is packed in it before lowering.

Measurement
-----------
Each candidate is built alone, run once and checked against the eager reference of sparse_linear on the layer's
real packed weight (a candidate that disagrees is dropped with a warning), then timed:
- here, as it will run inside a model whose dense work stays in PyTorch: `CONTEXT_RUNS` calls, each right
  after a PyTorch matmul, median. TVM's time_evaluator runs the kernel back to back instead, and that hides
  most of what differs inside a model. 768 x 3072, CSR, 90 %, medians of 4 rounds: back to back, the defaults
  (tile 32, 8 rows, token-outer, 4 chains) took 0.84 ms, the same without token-outer 0.91 ms, and tile 64,
  32 rows, 2 chains, token-outer 0.81 ms; interleaved with a dense PyTorch Linear (as the benchmark and a
  model run them) 1.10, 0.99 and 0.88 ms: the order of the first two flips and the best gains 20 % instead
  of 4 %. The kernel's parallel loops meet PyTorch's OpenMP threads still spinning on the cores; token-outer
  has one parallel loop per token tile, so it pays that more often (docs/design.md, Threads).
- on an RPC server, with TVM's time_evaluator (no PyTorch there): the fastest of `REPEAT` repeats of at least
  `MIN_REPEAT_MS` each (interference only ever adds time).
At the end the `CONFIRM_TOP` fastest and the defaults are timed again, interleaved, `CONFIRM_ROUNDS` times
(fastest of the rounds); the defaults stay unless a candidate beats them by `KEEP_DEFAULT_MARGIN` (knob sets
within a few % of each other, e.g. at 768 x 768 with 16 x 1 blocks, swap places from run to run). Noise on this
shared machine is large (identical kernels measured up to 2x apart under load), which is why the confirmation
exists.

Which layer a shared kernel is tuned on
---------------------------------------
Layers of one shape share one kernel (design.md, point 5), but their patterns differ. A kernel gets one knob set,
tuned on the layer of its group with the most stored blocks (the slowest; the others are alike in the models
seen, random or magnitude pruning at one density), and the database key carries that layer's pattern hash.

Distributed measurement
-----------------------
With `tune={"trials": N, "rpc": {"tracker": "host:9190", "key": "cpu", "sessions": 4}}` candidates are built
here and measured on RPC servers registered with a TVM tracker under that key (`python -m tvm.exec.rpc_tracker`,
`TVM_NUM_THREADS=<cores> python -m tvm.exec.rpc_server --tracker host:9190 --key cpu` on each machine): each
candidate library is exported (a .so, or a .tar the server links when the target is another architecture),
uploaded, loaded and timed on the server's CPU with tensors created there. `sessions` servers measure at
once, each batch of candidates spread over them. The servers must be machines of the target's kind.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import logging
import os
import random
import tempfile
import time
import warnings
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import tvm
from torch import fx

import sparsecc
from sparsecc.codegen.converters import KNOBS_META, SparseLinearSpec
from sparsecc.codegen.kernels.bsr import TEMPLATE, TEMPLATE_VERSION, KernelKnobs, default_knobs
from sparsecc.errors import SparseccError
from sparsecc.ops import SPARSE_OPS, sparse_linear_args
from sparsecc.passes.graph_utils import constant_of
from sparsecc.progress import progress_bar
from sparsecc.settings import RpcSettings, Settings, TuneSettings
from sparsecc.tolerances import TOLERANCES
from sparsecc.tuning_db import TuningDatabase, TuningKey, TuningRecord

log = logging.getLogger(__name__)

TILES = (4, 8, 16, 32, 64, 128)
ROWS = (2, 4, 8, 16, 32, 64)
CHAINS = (1, 2, 4, 8)

MIN_REPEAT_MS = 10  # RPC timing: time_evaluator's repeats
REPEAT = 5
CONTEXT_RUNS = 25  # local timing: calls, each after a PyTorch op of x times a CONTEXT_FEATURES x k matrix
CONTEXT_FEATURES = 256
CONFIRM_TOP = 3
CONFIRM_ROUNDS = 5
KEEP_DEFAULT_MARGIN = 0.05
FUNC = "kernel"


# ----------------------------------------------------------------------------------------------- search space

def canonical(knobs: KernelKnobs, spec: SparseLinearSpec) -> KernelKnobs:
    """The same kernel as `knobs` generates, with knobs that do nothing for this shape normalised away."""
    r = spec.block[0]
    tile = min(knobs.token_tile, spec.m)
    group = min(max(1, knobs.rows_per_task // r), spec.n // r)
    outer = knobs.token_outer and not knobs.token_split and (spec.m + tile - 1) // tile > 1
    return KernelKnobs(token_tile=tile, rows_per_task=group * r, token_outer=outer, chains=knobs.chains,
                       token_split=knobs.token_split)


def candidate_space(spec: SparseLinearSpec, threads: int | None = None) -> list[KernelKnobs]:
    """Every distinct knob set for this kernel whose accumulators fit the stack, defaults (for `threads`) first."""
    seen: dict[KernelKnobs, None] = {spec_default(spec, threads): None}
    for tile in TILES:
        for rows in ROWS:
            for outer, split in ((False, False), (True, False), (False, True)):
                for chains in CHAINS:
                    knobs = canonical(KernelKnobs(tile, rows, outer, chains, split), spec)
                    if knobs.fits(spec.block, spec.dtype):
                        seen.setdefault(knobs, None)
    return list(seen)


def spec_default(spec: SparseLinearSpec, threads: int | None = None) -> KernelKnobs:
    return canonical(spec.default_knobs(threads), spec)


def neighbours(knobs: KernelKnobs, space: Sequence[KernelKnobs]) -> list[KernelKnobs]:
    """Candidates one knob one step away: for each knob, the nearest smaller and larger value among the
    candidates equal in all other knobs."""
    out = []
    for field in dataclasses.fields(KernelKnobs):
        name = field.name
        here = getattr(knobs, name)
        others = [c for c in space if c != knobs and all(getattr(c, f.name) == getattr(knobs, f.name)
                                                          for f in dataclasses.fields(KernelKnobs) if f.name != name)]
        below = [c for c in others if getattr(c, name) < here]
        above = [c for c in others if getattr(c, name) > here]
        if below:
            out.append(max(below, key=lambda c: getattr(c, name)))
        if above:
            out.append(min(above, key=lambda c: getattr(c, name)))
    return out


# ------------------------------------------------------------------------------------------------------ tasks

@dataclasses.dataclass
class KernelTask:
    """One kernel to tune, with the packed weight of the layer it is measured on."""

    spec: SparseLinearSpec
    indptr: torch.Tensor
    indices: torch.Tensor
    values: torch.Tensor
    bias: torch.Tensor | None = None
    layers: tuple[str, ...] = ()  # the graph nodes sharing the kernel
    nodes: tuple[fx.Node, ...] = ()

    @classmethod
    def from_weight(cls, weight: torch.Tensor, tokens: int, block: tuple[int, int] = (1, 1),
                    bias: torch.Tensor | None = None, activation: str = "none", residual: bool = False,
                    ell: bool = False) -> "KernelTask":
        """A task for `weight` (out x in, dense with zeros) applied to `tokens` rows, packed like the rewrite does
        (`ell`: block-rows padded to one length)."""
        from sparsecc.packing import pack_blocks, pack_ell, uniform_row_blocks

        indptr, indices, values = (pack_ell if ell else pack_blocks)(weight, block)
        spec = SparseLinearSpec(tokens, weight.shape[0], weight.shape[1], tuple(block),
                                str(weight.dtype).removeprefix("torch."), activation, residual,
                                str(indices.dtype).removeprefix("torch."), str(indptr.dtype).removeprefix("torch."),
                                uniform_row_blocks(indptr))
        return cls(spec, indptr, indices, values, bias)

    @property
    def pattern(self) -> str:
        h = hashlib.sha256()
        for t in (self.indptr, self.indices):
            t = t.detach().contiguous().cpu()
            h.update(f"{tuple(t.shape)}:{t.dtype};".encode())
            h.update(t.numpy().tobytes())
        h.update(f"values{tuple(self.values.shape)}".encode())
        return h.hexdigest()

    @property
    def stored_blocks(self) -> int:
        return int(self.values.shape[0])

    def inputs(self, seed: int = 0) -> list[np.ndarray]:
        """The kernel's arguments in order (x, indptr, indices, values, bias, res), as numpy arrays."""
        s = self.spec
        dtype = getattr(torch, s.dtype)
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(s.m, s.k, generator=g, dtype=dtype)
        bias = self.bias if self.bias is not None else torch.zeros(s.n, dtype=dtype)
        res = torch.randn(s.m, s.n, generator=g, dtype=dtype) if s.residual else torch.zeros(1, 1, dtype=dtype)
        return [t.detach().contiguous().cpu().numpy() for t in (x, self.indptr, self.indices, self.values, bias, res)]

    def reference(self, inputs: Sequence[np.ndarray]) -> np.ndarray:
        x, indptr, indices, values, bias, res = (torch.from_numpy(a) for a in inputs)
        with torch.no_grad():
            y = torch.ops.sparsecc.sparse_linear(x, indptr, indices, values, bias, self.spec.n, self.spec.activation,
                                                 res if self.spec.residual else None)
        return y.numpy()


def graph_tasks(gm: fx.GraphModule) -> list[KernelTask]:
    """The distinct sparse kernels of a partitioned graph, each with the layer it is tuned on: the one with the
    most stored blocks among those sharing the kernel."""
    from sparsecc.codegen.importer import region_nodes

    groups: dict[tuple, list[KernelTask]] = {}
    for call in region_nodes(gm):
        sub = gm.get_submodule(call.target)
        placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
        outer = dict(zip(placeholders, call.args))

        def const(arg: Any) -> torch.Tensor | None:
            if not isinstance(arg, fx.Node):
                return None
            if arg.op == "placeholder" and isinstance(outer.get(arg), fx.Node):
                return constant_of(gm, outer[arg])
            return constant_of(sub, arg)

        for node in sub.graph.nodes:
            if node.op != "call_function" or node.target not in SPARSE_OPS:
                continue
            _, indptr, indices, values, bias, *_ = sparse_linear_args(node.args)
            packed = [const(a) for a in (indptr, indices, values)]
            if any(p is None for p in packed):
                log.warning("tune: %s.%s has no constant packed weight; its kernel keeps the default knobs",
                            call.target, node.name)
                continue
            spec = SparseLinearSpec.of(node)
            groups.setdefault(spec.key, []).append(
                KernelTask(spec, *packed, const(bias), (f"{call.target}.{node.name}",), (node,)))
    tasks = []
    for members in groups.values():
        chosen = max(members, key=lambda t: t.stored_blocks)
        tasks.append(dataclasses.replace(chosen, layers=tuple(l for t in members for l in t.layers),
                                         nodes=tuple(n for t in members for n in t.nodes)))
    return tasks


# ------------------------------------------------------------------------------------------------ measurement

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
            samples = []
            with torch.no_grad():
                for _ in range(CONTEXT_RUNS):
                    torch.nn.functional.linear(x, w)
                    t0 = time.perf_counter()
                    func(*self.arrays, self.out)
                    samples.append(time.perf_counter() - t0)
            result = float(np.median(samples)) * 1e6
        else:
            evaluator = self.module(cand).time_evaluator(FUNC, self.device, number=1, repeat=REPEAT,
                                                         min_repeat_ms=MIN_REPEAT_MS)
            result = min(evaluator(*self.arrays, self.out).results) * 1e6
        MEASUREMENTS.count += 1
        MEASUREMENTS.timing_seconds += time.perf_counter() - start
        return result


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
            ext = ".so" if _runs_here(self.target) else ".tar"
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
        best = [float("inf")] * len(cands)
        for _ in range(rounds):
            for i, cand in enumerate(cands):
                best[i] = min(best[i], dev.time_us(cand))
        return best


def _runs_here(target: tvm.target.Target) -> bool:
    from sparsecc.codegen.build import runs_here

    return runs_here(target)


def local_runner(target: tvm.target.Target, threads: int) -> Runner:
    from sparsecc.codegen.targets import configure_threads

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


# ----------------------------------------------------------------------------------------------------- search

@dataclasses.dataclass(frozen=True)
class KernelTuning:
    """The outcome for one kernel."""

    name: str
    layers: tuple[str, ...]
    knobs: KernelKnobs
    source: str  # "tuned", "database", or "default" (nothing measured, nothing stored)
    spec: SparseLinearSpec | None = None
    pattern: str = ""  # hash of the pattern of the layer tuned on (the database key's)
    best_us: float | None = None
    default_us: float | None = None
    trials: int = 0  # candidates measured now (0 when taken from the database)
    seconds: float = 0.0

    @property
    def speedup(self) -> float | None:
        return self.default_us / self.best_us if self.best_us and self.default_us else None


@dataclasses.dataclass
class TuningReport:
    kernels: list[KernelTuning]
    database: str
    measured_on: str
    seconds: float

    @property
    def trials(self) -> int:
        return sum(k.trials for k in self.kernels)

    def table(self) -> str:
        lines = [f"{'kernel':<44}{'source':>10}{'trials':>8}{'default us':>12}{'tuned us':>10}{'speed-up':>10}  knobs"]
        for k in self.kernels:
            d = f"{k.default_us:.1f}" if k.default_us else "-"
            b = f"{k.best_us:.1f}" if k.best_us else "-"
            s = f"{k.speedup:.2f}x" if k.speedup else "-"
            kn = k.knobs
            lines.append(f"{k.name:<44}{k.source:>10}{k.trials:>8}{d:>12}{b:>10}{s:>10}  tile={kn.token_tile} "
                         f"rows={kn.rows_per_task} outer={int(kn.token_outer)} chains={kn.chains}")
        return "\n".join(lines)


def tuning_key(task: KernelTask, target: tvm.target.Target) -> TuningKey:
    spec = dataclasses.asdict(task.spec)
    spec["block"] = list(task.spec.block)
    return TuningKey(target=str(target), tvm_version=tvm.__version__, sparsecc_version=sparsecc.__version__,
                     template=TEMPLATE, template_version=TEMPLATE_VERSION, spec=TuningKey.spec_json(spec),
                     pattern=task.pattern)


def search(task: KernelTask, trials: int, runner: Runner, start: KernelKnobs | None = None,
           progress: Callable[[int, str], None] | None = None, seed: int = 0,
           threads: int | None = None) -> tuple[KernelKnobs, float, float, int, bool]:
    """Local search over the task's knobs; returns (best knobs, best us, default us, candidates measured,
    whole space measured)."""
    spec = task.spec
    space = candidate_space(spec, threads)
    default = spec_default(spec, threads)
    budget = max(1, min(trials, len(space)))
    inputs = task.inputs()
    expected = task.reference(inputs)
    rng = random.Random(f"{seed}:{task.pattern}")
    built: dict[KernelKnobs, Candidate] = {}
    times: dict[KernelKnobs, float] = {}

    def measure(batch: list[KernelKnobs]) -> None:
        for k in batch:
            try:
                built[k] = runner.build(spec, k)
            except Exception as exc:  # a knob set TVM cannot compile is dropped, not fatal
                log.warning("tune: %s with %s failed to build: %s", spec.name, k, exc)
                times[k] = float("inf")
        ok = [k for k in batch if k in built]
        for k, t in zip(ok, runner.measure(task, inputs, expected, [built[k] for k in ok])):
            times[k] = float("inf") if t is None else t
        if progress:
            best = min(times.values())
            progress(len(batch), f"{spec.name} {times.get(default, float('nan')) / best:.2f}x" if best < float("inf")
                     else spec.name)

    first = [default] + ([canonical(start, spec)] if start is not None and canonical(start, spec) in space
                         and canonical(start, spec) != default else [])
    measure(first[:budget])
    while len(times) < budget:
        best = min(times, key=times.get)
        batch = [c for c in neighbours(best, space) if c not in times]
        if not batch:
            rest = [c for c in space if c not in times]
            rng.shuffle(rest)
            batch = rest[:runner.parallel]
        measure(batch[:budget - len(times)])

    ranked = sorted((k for k in times if times[k] < float("inf")), key=times.get)
    if default not in ranked:
        raise SparseccError(f"tune: the untuned kernel {spec.name} failed to run or disagreed with the reference")
    finalists = list(dict.fromkeys([default] + ranked[:CONFIRM_TOP]))
    if len(finalists) > 1:
        confirmed = dict(zip(finalists, runner.confirm(task, inputs, [built[k] for k in finalists], CONFIRM_ROUNDS)))
    else:
        confirmed = {default: times[default]}
    best = min(confirmed, key=confirmed.get)
    if best != default and confirmed[best] > confirmed[default] * (1 - KEEP_DEFAULT_MARGIN):
        best = default
    return best, confirmed[best], confirmed[default], len(times), len(times) == len(space)


def tune_tasks(tasks: Sequence[KernelTask], tune: TuneSettings, target: tvm.target.Target, threads: int,
               db: TuningDatabase, runner_factory: Callable[[], Runner] | None = None) -> TuningReport:
    """Knobs for each task: from the database when it holds a search of at least `tune.trials` (or of the whole
    space), else by measuring (stored afterwards). `tune.trials == 0` only reads the database."""
    start_time = time.perf_counter()
    results: dict[int, KernelTuning] = {}
    todo: list[tuple[int, KernelTask, TuningKey, TuningRecord | None]] = []
    for i, task in enumerate(tasks):
        key = tuning_key(task, target)
        record = db.get(key)
        knobs = _knobs_of(record)
        if knobs is not None and (tune.trials == 0 or (not tune.retune and (record.exhausted or
                                                                          record.trials >= tune.trials))):
            results[i] = KernelTuning(task.spec.name, task.layers, knobs, "database", task.spec, key.pattern,
                                      record.best_us, record.default_us)
        elif tune.trials == 0:
            results[i] = KernelTuning(task.spec.name, task.layers, spec_default(task.spec, threads), "default",
                                      task.spec, key.pattern)
        else:
            todo.append((i, task, key, record))

    measured_on = "-"
    if todo:
        if runner_factory is None:
            runner_factory = _runner_factory(tune, target, threads)
        runner = runner_factory()
        measured_on = runner.description
        total = sum(min(tune.trials, len(candidate_space(t.spec, threads))) for _, t, _, _ in todo)
        update, close = progress_bar(total, "sparsecc tune", "trial")
        try:
            for i, task, key, record in todo:
                t0 = time.perf_counter()
                best, best_us, default_us, n, exhausted = search(task, tune.trials, runner, _knobs_of(record), update,
                                                                 threads=threads)
                db.put(TuningRecord(key, best.as_dict(), best_us, default_us, n, exhausted, runner.description))
                results[i] = KernelTuning(task.spec.name, task.layers, best, "tuned", task.spec, key.pattern, best_us,
                                          default_us, n, time.perf_counter() - t0)
                log.info("tune: %s: %s, %.1f us (untuned %.1f us, %.2fx), %d trials in %.1f s", task.spec.name, best,
                         best_us, default_us, default_us / best_us, n, results[i].seconds)
        finally:
            close()
            runner.close()
    return TuningReport([results[i] for i in range(len(tasks))], str(db.path), measured_on,
                        time.perf_counter() - start_time)


def _knobs_of(record: TuningRecord | None) -> KernelKnobs | None:
    if record is None:
        return None
    try:
        return KernelKnobs(**record.knobs)
    except TypeError:  # stored by a template with other knobs (its version should have changed)
        return None


def _runner_factory(tune: TuneSettings, target: tvm.target.Target, threads: int) -> Callable[[], Runner]:
    if tune.rpc is not None:
        return lambda: rpc_runner(tune.rpc, target, threads)
    if not _runs_here(target):
        raise SparseccError(f"tune: kernels for target {target} cannot run on this machine; measure them on machines "
                            "of that kind with tune={'trials': N, 'rpc': {'tracker': 'host:port', 'key': ...}}")
    return lambda: local_runner(target, threads)


def tune_graph(gm: fx.GraphModule, settings: Settings) -> TuningReport:
    """Tune (or look up) every sparse kernel of a partitioned graph and record the knobs in its nodes' meta."""
    from sparsecc.codegen.targets import parse_target, resolve_threads

    tune = settings.tune
    if tune is None:
        tune = TuneSettings(trials=0)
    elif not isinstance(tune, TuneSettings):
        tune = TuneSettings.from_option(tune)
    threads = resolve_threads(settings.num_threads)
    target = parse_target(settings.target, threads)
    db = TuningDatabase.open_default(settings.cache_dir)
    tasks = graph_tasks(gm)
    report = tune_tasks(tasks, tune, target, threads, db)
    for task, result in zip(tasks, report.kernels):
        for node in task.nodes:
            node.meta[KNOBS_META] = result.knobs
    if report.trials:
        log.info("tune: %d kernels, %d trials in %.1f s on %s\n%s", len(tasks), report.trials, report.seconds,
                 report.measured_on, report.table())
    return report


def tune_weights(tasks: Iterable[KernelTask], tune: TuneSettings | dict, settings: Settings | None = None,
                 ) -> TuningReport:
    """`tune_tasks` with the target, threads and database of `settings` (benchmarks, tools)."""
    from sparsecc.codegen.targets import parse_target, resolve_threads

    settings = settings or Settings()
    tune = tune if isinstance(tune, TuneSettings) else TuneSettings.from_option(tune)
    threads = resolve_threads(settings.num_threads)
    target = parse_target(settings.target, threads)
    return tune_tasks(list(tasks), tune, target, threads, TuningDatabase.open_default(settings.cache_dir))
