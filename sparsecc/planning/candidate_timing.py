"""Measured planning (`cost_model="measured"`): the calibrated cost model ranks a weight's candidates, and those it
cannot tell apart are timed on the weight itself, here, before anything else is built.

Why: the model's error (median 26 %, worst cases 3x, docs/benchmarks.md "Plan quality") is larger than the gaps
between candidates that decide the choice, and on this kind of machine PyTorch's dense GEMM loses to a fully stored
block kernel on some shapes, a case the model gets wrong. Timing a few kernels costs a second or two per layer
shape; the results go into the tuning database (sparsecc/planning/tuning_db.py) under the candidate's name, the token count
and the work the weight gives that candidate (`work_signature`), so a second compile of the same model times nothing.

Why the work and not the exact pattern: a kernel's time follows how many blocks it stores and how evenly its
threads share them, not where they sit. Keyed by the exact non-zero mask, BERT-base's 72 Linears (12 copies of six,
each pruned to the same density) took 447 timings and 23 s of a 31 s compile; keyed by work they take one timing
per layer kind. Weights whose stored blocks differ by less than WORK_STEP and whose balance is the same to
BALANCE_STEP share a timing.

Which candidates: dense always (so the choice is never slower than dense by more than the noise), plus the sparse
candidates the model cannot tell apart from the best (sparsecc/planning/pricing.finalists).
"""

from __future__ import annotations

import json
import logging
import math
from typing import Sequence

import torch

import sparsecc
from sparsecc.formats import ELL_CANDIDATE, candidate_block
from sparsecc.kernel_work import TEMPLATE_VERSION
from sparsecc.measure.clock import Fastest
from sparsecc.measure.dense import dense_linear_seconds
from sparsecc.planning.tuning_db import TuningDatabase, TuningKey, TuningRecord
from sparsecc.settings import Settings

log = logging.getLogger(__name__)

# Timings per candidate; the fastest counts. Kernels under SHORT_SECONDS get SHORT_ROUNDS: at tens of microseconds
# a timing's jitter is a larger share, and more rounds cost little.
ROUNDS = 2
SHORT_ROUNDS = 5
SHORT_SECONDS = 2e-4
# Template names of the planner's records in the tuning database: kept apart from the tuner's own rows.
TEMPLATE_PREFIX = "plan-"
# Stored blocks within 2 % (log-spaced buckets) and thread balance within 0.05 time alike.
WORK_STEP = 1.02
BALANCE_STEP = 0.05


def candidate_seconds(kernels, matrix: torch.Tensor, tokens: int, name: str) -> float:
    """One timing of candidate `name` for `matrix` (out, in) at `tokens` rows: PyTorch's F.linear for "dense", else
    sparsecc's kernel through `kernels` (a codegen.tuning.KernelTimer; unused for dense)."""
    if name == "dense":
        return dense_linear_seconds(matrix.shape[0], matrix.shape[1], tokens, matrix.dtype)
    return kernels.seconds(matrix, tokens, candidate_block(name), ell=name == ELL_CANDIDATE)[0]


def work_signature(matrix: torch.Tensor, name: str, threads: int, analysed=None) -> str:
    """The work candidate `name`'s kernel does on `matrix` (out, in), coarse enough that weights of the same shape
    pruned alike share it: stored blocks (log buckets of WORK_STEP) and the busiest thread's share over the mean.
    `analysed`: the matrix's WeightSparsity, analysed for `threads`; its statistics are used where they cover the
    candidate (counting again cost most of a warm compile's plan)."""
    blocks, spread = _stored_work(matrix, name, threads, analysed)
    bucket = round(math.log(blocks) / math.log(WORK_STEP)) if blocks else -1
    balance = round(spread / BALANCE_STEP) * BALANCE_STEP
    return f"work:{bucket}:{balance:.2f}"


def _stored_work(matrix: torch.Tensor, name: str, threads: int, analysed) -> tuple[int, float]:
    """(blocks candidate `name` stores for `matrix`, its threads' imbalance)."""
    from sparsecc.packing import ell_stored_blocks
    from sparsecc.passes.analyze_weights import block_stat

    if name == ELL_CANDIDATE:  # padded rows: the stored count is the longest row's times the rows, evenly shared
        if analysed is not None:
            return analysed.row_max * matrix.shape[0], 1.0
        return ell_stored_blocks((matrix != 0).sum(dim=1)), 1.0
    block = candidate_block(name)
    if analysed is not None:
        if block == (1, 1):
            return analysed.nnz, analysed.imbalance
        for stats in analysed.blocks:
            if (stats.rows, stats.cols) == block:
                return stats.blocks, stats.imbalance
    stats = block_stat(matrix != 0, *block, threads)
    return stats.blocks, stats.imbalance


