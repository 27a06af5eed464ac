"""Remove dead channels: an output row of a linear layer's weight that is entirely zero (given so, or pruned so)
makes that output channel the layer's bias, the same for every token. Where that output reaches exactly one other
linear layer through reshapes and one element-wise activation, the channel is taken out of both layers: the row of
the first weight and of its bias, the matching input column of the second, whose bias absorbs act(bias) x column.

Anything else on the way (a residual add, a norm, a concatenation, a second user) is a boundary: the channel stays,
and the report says why. The dataflow is followed on a networkx view of the graph.
"""

from __future__ import annotations

import dataclasses
import logging

import networkx as nx
import torch
from torch import fx

from sparsecc.passes.fold_constants import ORIGIN
from sparsecc.passes.graph_utils import RESHAPE_OPS, constant_of

log = logging.getLogger(__name__)

aten = torch.ops.aten

# Element-wise ops a channel may pass through between the two layers.
ACTIVATIONS = frozenset({aten.gelu.default, aten.relu.default, aten.silu.default, aten.tanh.default,
                         aten.sigmoid.default})


@dataclasses.dataclass(frozen=True)
class DeadChannels:
    weight: str  # the user's name of the layer whose rows were dead
    dead: int  # all-zero output rows
    removed: int  # of them, taken out of the graph (0 when a boundary stopped it)
    into: str | None  # the next layer, whose inputs shrank and whose bias absorbed the channels
    note: str = ""  # why nothing was removed


def remove_dead_channels(gm: fx.GraphModule, weights: list[str]) -> list[DeadChannels]:
    """`weights`: attributes of the pruned weights (stored (in, out), as addmm's right operand). Edits `gm`."""
    flow = nx.DiGraph()
    for node in gm.graph.nodes:
        flow.add_node(node)
        for user in node.users:
            flow.add_edge(node, user)
    found = []
    for node in list(gm.graph.nodes):
        if node.op != "get_attr" or node.target not in weights:
            continue
        for producer in list(node.users):
            result = _remove_after(gm, flow, node, producer)
            if result is not None:
                found.append(result)
    return found


def _name(node: fx.Node) -> str:
    return str(node.meta.get(ORIGIN, node.target))


def _remove_after(gm: fx.GraphModule, flow: nx.DiGraph, weight: fx.Node, producer: fx.Node) -> DeadChannels | None:
    w = constant_of(gm, weight)
    if producer.target != aten.addmm.default or producer.args[2] is not weight or w is None or w.dim() != 2:
        return None
    dead = ~w.any(dim=0)  # columns of the stored (in, out) weight = output channels
    count = int(dead.sum())
    if not count:
        return None

    def kept(note: str) -> DeadChannels:
        log.info("dead channels: %d in %s kept: %s", count, _name(weight), note)
        return DeadChannels(_name(weight), count, 0, None, note)

    if count == w.shape[1]:
        return kept("every output channel is dead; the layer is its bias")
    bias = producer.args[0]
    b = constant_of(gm, bias) if isinstance(bias, fx.Node) else None
    if b is None or b.dim() != 1 or len(flow.succ[weight]) != 1 or len(flow.succ[bias]) != 1:
        return kept("its weight or bias is shared, or the bias is not a constant vector")
    chain, activation, node = [], None, producer
    while True:
        users = list(flow.succ[node])
        if len(users) != 1:
            return kept(f"{node.name} has {len(users)} users")
        user = users[0]
        if user.op == "call_function" and user.target in RESHAPE_OPS and _last_dim(user) == w.shape[1]:
            chain.append(user)
        elif user.op == "call_function" and user.target in ACTIVATIONS and activation is None and user.args[0] is node:
            activation = user
        elif user.op == "call_function" and user.target == aten.addmm.default and user.args[1] is node:
            consumer = user
            break
        else:
            return kept(f"its output reaches {user.target if user.op == 'call_function' else user.op} "
                        f"({user.name}), not a linear layer")
        node = user
    w2_node, b2_node = consumer.args[2], consumer.args[0]
    w2 = constant_of(gm, w2_node) if isinstance(w2_node, fx.Node) else None
    b2 = constant_of(gm, b2_node) if isinstance(b2_node, fx.Node) else None
    if w2 is None or b2 is None or len(flow.succ[w2_node]) != 1 or len(flow.succ[b2_node]) != 1:
        return kept(f"the next layer ({consumer.name}) has a shared or non-constant weight or bias")
    alive = ~dead
    with torch.no_grad():
        constant = b[dead]
        if activation is not None:
            constant = activation.target(constant, *activation.args[1:], **activation.kwargs)
        new_b2 = b2 + constant @ w2[dead]
        for target_node, value in ((weight, w[:, alive]), (bias, b[alive]), (w2_node, w2[alive]), (b2_node, new_b2)):
            gm.register_buffer(target_node.target, value.contiguous(), persistent=False)
            target_node.meta["val"] = getattr(gm, target_node.target)
    for view in chain:
        shape = list(view.args[1])
        shape[-1] = int(alive.sum())
        view.args = (view.args[0], shape, *view.args[2:])
    log.info("dead channels: removed %d from %s and the inputs of %s", count, _name(weight), _name(w2_node))
    return DeadChannels(_name(weight), count, count, _name(w2_node))


def _last_dim(view: fx.Node) -> int | None:
    shape = view.args[1] if len(view.args) > 1 else None
    return int(shape[-1]) if isinstance(shape, (list, tuple)) and shape and isinstance(shape[-1], int) else None
