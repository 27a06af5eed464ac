"""Convolutions that stay dense run as `sparsecc::packed_conv2d`: oneDNN on a weight reordered once, not per call.

Why: F.conv2d reorders a constant weight into oneDNN's blocked layout on every call, and at batch 1 that is most of
its time (sparsecc/ops.py has the figures), so a dense CNN through sparsecc ran no faster than eager and the plan
compared sparse kernels against a handicapped dense. A ReLU that only this convolution feeds is fused (oneDNN's
post-op). The output keeps eager's memory format, unless passes/drop_layout_copies.py finds nothing can see it.
"""

from __future__ import annotations

import torch
from torch import fx

from sparsecc.ops import packed_conv_available
from sparsecc.passes.graph_utils import constant_of, shape_dtype
from sparsecc.passes.pointwise_conv import CONVOLUTION, conv_arguments, is_channels_last
from sparsecc.settings import Settings

aten = torch.ops.aten
PACKED_CONV = torch.ops.sparsecc.packed_conv2d.default


def pack_dense_convs(gm: fx.GraphModule, settings: Settings) -> int:
    """Replace each dense 2-D fp32 convolution with a constant weight; returns how many."""
    if not packed_conv_available():
        return 0
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not CONVOLUTION:
            continue
        x, weight, bias, stride, padding, dilation, transposed, output_padding, groups = conv_arguments(node)[:9]
        info = shape_dtype(x) if isinstance(x, fx.Node) else None
        if transposed or any(output_padding) or info is None or len(info[0]) != 4 or info[1] != torch.float32 or \
                not isinstance(weight, fx.Node) or weight.op != "get_attr" or constant_of(gm, weight) is None or \
                constant_of(gm, weight).dtype != torch.float32 or len(stride) != 2:
            continue
        layout = "channels_last" if is_channels_last(node) else "contiguous"
        user = next(iter(node.users)) if len(node.users) == 1 else None
        fuse = user is not None and user.op == "call_function" and user.target is aten.relu.default
        with gm.graph.inserting_before(node):
            packed = gm.graph.call_function(PACKED_CONV, (x, weight, bias, list(stride), list(padding),
                                                          list(dilation), int(groups), "relu" if fuse else "none",
                                                          layout))
        packed.meta["val"] = node.meta.get("val")
        node.replace_all_uses_with(packed)
        gm.graph.erase_node(node)
        if fuse:
            user.replace_all_uses_with(packed)
            gm.graph.erase_node(user)
        count += 1
    return count
