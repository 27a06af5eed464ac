"""Fold every op whose inputs are all constants into a new constant.

Analysis must see the weight a layer really multiplies by: `weight.t()` from F.linear's decomposition,
`weight_orig * weight_mask` from torch.nn.utils.prune, parametrizations. Each of those is an op over
constants, so evaluating them once at compile time exposes the effective weight (and its zeros).
"""

from __future__ import annotations

import logging

import torch
from torch import fx

from sparsecc.passes.graph_utils import add_constant, constant_of, drop_unused_constants
from sparsecc.settings import Settings

log = logging.getLogger(__name__)

ORIGIN = "sparsecc_origin"  # node.meta key: the user's name of the weight a constant comes from
LAYOUT = "sparsecc_source_layout"  # node.meta key: torch layout the user held the weight in


def _foldable(node: fx.Node) -> bool:
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return False
    if target._schema.is_mutable or torch.Tag.nondeterministic_seeded in target.tags:
        return False
    return True


def fold_constants(gm: fx.GraphModule, settings: Settings) -> fx.GraphModule:
    folded = 0
    # The same op over the same constants folds to one constant: a weight used twice (F.linear called
    # twice with it, each call transposing it) must not be stored, analysed and packed twice.
    seen: dict[str, fx.Node] = {}
    for node in list(gm.graph.nodes):
        if not _foldable(node):
            continue
        inputs = node.all_input_nodes
        values = {n: constant_of(gm, n) for n in inputs}
        if any(v is None for v in values.values()):
            continue
        key = repr((node.target, fx.node.map_arg((node.args, node.kwargs), lambda n: f"<{n.target}>")))
        if key in seen:
            node.replace_all_uses_with(seen[key])
            gm.graph.erase_node(node)
            continue
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: values[n])
        with torch.no_grad():
            result = node.target(*args, **kwargs)
        if not isinstance(result, torch.Tensor):
            continue
        source = _main_source(inputs, values)
        new = add_constant(gm, f"{node.name}_folded", result, before=node)
        if source is not None:
            new.meta[ORIGIN] = source.meta.get(ORIGIN, source.target)
            if LAYOUT in source.meta:
                new.meta[LAYOUT] = source.meta[LAYOUT]
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        seen[key] = new
        folded += 1
    drop_unused_constants(gm)
    log.debug("fold_constants: folded %d ops", folded)
    return gm


def _main_source(inputs: list[fx.Node], values: dict) -> fx.Node | None:
    """The input a folded constant is named after: the largest one, preferring a user parameter over a
    buffer (for prune's weight_orig * weight_mask the name should be weight_orig's)."""
    if not inputs:
        return None
    return max(inputs, key=lambda n: (values[n].numel(), bool(n.meta.get("sparsecc_is_parameter"))))
