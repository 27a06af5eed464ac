"""prune={"inplace": True}: the pruned values written into the user's own weight tensors."""

from __future__ import annotations

import logging
import warnings
from typing import Mapping

import torch
from torch import fx

from sparsecc.passes.fold_constants import ORIGIN

log = logging.getLogger(__name__)


def write_back(gm: fx.GraphModule, originals: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor]) -> int:
    """For each pruned constant (attr -> its value before pruning), copy the pruned value into the user's tensor it
    was taken from: as is, or transposed where the graph multiplies the transpose. A constant computed from a weight
    in another way (e.g. weight_orig * weight_mask) cannot be written back; that is warned about and skipped."""
    written = 0
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "get_attr"}
    for attr, before in originals.items():
        name = nodes[attr].meta.get(ORIGIN, attr)
        user = weights.get(name)
        after = getattr(gm, attr)
        if user is not None and user.shape == before.shape and torch.equal(user, before):
            target = after
        elif user is not None and user.dim() == 2 and user.shape == before.t().shape and torch.equal(user, before.t()):
            target = after.t()
        else:
            warnings.warn(f"sparsecc prune: inplace=True cannot write the pruned {name} back into the model: the "
                          "graph multiplies a value computed from it; the model keeps its weight", stacklevel=3)
            continue
        with torch.no_grad():
            user.copy_(target)
        written += 1
    log.info("prune: wrote %d pruned weights back into the model", written)
    return written
