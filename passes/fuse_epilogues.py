"""Fuse what follows a sparse_linear into its epilogue: an activation (ReLU, GELU) and then a residual add; and an
activation that follows a sparse_conv2d (through the copy that restores a channels-last output's memory format,
which an activation commutes with).

Each fused op saves a full pass over the layer's output in memory. The pattern is looked for through reshapes,
because a Linear on 3-D input becomes `view(sparse_linear(view(x)))` and the activation or the add applies to
the outer view; both commute with a reshape, so they can move inside it.
"""

from __future__ import annotations

import torch
from torch import fx

from sparsecc.ops import SPARSE_LINEAR_OPS, sparse_linear_args
from sparsecc.passes.graph_utils import RESHAPE_OPS, shape_dtype
from sparsecc.settings import Settings

aten = torch.ops.aten
ACTIVATION, RESIDUAL = 6, 7  # positions in sparse_linear's arguments
CONV_ACTIVATION = 8  # in sparse_conv2d's
SPARSE_CONV = torch.ops.sparsecc.sparse_conv2d.default


def _activation(node: fx.Node) -> str | None:
    if node.target is aten.relu.default:
        return "relu"
    if node.target is aten.gelu.default:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(node.kwargs.get("approximate", "none"))
    return None


def fuse_epilogues(gm: fx.GraphModule, settings: Settings) -> int:
    """Fuse activations and residual adds into the sparse ops they follow; returns how many."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    fused = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is SPARSE_CONV:
            fused += _fuse_conv_activation(gm, node)
            continue
        if node.op != "call_function" or node.target not in SPARSE_LINEAR_OPS:
            continue
        args = list(sparse_linear_args(node.args))
        end = _through_reshapes(node)
        user = _only_user(end)
        act = _activation(user) if user is not None else None
        if act is not None and args[ACTIVATION] == "none":
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


def _fuse_conv_activation(gm: fx.GraphModule, node: fx.Node) -> int:
    args = list(node.args) + ["none"] * (CONV_ACTIVATION + 1 - len(node.args))
    end = node
    user = _only_user(end)
    if user is not None and user.target is aten.clone.default and user.args[0] is end:
        end, user = user, _only_user(user)
    act = _activation(user) if user is not None else None
    if act is None or args[CONV_ACTIVATION] != "none":
        return 0
    args[CONV_ACTIVATION] = act
    node.args = tuple(args)
    user.replace_all_uses_with(end)
    gm.graph.erase_node(user)
    return 1


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
