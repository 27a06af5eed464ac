"""The tuning search space: every distinct knob set of the sparse kernel template (sparsecc/kernel_work.KernelKnobs)
for one kernel, and the neighbours of a knob set that the search walks."""

from __future__ import annotations

import dataclasses
from typing import Sequence

from sparsecc.codegen.converters import SparseLinearSpec
from sparsecc.kernel_work import KernelKnobs

TILES = (4, 8, 16, 32, 64, 128)
ROWS = (2, 4, 8, 16, 32, 64)
CHAINS = (1, 2, 4, 8)


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
