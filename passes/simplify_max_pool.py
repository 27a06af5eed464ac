"""Max pools whose indices nobody reads become `aten.max_pool2d`, one output, which codegen has a kernel for.

Capture decomposes `F.max_pool2d` into `max_pool2d_with_indices` and takes element 0; an op with two outputs cannot
join a TVM region, and in PyTorch the indices cost time too.
"""

from __future__ import annotations

import torch
from torch import fx

from sparsecc.passes.graph_utils import as_single_output
from sparsecc.settings import Settings

aten = torch.ops.aten


def simplify_max_pool(gm: fx.GraphModule, settings: Settings) -> int:
    """Replace each max_pool2d_with_indices whose indices are unused; returns how many."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is aten.max_pool2d_with_indices.default and \
                not node.kwargs and as_single_output(gm, node, aten.max_pool2d.default, tuple(node.args)):
            count += 1
    return count
