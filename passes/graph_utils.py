"""Small helpers the passes share for reading and editing constants and shapes in an FX graph."""

from __future__ import annotations

import operator
import re

import torch
from torch import fx


# Ops that only re-label a tensor's shape (a Linear on 3-D input is view -> mm -> view).
RESHAPE_OPS = frozenset({torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default,
                         torch.ops.aten.reshape.default})


def constant_of(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor | None:
    """The tensor behind a get_attr node, or None when the node is not a constant tensor."""
    if node.op != "get_attr":
        return None
    value = getattr(gm, node.target, None)  # type: ignore[arg-type]
    return value if isinstance(value, torch.Tensor) else None


def add_constant(gm: fx.GraphModule, name_hint: str, value: torch.Tensor, *, before: fx.Node) -> fx.Node:
    """Register `value` on gm under a fresh attribute name and return a get_attr node placed before `before`."""
    base = re.sub(r"\W", "_", name_hint) or "const"
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    gm.register_buffer(name, value, persistent=False)
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(name)
    node.meta["val"] = value
    return node


def shape_dtype(node: fx.Node) -> tuple[tuple[int, ...], torch.dtype] | None:
    """Static shape and dtype of a node's tensor result, from make_fx's meta or from ShapeProp."""
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return tuple(int(d) for d in val.shape), val.dtype
    tm = node.meta.get("tensor_meta")
    if tm is not None and hasattr(tm, "shape"):
        return tuple(int(d) for d in tm.shape), tm.dtype
    return None


def drop_unused_constants(gm: fx.GraphModule) -> None:
    gm.graph.eliminate_dead_code()
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name in list(gm._buffers):
        if name not in used:
            del gm._buffers[name]
    for name in list(vars(gm)):
        if name.startswith("_tensor_constant") and name not in used:
            delattr(gm, name)
    gm.recompile()


def op_name(node: fx.Node) -> str:
    target = node.target
    if node.op != "call_function":
        return f"{node.op}:{target}"
    return str(target) if isinstance(target, torch._ops.OpOverload) else str(getattr(target, "__name__", target))


def as_single_output(gm: fx.GraphModule, node: fx.Node, target, args: tuple) -> bool:
    """Replace a multi-output op (read through getitem) whose outputs after the first nobody uses by `target(*args)`,
    one output; False, and nothing changed, when another output is used."""
    users = list(node.users)
    if not users or any(u.target is not operator.getitem or (u.args[1] != 0 and u.users) for u in users):
        return False
    with gm.graph.inserting_before(node):
        single = gm.graph.call_function(target, args)
    val = node.meta.get("val")
    if isinstance(val, (tuple, list)):
        single.meta["val"] = val[0]
    for u in users:
        if u.args[1] == 0:
            u.replace_all_uses_with(single)
    return True

