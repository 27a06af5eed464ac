"""Plan: choose a storage format per analysed weight (dense, CSR or BSR with some block shape) and say why.

The cost estimate is deliberately simple until the cost model lands: a sparse format's time relative to dense
grows linearly with the fraction of the weight it stores, and breaks even at a density measured for each
block shape with benchmarks/linear_kernels.py (CSR: `csr_max_density`).
"""

from __future__ import annotations

import logging

from torch import fx

from sparsecc.formats import FormatChoice, SparseFormat, SparsePlan, WeightSparsity
from sparsecc.passes.analyze_weights import analysed_weights
from sparsecc.settings import Settings

log = logging.getLogger(__name__)

SPARSE_DTYPES = ("float32", "float64")
# Uses the CSR rewrite can take: a 2-D matrix product with the weight in either operand.
CSR_USES = {("aten.mm.default", 0), ("aten.mm.default", 1), ("aten.addmm.default", 1), ("aten.addmm.default", 2)}

# Stored density at which BSR with (rows, cols) blocks costs as much as dense: benchmarks/kernel_break_even.py
# (mean of BERT's three shapes on AVX-512) times 0.75 for the slowdown inside a model. 16x1 blocks run with
# shorter token tiles (their accumulators must fit the stack) and break even lower than 8x1.
BSR_BREAK_EVEN = {(1, 4): 0.36, (4, 1): 0.46, (8, 1): 0.5, (16, 1): 0.4, (4, 4): 0.53, (8, 8): 0.5}


def plan_formats(gm: fx.GraphModule, settings: Settings) -> SparsePlan:
    weights = analysed_weights(gm)
    choices = {name: choose_format(w, settings) for name, w in weights.items()}
    n_sparse = sum(c.format is not SparseFormat.DENSE for c in choices.values())
    log.info("plan: %d of %d weights sparse", n_sparse, len(choices))
    return SparsePlan(choices=choices, weights=weights)


def choose_format(w: WeightSparsity, settings: Settings) -> FormatChoice:
    def dense(reason: str) -> FormatChoice:
        return FormatChoice(SparseFormat.DENSE, None, 1.0, reason)

    if w.dtype not in SPARSE_DTYPES:
        return dense(f"dtype {w.dtype} has no sparse kernel yet (supported: {', '.join(SPARSE_DTYPES)})")
    if len(w.shape) != 2:
        return dense(f"{len(w.shape)}-D weight: only 2-D weights have a sparse kernel yet")
    other = sorted({u.op for u in w.uses if (u.op, u.operand) not in CSR_USES})
    if other:
        return dense(f"also used by {', '.join(other)}, which has no sparse kernel yet")
    if w.numel < settings.min_weight_numel:
        return dense(f"{w.numel} elements < min_weight_numel {settings.min_weight_numel}")
    if w.nnz == 0 and allowed((1, 1), settings.formats):
        return FormatChoice(SparseFormat.CSR, None, 0.0, "all zeros")
    candidates = {(1, 1): w.density / settings.csr_max_density if settings.csr_max_density else float("inf")}
    for b in w.blocks:
        if (b.rows, b.cols) in BSR_BREAK_EVEN:
            candidates[(b.rows, b.cols)] = b.stored_density / BSR_BREAK_EVEN[(b.rows, b.cols)]
    candidates = {b: e for b, e in candidates.items() if allowed(b, settings.formats)}
    if not candidates:
        return dense(f"formats={list(settings.formats)} allows no sparse format that fits this weight")
    block, est = min(candidates.items(), key=lambda kv: (kv[1], kv[0] != (1, 1)))
    others = ", ".join(f"{_name(b)} {e:.2f}x" for b, e in sorted(candidates.items(), key=lambda kv: kv[1]))
    # N:M weights run on the same kernels: at 2:4's 50 % density no sparse kernel measured faster than dense here
    # (benchmarks/kernel_break_even.py), so the pattern only says why such a weight is, or is not, sparse.
    nm = w.nm_label()
    if nm is not None:
        others += f"; {nm} structured, run as its density allows"
    forced = settings.formats is not None and "dense" not in settings.formats
    fmt = SparseFormat.CSR if block == (1, 1) else SparseFormat.BSR
    if forced:
        return FormatChoice(fmt, None if block == (1, 1) else block, est,
                            f"density {w.density:.3f}: {_name(block)} forced by formats={list(settings.formats)}, "
                            f"predicted at {est:.2f}x dense ({others})")
    if est * settings.min_gain >= 1.0:
        wanted = "faster than dense" if settings.min_gain == 1.0 else f"{settings.min_gain:.2f}x faster than dense"
        return dense(f"density {w.density:.3f}: no sparse format predicted {wanted} ({others})")
    return FormatChoice(fmt, None if block == (1, 1) else block, est,
                        f"density {w.density:.3f}: {_name(block)} predicted at {est:.2f}x dense ({others})")


def allowed(block: tuple[int, int], formats: tuple[str, ...] | None) -> bool:
    """Whether the `formats` option lets the planner store a weight in `block`-shaped blocks ((1, 1): CSR)."""
    if formats is None:
        return True
    if block == (1, 1):
        return "csr" in formats
    return "bsr" in formats or _name(block) in formats


def _name(block: tuple[int, int]) -> str:
    return "csr" if block == (1, 1) else f"bsr{block[0]}x{block[1]}"
