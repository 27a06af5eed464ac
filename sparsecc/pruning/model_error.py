"""How far a pruned graph's outputs are from the dense graph's, over all calibration batches."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.utils import _pytree as pytree


def _floating(outputs: Any) -> list[torch.Tensor]:
    return [t.detach().to(torch.float64) for t in pytree.tree_leaves(outputs)
            if isinstance(t, torch.Tensor) and t.is_floating_point()]


def model_error(actual: Sequence[Any], expected: Sequence[Any], metric: str) -> float:
    """"relative_l2": ||actual - expected|| / ||expected|| over every floating output of every batch; "cosine":
    1 - the mean cosine similarity between actual and expected vectors along each output's last dimension."""
    pairs = [(a, e) for got, want in zip(actual, expected) for a, e in zip(_floating(got), _floating(want))]
    if not pairs:
        return 0.0
    if metric == "cosine":
        cosines = torch.cat([torch.nn.functional.cosine_similarity(a.reshape(-1, a.shape[-1] if a.dim() else 1),
                                                                     e.reshape(-1, e.shape[-1] if e.dim() else 1),
                                                                     dim=1) for a, e in pairs])
        return float(1.0 - cosines.mean())
    difference = sum(float((a - e).square().sum()) for a, e in pairs)
    norm = sum(float(e.square().sum()) for _, e in pairs)
    return (difference / norm) ** 0.5 if norm else (0.0 if difference == 0 else float("inf"))
