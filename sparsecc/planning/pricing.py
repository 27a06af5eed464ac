"""What the plan pass prices formats with, handed to it by the pipeline (sparsecc/planning/target_pricing.py builds
one for the settings' target). The pass itself never calibrates, builds or times anything, so it needs no TVM.

- `machine`: the cost model's machine model, loaded (calibrated or read from the cache) only when a weight first
  needs a prediction; None for the break-even rule, which predicts nothing.
- `timer`: times candidates on a weight (`seconds(matrix, tokens, candidates)`, sparsecc/planning/candidate_timing.py);
  None where nothing is measured (other cost models, a target that does not run here).
Which candidates get timed is decided here too (`finalists`): dense always, and the sparse ones the model cannot
tell apart from the best.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from sparsecc.planning.cost_model import MachineModel

FINALIST_RATIO = 2.0
MAX_FINALISTS = 3


def finalists(predicted: Mapping[str, float]) -> list[str]:
    """Candidates to time, from predicted seconds per candidate ("dense", "csr", "bsr8x1", ...): dense, plus the
    sparse candidates predicted within FINALIST_RATIO of the best, at most MAX_FINALISTS of them, best first."""
    sparse = sorted((t, name) for name, t in predicted.items() if name != "dense")
    if not sparse:
        return ["dense"]
    best = sparse[0][0]
    return ["dense"] + [name for t, name in sparse[:MAX_FINALISTS] if t <= best * FINALIST_RATIO]


class LazyMachine:
    """A machine model loaded by `load` the first time it is called (calibrating costs ~30 s once per machine)."""

    def __init__(self, load: Callable[[], MachineModel] | MachineModel):
        self._load = load
        self.loaded: MachineModel | None = load if isinstance(load, MachineModel) else None

    def __call__(self) -> MachineModel:
        if self.loaded is None:
            self.loaded = self._load()
        return self.loaded


@dataclasses.dataclass
class Pricing:
    machine: LazyMachine | None = None
    timer: Any = None  # a CandidateTimer: .seconds(matrix, tokens, names), .timed, .reused, .close()

    def close(self) -> None:
        if self.timer is not None:
            self.timer.close()

    def __enter__(self) -> "Pricing":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
