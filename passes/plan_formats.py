"""Plan: choose a storage format per analysed weight (dense or CSR in the spine) and say why.

The cost estimate is deliberately simple until the cost model lands: CSR time relative to dense grows
linearly with density and breaks even at `csr_max_density`, the density measured as break-even for the
spine's kernel at BERT shapes.
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
    if w.nnz == 0:
        return FormatChoice(SparseFormat.CSR, None, 0.0, "all zeros")
    if w.density > settings.csr_max_density:
        return dense(f"density {w.density:.3f} > csr_max_density {settings.csr_max_density}")
    est = w.density / settings.csr_max_density if settings.csr_max_density else 0.0
    return FormatChoice(
        SparseFormat.CSR, None, est,
        f"density {w.density:.3f} <= csr_max_density {settings.csr_max_density}: CSR predicted at {est:.2f}x dense",
    )
