"""Fuse what follows a sparse op into its epilogue: after a sparse_linear an activation (ReLU, GELU) and then a
residual add; after a sparse_conv2d a residual add and then an activation (also ReLU6, SiLU), through the copy that
restores a channels-last output's memory format, which elementwise ops commute with.

Each fused op saves a full pass over the layer's output in memory. The pattern is looked for through reshapes,
because a Linear on 3-D input becomes `view(sparse_linear(view(x)))` and the activation or the add applies to
the outer view; both commute with a reshape, so they can move inside it.
"""

from __future__ import annotations

import torch
from torch import fx

from sparsecc.kernel_work import ACTIVATIONS as KERNEL_ACTIVATIONS
from sparsecc.ops import SPARSE_LINEAR_OPS, sparse_linear_args
from sparsecc.passes.graph_utils import RESHAPE_OPS, shape_dtype
from sparsecc.settings import Settings

aten = torch.ops.aten
ACTIVATION, RESIDUAL = 6, 7  # positions in sparse_linear's arguments
CONV_ACTIVATION, CONV_RESIDUAL = 8, 9  # in sparse_conv2d's
SPARSE_CONV = torch.ops.sparsecc.sparse_conv2d.default


def _activation(node: fx.Node) -> str | None:
    if node.target is aten.relu.default:
        return "relu"
    if node.target is aten.silu.default:
        return "silu"
    if node.target is aten.hardtanh.default and tuple(node.args[1:3]) == (0.0, 6.0) and not node.kwargs:
        return "relu6"
    if node.target is aten.gelu.default:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(node.kwargs.get("approximate", "none"))
    return None


def fuse_epilogues(gm: fx.GraphModule, settings: Settings) -> int:
    """Fuse activations and residual adds into the sparse ops they follow; returns how many."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    fused = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is SPARSE_CONV:
            fused += _fuse_conv_epilogue(gm, node, order)
            continue
        if node.op != "call_function" or node.target not in SPARSE_LINEAR_OPS:
            continue
        args = list(sparse_linear_args(node.args))
        end = _through_reshapes(node)
        user = _only_user(end)
        act = _activation(user) if user is not None else None
        if act in KERNEL_ACTIVATIONS and args[ACTIVATION] == "none":
            args[ACTIVATION] = act
            user.replace_all_uses_with(end)
            gm.graph.erase_node(user)
            user = _only_user(end)
            fused += 1
        x_info = shape_dtype(args[0])
        if x_info is None or user is None or args[RESIDUAL] is not None:
            node.args = tuple(args)
            continue
        out_info = ((x_info[0][0], args[5]), x_info[1]) if end is node else shape_dtype(end)
        residual = _residual_operand(user, end, out_info)
        # The residual must exist before the sparse op runs. A constant has no inputs and can move up;
        # moving computed nodes would reorder the user's graph.
        if residual is not None and residual.op == "get_attr" and order[residual] > order[node]:
            node.prepend(residual)
            order[residual] = order[node] - 0.5
        if residual is not None and order.get(residual, len(order)) < order[node]:
            with gm.graph.inserting_before(node):
                args[RESIDUAL] = gm.graph.call_function(aten.reshape.default, (residual, [x_info[0][0], args[5]]))
            user.replace_all_uses_with(end)
            gm.graph.erase_node(user)
            fused += 1
        node.args = tuple(args)
    return fused


def _fuse_conv_epilogue(gm: fx.GraphModule, node: fx.Node, order: dict) -> int:
    """A residual add, then an activation, into a sparse_conv2d: relu(conv(x) + shortcut) is how a ResNet block
    ends. Both are looked for through the copy that restores a channels-last output's memory format, which an
    elementwise op commutes with."""
    args = list(node.args) + ["none", None][len(node.args) - CONV_ACTIVATION:]
    end = node
    user = _only_user(end)
    if user is not None and user.target is aten.clone.default and user.args[0] is end:
        end, user = user, _only_user(user)
    fused = 0
    residual = _residual_operand(user, end, shape_dtype(node)) if user is not None else None
    if residual is not None and args[CONV_RESIDUAL] is None and args[CONV_ACTIVATION] == "none":
        # A shortcut computed after the convolution (HF's ResNet does the main path first): the convolution, whose
        # only use is this add, moves down to just before it, where both operands exist.
        if order.get(residual, len(order)) > order[node]:
            user.prepend(node)
            if end is not node:
                user.prepend(end)
        args[CONV_RESIDUAL] = residual
        user.replace_all_uses_with(end)
        gm.graph.erase_node(user)
        user = _only_user(end)
        fused += 1
    act = _activation(user) if user is not None else None
    if act is not None and args[CONV_ACTIVATION] == "none":
        args[CONV_ACTIVATION] = act
        user.replace_all_uses_with(end)
        gm.graph.erase_node(user)
        fused += 1
    node.args = tuple(args)
    return fused


def _through_reshapes(node: fx.Node) -> fx.Node:
    while True:
        user = _only_user(node)
        if user is None or user.target not in RESHAPE_OPS or user.args[0] is not node:
            return node
        node = user


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _residual_operand(add: fx.Node, end: fx.Node, out_info) -> fx.Node | None:
    """The other operand of `end + other`, when it has exactly end's shape and dtype (no broadcasting)."""
    if add.target is not aten.add.Tensor or add.kwargs.get("alpha", 1) != 1 or len(add.args) != 2:
        return None
    a, b = add.args
    other = b if a is end else a if b is end else None
    if not isinstance(other, fx.Node) or other is end:
        return None
    theirs = shape_dtype(other)
    return other if out_info is not None and out_info == theirs else None
