"""How good the planner's choices are: for a layer, the format the planner picks against every candidate measured.
Used by benchmarks/plan_quality.py (the large set) and tests/test_cost_model.py (a small one)."""

from __future__ import annotations

import dataclasses
import tempfile
from typing import Iterable

import torch

from sparsecc.formats import WeightSparsity, WeightUse
from sparsecc.measure.clock import Fastest
from sparsecc.passes.analyze_weights import describe_weight
from sparsecc.passes.plan_formats import choose_format
from sparsecc.planning.calibration import random_blocked
from sparsecc.planning.candidate_timing import CandidateTimer, candidate_seconds
from sparsecc.planning.cost_model import MachineModel
from sparsecc.settings import Settings

PATTERNS = ("random", "skewed", "1x4", "4x1", "8x1", "16x1", "4x4", "8x8")


@dataclasses.dataclass(frozen=True)
class Layer:
    out_features: int
    in_features: int
    tokens: int
    sparsity: float
    pattern: str  # "random" (unstructured), "skewed" (row density falling from 2x the mean to 0), or "RxC" blocks

    @property
    def name(self) -> str:
        return f"{self.out_features}x{self.in_features} t{self.tokens} {self.sparsity:.0%} {self.pattern}"


def make_weight(layer: Layer, seed: int = 0) -> torch.Tensor:
    n, k, density = layer.out_features, layer.in_features, 1.0 - layer.sparsity
    g = torch.Generator().manual_seed(seed)
    if layer.pattern == "random":
        return torch.randn(n, k, generator=g) * (torch.rand(n, k, generator=g) < density)
    if layer.pattern == "skewed":
        row_density = (2 * density * torch.linspace(1, 0, n)).clamp(max=1.0).unsqueeze(1)
        return torch.randn(n, k, generator=g) * (torch.rand(n, k, generator=g) < row_density)
    r, c = (int(v) for v in layer.pattern.split("x"))
    return random_blocked(n, k, (r, c), density, seed)


def weight_sparsity(weight: torch.Tensor, tokens: int, threads: int) -> WeightSparsity:
    """What analysis records for `weight` (out, in) used as nn.Linear's weight on `tokens` rows."""
    return describe_weight("w", weight, False, (WeightUse("aten.addmm.default", 2, "addmm", tokens),), "strided",
                           threads)


@dataclasses.dataclass(frozen=True)
class Verdict:
    layer: Layer
    chosen: str  # "dense", "csr", "bsr8x1", ...
    measured: dict  # candidate -> seconds (fastest of the rounds)
    predicted: dict  # candidate -> seconds

    @property
    def best(self) -> str:
        return min(self.measured, key=self.measured.get)

    @property
    def vs_best(self) -> float:
        """Chosen time over the fastest candidate's (1.0: the planner found the fastest)."""
        return self.measured[self.chosen] / self.measured[self.best]

    @property
    def vs_dense(self) -> float:
        return self.measured[self.chosen] / self.measured["dense"]


def judge(layers: Iterable[Layer], machine: MachineModel, target, threads: int, rounds: int = 2,
          cost_model: str = "calibrated") -> list[Verdict]:
    """Plan each layer with `cost_model` ("calibrated" or "measured"), then measure dense and every sparse candidate
    the planner priced, `rounds` times each, apart from any timing the planner did."""
    from sparsecc.codegen.tuning.runners import KernelTimer

    # The planner's kernels are built once and shared with the judge; its timings are not.
    timer = KernelTimer(target, threads)
    with tempfile.TemporaryDirectory(prefix="sparsecc-plan-quality-") as cache:
        settings = Settings(min_weight_numel=1, num_threads=threads, cost_model=cost_model, cache_dir=cache)
        planner = CandidateTimer(settings, target, threads, timer) if cost_model == "measured" else None
        verdicts = []
        try:
            for layer in layers:
                weight = make_weight(layer)
                measure = None if planner is None else (
                    lambda names, w=weight, t=layer.tokens: planner.seconds(w, [t], names))
                choice = choose_format(weight_sparsity(weight, layer.tokens, threads), settings, machine, measure)
                measured = dict(Fastest().rounds(
                    {name: (lambda name=name: candidate_seconds(timer, weight, layer.tokens, name))
                     for name in choice.predictions}, rounds))
                predicted = {k: v * 1e-6 for k, v in choice.predictions.items()}
                verdicts.append(Verdict(layer, choice.candidate, measured, predicted))
        finally:
            timer.close()
    return verdicts

