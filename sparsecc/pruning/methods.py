"""The pruning methods, each on one (out, in) weight matrix and its inputs' Gram matrix H = X^T X (X: the rows the
layer multiplies on the calibration inputs, summed over every use of the weight):

- magnitude: the smallest |w| of the layer go;
- wanda: the smallest |w| * ||x_j|| of each output row go (Sun et al., 2023: an input channel with large
  activations makes its weights matter more);
- sparsegpt: one-shot reconstruction in the spirit of SparseGPT / optimal brain surgeon (Frantar & Alistarh, 2023):
  columns are pruned left to right, and each pruned weight's error is spread over the columns not yet visited
  through the inverse Hessian, so the remaining weights compensate. The mask of each block of columns is chosen
  from the weights as updated so far (w^2 / [H^-1]_jj, the surgeon's saliency).

All of them return a new matrix whose pruned entries are exact zeros; the input is not modified.
"""

from __future__ import annotations

import torch

from sparsecc.pruning.patterns import Pattern, keep_mask

METHODS = ("magnitude", "wanda", "sparsegpt")
# Columns the second-order method updates at once before spreading the block's error to the rest (128 in the
# paper; any multiple of the pattern's group or block width works).
COLUMN_BLOCK = 128
# Added to H's diagonal, as a fraction of its mean: keeps the Cholesky factorisation stable when inputs are
# correlated or a channel is nearly constant.
DAMPING = 0.01


def prune_matrix(method: str, weight: torch.Tensor, gram: torch.Tensor, sparsity: float,
                 pattern: Pattern) -> torch.Tensor:
    """`weight` (out, in) pruned to `sparsity` (ignored for N:M, which fixes it) with `method`."""
    if sparsity <= 0.0 and pattern.kind != "nm":
        return weight.clone()
    w = weight.detach().to(torch.float32)
    if method == "magnitude":
        pruned = w * keep_mask(w.abs(), sparsity, pattern)
    elif method == "wanda":
        norms = gram.diagonal().clamp_min(0).sqrt().to(torch.float32)
        pruned = w * keep_mask(w.abs() * norms, sparsity, pattern, per_row=True)
    elif method == "sparsegpt":
        pruned = _surgeon(w, gram.to(torch.float32), sparsity, pattern)
    else:
        raise ValueError(f"unknown pruning method {method!r}")
    return pruned.to(weight.dtype)


def _inverse_hessian_factor(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The upper Cholesky factor of (H + damping)^-1, and the input channels that never saw a non-zero."""
    h = gram.clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(DAMPING * h.diagonal().mean())
    for _ in range(4):  # an ill-conditioned H: more damping rather than a failed factorisation
        factor, info = torch.linalg.cholesky_ex(h)
        if not int(info):
            break
        h.diagonal().add_(DAMPING * h.diagonal().mean())
    inverse = torch.cholesky_inverse(factor)
    return torch.linalg.cholesky(inverse, upper=True), dead


def _surgeon(w: torch.Tensor, gram: torch.Tensor, sparsity: float, pattern: Pattern) -> torch.Tensor:
    w = w.clone()
    hinv, dead = _inverse_hessian_factor(gram)
    w[:, dead] = 0.0
    columns = w.shape[1]
    for start in range(0, columns, COLUMN_BLOCK):
        end = min(start + COLUMN_BLOCK, columns)
        block = w[:, start:end].clone()
        hblock = hinv[start:end, start:end]
        diag = hblock.diagonal()
        errors = torch.zeros_like(block)
        mask = None
        if pattern.kind != "nm":
            mask = keep_mask(block.square() / diag.square(), sparsity, pattern)
        else:
            mask = torch.ones_like(block, dtype=torch.bool)
        for i in range(end - start):
            if pattern.kind == "nm" and i % pattern.m == 0:
                group = slice(i, i + pattern.m)
                mask[:, group] = keep_mask(block[:, group].square() / diag[group].square(), 0.0, pattern)
            column = block[:, i]
            kept = column * mask[:, i]
            error = (column - kept) / diag[i]
            block[:, i:].sub_(error.unsqueeze(1) * hblock[i, i:].unsqueeze(0))
            block[:, i] = kept
            errors[:, i] = error
        w[:, start:end] = block
        w[:, end:].sub_(errors @ hinv[start:end, end:])
    return w


def relative_error(weight: torch.Tensor, pruned: torch.Tensor, gram: torch.Tensor) -> float:
    """||(W - W') X^T||^2 / ||W X^T||^2: how much of the layer's output on the calibration inputs pruning changed."""
    w = weight.to(torch.float32)
    h = gram.to(torch.float32)
    delta = w - pruned.to(torch.float32)
    base = float(((w @ h) * w).sum())
    if base <= 0.0:
        return 0.0 if not bool(delta.any()) else float("inf")
    return max(0.0, float(((delta @ h) * delta).sum()) / base)
