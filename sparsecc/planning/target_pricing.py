"""The pricing of one compile, for the target its settings name: the calibrated machine model and, with
`cost_model="measured"`, a candidate timer on that target. Built by the pipeline, handed to the plan pass."""

from __future__ import annotations

import logging

from sparsecc.planning.pricing import LazyMachine, Pricing
from sparsecc.settings import Settings

log = logging.getLogger(__name__)


def pricing_for(settings: Settings) -> Pricing:
    """`settings` resolved. Close the result (or use it as a context manager) when planning is done."""
    if settings.cost_model == "break-even":
        return Pricing()
    from sparsecc.planning.calibration import machine_model

    machine = LazyMachine(lambda: machine_model(settings))
    if settings.cost_model != "measured":
        return Pricing(machine)
    from sparsecc.codegen.targets import runs_here, target_of
    from sparsecc.planning.candidate_timing import CandidateTimer

    target = target_of(settings)
    if not runs_here(target):
        log.info("plan: target %s does not run here; choosing from predictions alone", settings.target)
        return Pricing(machine)
    return Pricing(machine, CandidateTimer(settings, target, settings.threads))
