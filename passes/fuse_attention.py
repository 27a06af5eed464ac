"""Fuse multi-head attention into one `sparsecc::attention` op: the split of q, k and v into heads (a view to
(batch, tokens, heads, head_dim), then a transpose), PyTorch's scaled-dot-product attention, and the merge of the
heads back into (batch, tokens, heads * head_dim).

Why: the transposes and the attention are not sparse ops, so each transformer layer crossed from TVM to PyTorch
and back around them. As one op on the projections' own layout, attention lowers to a TVM kernel
(codegen/kernels/cpu/attention.py), and a layer's projections, attention and feed-forward become one region.
Only what that kernel computes is fused: no mask, not causal, no dropout, q, k and v of one shape. Anything else
keeps PyTorch's attention.
"""

from __future__ import annotations

import math
import operator

import torch
from torch import fx

from sparsecc.passes.graph_utils import RESHAPE_OPS, shape_dtype
from sparsecc.settings import Settings

aten = torch.ops.aten
# What dynamo's ATen graph holds for F.scaled_dot_product_attention on CPU.
SDPA_OPS = frozenset({aten._scaled_dot_product_flash_attention_for_cpu.default})


def fuse_attention(gm: fx.GraphModule, settings: Settings) -> int:
    """Rewrite every attention that matches; returns how many."""
    fused = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in SDPA_OPS and _fuse(gm.graph, node):
            fused += 1
    return fused


def _option(node: fx.Node, position: int, name: str, default):
    return node.args[position] if len(node.args) > position else node.kwargs.get(name, default)


def _heads_of(t: fx.Node) -> tuple[fx.Node, tuple[int, ...]] | None:
    """For t = transpose(view(x, (b, s, h, d)), 1, 2): the view and its shape."""
    if t.op != "call_function" or t.target is not aten.transpose.int or sorted(t.args[1:3]) != [1, 2]:
        return None
    split = t.args[0]
    info = shape_dtype(split)
    if not isinstance(split, fx.Node) or split.target not in RESHAPE_OPS or info is None or len(info[0]) != 4:
        return None
    return split, tuple(info[0])


def _fuse(graph: fx.Graph, node: fx.Node) -> bool:
    if _option(node, 3, "dropout_p", 0.0) != 0.0 or _option(node, 4, "is_causal", False):
        return False
    if node.kwargs.get("attn_mask") is not None:
        return False
    splits = [_heads_of(t) for t in node.args[:3]]
    if any(s is None for s in splits) or len({shape for _, shape in splits}) != 1:
        return False
    if any(u.target is not operator.getitem for u in node.users):
        return False
    if any(u.args[1] != 0 and u.users for u in node.users):  # the log-sum-exp output is used
        return False
    batch, tokens, heads, head_dim = splits[0][1]
    scale = node.kwargs.get("scale")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    merged_shape = [batch, tokens, heads * head_dim]
    with graph.inserting_before(node):
        merged = [graph.call_function(aten.view.default, (split, merged_shape)) for split, _ in splits]
        fused = graph.call_function(torch.ops.sparsecc.attention.default, (*merged, heads, scale))
    for out in [u for u in node.users if u.args[1] == 0]:
        _replace_output(graph, out, fused, (batch, tokens, heads, head_dim))
    return True


def _replace_output(graph: fx.Graph, out: fx.Node, fused: fx.Node, split_shape: tuple[int, ...]) -> None:
    """Give out's users (which expect (batch, heads, tokens, head_dim)) the fused result. The usual merge,
    transpose(1, 2) then reshapes, reads the fused output directly (the old merge is left dead for
    fuse_attention's clean-up); any other user gets the heads split again."""
    batch, tokens, heads, head_dim = split_shape
    split_again = None
    for user in list(out.users):
        merge = _merge_after(user, shape_dtype(out)[0])
        if merge is not None:
            for reshape in list(merge.users):
                with graph.inserting_before(reshape):
                    direct = graph.call_function(aten.view.default, (fused, list(shape_dtype(reshape)[0])))
                reshape.replace_all_uses_with(direct)
            continue
        if split_again is None:
            with graph.inserting_before(out):
                split = graph.call_function(aten.view.default, (fused, [batch, tokens, heads, head_dim]))
                split_again = graph.call_function(aten.transpose.int, (split, 1, 2))
        user.replace_input_with(out, split_again)


def _merge_after(user: fx.Node, shape) -> fx.Node | None:
    """The transpose(1, 2) that `user` leads to through same-shape reshapes, if only reshapes read it."""
    merge = user
    while merge.target in RESHAPE_OPS and len(merge.users) == 1 and shape_dtype(merge) and shape_dtype(merge)[0] == shape:
        merge = next(iter(merge.users))
    if merge.target is not aten.transpose.int or sorted(merge.args[1:3]) != [1, 2]:
        return None
    return merge if merge.users and all(r.target in RESHAPE_OPS for r in merge.users) else None
