"""native_layer_norm whose mean and reciprocal deviation go unused -> layer_norm, one output.

Why: dynamo's ATen graph spells F.layer_norm as native_layer_norm, three outputs taken apart by getitem; for
inference only the first is read. With one output the op lowers like any other (codegen/kernels/cpu/layer_norm.py),
and the layer norms between a transformer layer's sparse kernels can join their region.
"""

from __future__ import annotations

import torch
from torch import fx

from sparsecc.passes.graph_utils import as_single_output
from sparsecc.settings import Settings

aten = torch.ops.aten


def simplify_layer_norm(gm: fx.GraphModule, settings: Settings) -> int:
    """Rewrite every layer norm whose statistics are unused; returns how many."""
    done = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.native_layer_norm.default:
            continue
        x, shape, weight, bias, eps = node.args
        if as_single_output(gm, node, aten.layer_norm.default, (x, shape, weight, bias, eps)):
            done += 1
    return done
