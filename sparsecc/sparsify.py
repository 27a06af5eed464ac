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


def nm_prune_(weight: torch.Tensor, n: int, m: int) -> None:
    """Keep the n largest-magnitude values of every m consecutive inputs of an (out, in) weight, in place (2:4 keeps
    2 of every 4)."""
    out, k = weight.shape
    if not 0 < n <= m or k % m:
        raise ValueError(f"{n}:{m} needs 0 < n <= m and m dividing the {k} inputs of a {out}x{k} weight")
    with torch.no_grad():
        groups = weight.reshape(out, k // m, m)
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, groups.abs().topk(n, dim=2).indices, True)
        groups.mul_(keep)


def prune_linears_(model: torch.nn.Module, sparsity: float, block: tuple[int, int] | None = None,
                   nm: tuple[int, int] | None = None) -> torch.nn.Module:
    """Prune every nn.Linear weight of `model` in place: by magnitude, in r x c blocks (out x in) when `block` is
    given, or n of every m inputs when `nm` is (`sparsity` is then unused). transformers' Conv1D (an (in, out)
    weight) is pruned too, unstructured only."""
    for module in model.modules():
        if nm is not None and isinstance(module, torch.nn.Linear):
            nm_prune_(module.weight.data, *nm)
        elif block is not None and isinstance(module, torch.nn.Linear):
            block_prune_(module.weight.data, sparsity, block)
        elif isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
            magnitude_prune_(module.weight.data, sparsity)
    return model
