"""The pruned weights in the user's terms: each pruned constant's value as the model's own tensor holds it (the
graph often multiplies a weight's transpose), for prune={"inplace": True} and for compiling other input shapes of a
model pruned once."""

from __future__ import annotations

import logging
import warnings
from typing import Mapping

import torch
from torch import fx

from sparsecc.passes.fold_constants import ORIGIN

log = logging.getLogger(__name__)


def pruned_user_weights(gm: fx.GraphModule, originals: Mapping[str, torch.Tensor],
                        weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """User name -> pruned value shaped like the user's tensor, for each pruned constant (attr -> its value before
    pruning) that is that tensor or its transpose. A constant computed from a weight in another way (e.g.
    weight_orig * weight_mask) has no such value; it is warned about and left out."""
    values = {}
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "get_attr"}
    for attr, before in originals.items():
        name = nodes[attr].meta.get(ORIGIN, attr)
        user = weights.get(name)
        after = getattr(gm, attr)
        if user is not None and user.shape == before.shape and torch.equal(user, before):
            values[name] = after
        elif user is not None and user.dim() == 2 and user.shape == before.t().shape and torch.equal(user, before.t()):
            values[name] = after.t()
        else:
            warnings.warn(f"sparsecc prune: the pruned {name} cannot be put back into the model: the graph "
                          "multiplies a value computed from it; inplace=True leaves that weight, and other input "
                          "shapes of this graph run it dense", stacklevel=3)
    return values


def write_back(values: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor]) -> int:
    """Copy each pruned value (user name -> tensor, from pruned_user_weights) into the user's tensor."""
    with torch.no_grad():
        for name, value in values.items():
            weights[name].copy_(value)
    log.info("prune: wrote %d pruned weights back into the model", len(values))
    return len(values)
