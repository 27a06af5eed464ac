"""Drop the copies back to channels-last that the rewrite put after direct convolutions, where nothing can see them;
and let dense packed convolutions (passes/pack_dense_convs.py) leave their output in oneDNN's layout there.

The direct kernel writes NCHW. For a channels-last input eager's convolution gives a channels-last output, so the
rewrite copies the result back (later views may rely on the strides). Between two sparse convolutions that copy is
pure cost: a pass over the activations and, in PyTorch, a border between two regions (ResNet-50 channels-last ran
1.3x slower than NCHW through sparsecc with every copy kept). A value's memory format can only be seen by a graph
output, a view (which may need eager's strides), or an op whose result keeps the format and is itself seen; it is
unseen when every path from it ends in a sparse op, through ops that give the same values in any layout. Run after
epilogue fusion, which turns a ResNet block's residual add and ReLU into the next kernel's epilogue.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from sparsecc.ops import SPARSE_OPS
from sparsecc.settings import Settings

aten = torch.ops.aten
PACKED_CONV = torch.ops.sparsecc.packed_conv2d.default
# Ops that read their input in any layout and give their result in one of their own.
LAYOUT_SINKS = SPARSE_OPS | {PACKED_CONV}

# Ops that give the same values whatever their input's strides and never fail on them (unlike `view`).
LAYOUT_FREE = frozenset({
    aten.relu.default, aten.hardtanh.default, aten.silu.default, aten.gelu.default, aten.sigmoid.default,
    aten.add.Tensor, aten.mul.Tensor, aten.sub.Tensor, aten.max_pool2d_with_indices.default,
    aten.avg_pool2d.default, aten.convolution.default, aten.constant_pad_nd.default, aten.reshape.default,
    aten.permute.default, aten.slice.Tensor, aten.clone.default, operator.getitem})


def layout_seen(node: fx.Node) -> bool:
    """Whether some path from `node` reaches something that can see its value's strides (module docstring)."""
    seen: set[fx.Node] = set()
    todo = [node]
    while todo:
        for user in todo.pop().users:
            if user in seen:
                continue
            seen.add(user)
            if user.op == "call_function" and user.target in LAYOUT_SINKS:
                continue
            if user.op != "call_function" or user.target not in LAYOUT_FREE or (
                    user.target is aten.clone.default and user.kwargs.get("memory_format") is not None):
                return True
            todo.append(user)
    return False


def drop_layout_copies(gm: fx.GraphModule, settings: Settings) -> int:
    """Remove unseen channels-last copies of sparse convolution outputs, and let dense packed convolutions whose
    output is unseen keep oneDNN's layout; returns how many."""
    dropped = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is PACKED_CONV and node.args[8] != "any" and \
                not layout_seen(node):
            node.args = (*node.args[:8], "any")
            dropped += 1
            continue
        if node.op == "call_function" and node.target is aten.clone.default and \
                node.kwargs.get("memory_format") is torch.channels_last and \
                isinstance(node.args[0], fx.Node) and node.args[0].target is torch.ops.sparsecc.sparse_conv2d.default \
                and not layout_seen(node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            dropped += 1
    return dropped
