"""Prune: put the pruned value of each weight the prune stage chose into the graph (sparsecc/pruning/ decides
them). Each constant is replaced by a new tensor, so the tensor it came from, which may be the user's parameter,
keeps its values; analysis then runs again so the plan sees the new zeros."""

from __future__ import annotations

import logging
from typing import Mapping

import torch
from torch import fx

log = logging.getLogger(__name__)


def prune_weights(gm: fx.GraphModule, values: Mapping[str, torch.Tensor]) -> int:
    """`values`: attribute -> pruned tensor of the same shape and dtype. Returns how many constants changed."""
    for attr, value in values.items():
        old = getattr(gm, attr)
        if value.shape != old.shape or value.dtype != old.dtype:
            raise ValueError(f"pruned {attr} is {value.dtype} {tuple(value.shape)}, the weight is {old.dtype} "
                             f"{tuple(old.shape)}")
        gm.register_buffer(attr, value, persistent=False)
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target in values:
            node.meta["val"] = values[node.target]
    return len(values)
