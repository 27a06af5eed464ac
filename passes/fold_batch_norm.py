"""Fold an inference batch norm into the convolution before it: conv(x, W, b) then BN(gamma, beta, mean, var, eps)
is conv(x, W * s, (b - mean) * s + beta) with s = gamma / sqrt(var + eps) per output channel.

Why: a CNN in eval mode normalises every convolution's output with constants. Folded, the normalisation costs
nothing, the convolution's zeros stay zeros (scaling a row keeps its pattern), and the sparse kernel's bias epilogue
does the shift; left alone it is a full pass over each activation in PyTorch, between regions.

Only when everything is constant (weights, statistics) and the batch norm is in inference mode and the
convolution's only user: a convolution whose raw output is used elsewhere keeps it. The folded weight is a new
constant; the user's tensors are never written. It keeps the original weight's name for reports.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from sparsecc.passes.fold_constants import ORIGIN
from sparsecc.passes.graph_utils import add_constant, constant_of
from sparsecc.passes.pointwise_conv import CONVOLUTION
from sparsecc.settings import Settings

aten = torch.ops.aten
# (op, position of `training` or None when the op is inference-only, position of eps)
BATCH_NORMS = {aten.native_batch_norm.default: (5, 7), aten._native_batch_norm_legit_no_training.default: (None, 6)}


def fold_batch_norm(gm: fx.GraphModule, settings: Settings) -> int:
    """Fold inference batch norms into the convolutions they follow; returns how many."""
    folded = 0
    for bn in list(gm.graph.nodes):
        if bn.op != "call_function" or bn.target not in BATCH_NORMS:
            continue
        conv = bn.args[0]
        if not (isinstance(conv, fx.Node) and conv.target is CONVOLUTION and len(conv.users) == 1):
            continue
        training_at, eps_at = BATCH_NORMS[bn.target]
        if training_at is not None and bn.args[training_at]:
            continue
        users = list(bn.users)
        if not all(u.target is operator.getitem and u.args[1] == 0 for u in users):
            continue  # the saved statistics are used: not a plain inference batch norm
        weight_node, bias_node = conv.args[1], conv.args[2]
        weight = constant_of(gm, weight_node)
        bias = constant_of(gm, bias_node) if bias_node is not None else None
        gamma, beta, mean, var = (constant_of(gm, a) if isinstance(a, fx.Node) else None for a in bn.args[1:5])
        if weight is None or mean is None or var is None or (bias_node is not None and bias is None) or \
                (bn.args[1] is not None and gamma is None) or (bn.args[2] is not None and beta is None):
            continue
        scale = torch.rsqrt(var.to(torch.float64) + float(bn.args[eps_at]))
        if gamma is not None:
            scale = scale * gamma.to(torch.float64)
        shift = -mean.to(torch.float64) * scale
        if bias is not None:
            shift = shift + bias.to(torch.float64) * scale
        if beta is not None:
            shift = shift + beta.to(torch.float64)
        new_weight = (weight.to(torch.float64) * scale.view(-1, *([1] * (weight.dim() - 1)))).to(weight.dtype)
        name = str(weight_node.meta.get(ORIGIN, weight_node.target))
        w = add_constant(gm, f"{weight_node.target}_bn_folded", new_weight.contiguous(), before=conv)
        w.meta[ORIGIN] = name
        b = add_constant(gm, f"{weight_node.target}_bn_folded_bias", shift.to(weight.dtype), before=conv)
        conv.args = (conv.args[0], w, b, *conv.args[3:])
        for u in users:
            u.replace_all_uses_with(conv)
            gm.graph.erase_node(u)
        gm.graph.erase_node(bn)
        folded += 1
    return folded
