"""Max pools whose indices nobody reads become `aten.max_pool2d`, one output, which codegen has a kernel for.

Capture decomposes `F.max_pool2d` into `max_pool2d_with_indices` and takes element 0; an op with two outputs cannot
join a TVM region, and in PyTorch the indices cost time too.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from sparsecc.settings import Settings

aten = torch.ops.aten


def simplify_max_pool(gm: fx.GraphModule, settings: Settings) -> int:
    """Replace each max_pool2d_with_indices read only at element 0; returns how many."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.max_pool2d_with_indices.default:
            continue
        users = list(node.users)
        if not users or any(u.target is not operator.getitem or u.args[1] != 0 for u in users):
            continue
        with gm.graph.inserting_before(node):
            pool = gm.graph.call_function(aten.max_pool2d.default, node.args, dict(node.kwargs))
        val = node.meta.get("val")
        if isinstance(val, (tuple, list)):
            pool.meta["val"] = val[0]
        for u in users:
            u.replace_all_uses_with(pool)
            gm.graph.erase_node(u)
        gm.graph.erase_node(node)
        count += 1
    return count
