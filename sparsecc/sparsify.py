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


def block_prune_(weight: torch.Tensor, sparsity: float, block: tuple[int, int]) -> None:
    """Zero whole r x c blocks of an (out, in) weight in place, keeping the blocks with the largest L1 norm."""
    r, c = block
    n, k = weight.shape
    if n % r or k % c:
        raise ValueError(f"{r}x{c} blocks do not tile a {n}x{k} weight")
    with torch.no_grad():
        norms = weight.abs().reshape(n // r, r, k // c, c).sum(dim=(1, 3))
        magnitude_prune_(norms, sparsity)
        weight.mul_((norms != 0).repeat_interleave(r, 0).repeat_interleave(c, 1))


def prune_linears_(model: torch.nn.Module, sparsity: float, block: tuple[int, int] | None = None) -> torch.nn.Module:
    """Prune every nn.Linear weight of `model` in place: by magnitude, or in r x c blocks (out x in) when `block`
    is given. transformers' Conv1D (an (in, out) weight) is pruned too, unstructured only."""
    for module in model.modules():
        if block is not None and isinstance(module, torch.nn.Linear):
            block_prune_(module.weight.data, sparsity, block)
        elif isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
            magnitude_prune_(module.weight.data, sparsity)
    return model