class CandidateTimer:
    """Times candidates for weights of one compile on its target, with the tuning database as a cache. `kernels`: a
    codegen.tuning.KernelTimer to build and time kernels with (its built kernels shared with the caller, who closes
    it); by default one of its own, made when first needed."""

    def __init__(self, settings: Settings, target, threads: int, kernels=None):
        self.target = target
        self.threads = threads
        self.template_version = TEMPLATE_VERSION
        try:
            self.db: TuningDatabase | None = TuningDatabase.open_default(settings.cache_dir)
        except Exception as exc:  # a read-only or broken cache costs measuring again, nothing else
            log.warning("plan: tuning database unavailable (%s); measured choices will not be kept", exc)
            self.db = None
        self._timer = kernels
        self._direct_conv = None  # a conv_timing.DirectConvTimer, made when a convolution is first timed
        self._owns_timer = kernels is None
        self.timed = 0
        self.reused = 0

    def seconds(self, matrix: torch.Tensor, tokens: Sequence[int], candidates: Sequence[str],
                analysed=None) -> dict[str, float]:
        """Measured seconds of each candidate for `matrix` (out, in) summed over its uses' token counts. `analysed`:
        the matrix's WeightSparsity, when the caller has it."""
        work = {name: "any" if name == "dense" else work_signature(matrix, name, self.threads, analysed)
                for name in candidates}
        keys = {(name, t): self._key(matrix, work[name], t, name) for name in candidates for t in tokens}
        known: dict[tuple[str, int], float] = {}
        for job, key in keys.items():
            record = self._get(key)
            if record is not None:
                known[job] = record.best_us * 1e-6
        self.reused += len(known)
        jobs = [job for job in keys if job not in known]
        # Rounds over all candidates, keeping each one's fastest: the load of a shared machine drifts over seconds,
        # and interleaving keeps it from favouring whichever candidate was timed in a quiet moment.
        timers = {job: (lambda job=job: self._measure(matrix, job[1], job[0])) for job in jobs}
        timed = Fastest().rounds(timers, 1)
        rounds = SHORT_ROUNDS if jobs and max(timed.values()) < SHORT_SECONDS else ROUNDS
        timed.rounds(timers, rounds - 1)
        for job, seconds in timed.items():
            self._put(TuningRecord(keys[job], {}, seconds * 1e6, seconds * 1e6, rounds, True, "local"))
        self.timed += len(timed)
        known.update(timed)
        return {name: sum(known[(name, t)] for t in tokens) for name in candidates}

    def conv_seconds(self, weight: torch.Tensor, phase_matrix: torch.Tensor, geometry,
                     analysed=None) -> dict[str, float]:
        """Measured seconds of "dense" (PyTorch's convolution) and "csr" (the direct kernel, with its phase split)
        for one k x k convolution (sparsecc/planning/conv_timing.py), kept in the tuning database like the
        others: the dense one under the geometry, the sparse one also under its work."""
        import tvm

        from sparsecc.conv_work import CONV_TEMPLATE_VERSION
        from sparsecc.planning.conv_timing import dense_conv_seconds

        spec = TuningKey.spec_json(json.loads(geometry.to_json()))
        work = {"dense": "any", "csr": work_signature(weight.reshape(weight.shape[0], -1), "csr", self.threads,
                                                      analysed)}
        result = {}
        for name, measure in (("dense", lambda: dense_conv_seconds(geometry)),
                              ("csr", lambda: self._direct_conv_timer().seconds(weight, phase_matrix, geometry))):
            key = TuningKey(str(self.target), tvm.__version__, sparsecc.__version__, f"{TEMPLATE_PREFIX}conv-{name}",
                            CONV_TEMPLATE_VERSION, spec, work[name])
            record = self._get(key)
            if record is not None:
                self.reused += 1
                result[name] = record.best_us * 1e-6
                continue
            seconds = min(measure() for _ in range(ROUNDS))
            self._put(TuningRecord(key, {}, seconds * 1e6, seconds * 1e6, ROUNDS, True, "local"))
            self.timed += 1
            result[name] = seconds
        return result

    def _direct_conv_timer(self):
        from sparsecc.planning.conv_timing import DirectConvTimer

        if self._direct_conv is None:
            self._direct_conv = DirectConvTimer(self.target)
        return self._direct_conv

    def _key(self, matrix: torch.Tensor, work: str, tokens: int, name: str) -> TuningKey:
        import tvm

        spec = {"out": int(matrix.shape[0]), "in": int(matrix.shape[1]), "tokens": int(tokens),
                "dtype": str(matrix.dtype).removeprefix("torch.")}
        return TuningKey(str(self.target), tvm.__version__, sparsecc.__version__, TEMPLATE_PREFIX + name,
                         self.template_version, TuningKey.spec_json(spec), work)

    def _measure(self, matrix: torch.Tensor, tokens: int, name: str) -> float:
        from sparsecc.codegen.tuning.runners import KernelTimer

        if name != "dense" and self._timer is None:
            self._timer = KernelTimer(self.target, self.threads)
        return candidate_seconds(self._timer, matrix, tokens, name)

    def _get(self, key: TuningKey) -> TuningRecord | None:
        try:
            return self.db.get(key) if self.db is not None else None
        except Exception as exc:
            log.warning("plan: cannot read the tuning database (%s); measuring", exc)
            return None

    def _put(self, record: TuningRecord) -> None:
        try:
            if self.db is not None:
                self.db.put(record)
        except Exception as exc:
            log.warning("plan: cannot store a measured choice in the tuning database (%s)", exc)

    def close(self) -> None:
        if self._timer is not None and self._owns_timer:
            self._timer.close()
            self._timer = None
