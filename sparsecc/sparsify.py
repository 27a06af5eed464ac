"""Magnitude pruning helpers for demos, benchmarks and tests (the accuracy-budgeted pruning pass is separate)."""

from __future__ import annotations

import torch


def magnitude_prune_(weight: torch.Tensor, sparsity: float) -> None:
    """Zero the `sparsity` fraction of entries with the smallest magnitude, in place."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be within [0, 1], got {sparsity}")
    with torch.no_grad():
        k = int(weight.numel() * sparsity)
        if k == 0:
            return
        threshold = weight.abs().flatten().kthvalue(k).values
        weight[weight.abs() <= threshold] = 0


def prune_linears_(model: torch.nn.Module, sparsity: float) -> torch.nn.Module:
    """Magnitude-prune every nn.Linear (and transformers' Conv1D) weight of `model` in place."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
            magnitude_prune_(module.weight.data, sparsity)
    return model
