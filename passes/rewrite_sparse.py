"""Rewrite: replace matrix products with a sparse-planned constant operand by `sparsecc::sparse_linear`.

    addmm(b, x, Wt) / mm(x, Wt)   (weight on the right, Wt = W^T is (K, N))  ->  sparse_linear(x, W, b)
    mm(W, x) / addmm(b, W, x)     (weight on the left, W is (N, K))          ->  sparse_linear(x^T, W)^T (+ b)
    convolution(x, W, b) 1x1      (W is (N, K, 1, 1))                       ->  sparse_linear over channels-last
                                                                                 pixels (passes/pointwise_conv.py)
    convolution(x, W, b) k x k    (W is (N, C, kh, kw))                     ->  sparse_conv2d over the padded,
                                                                                 phase-split input
                                                                                 (passes/direct_conv.py)

The bias is fused into the op when it is a vector of the output width; other broadcasts stay an add.
W is packed in the planned format (sparsecc/packing.py): CSR is BSR with 1 x 1 blocks, ELL is CSR with rows padded to
one length. Packed arrays are graph constants, shared when one weight is used in several places.
"""

from __future__ import annotations

import torch
from torch import fx

from sparsecc.formats import DIRECT_KERNEL, SparseFormat, SparsePlan
from sparsecc.packing import pack_choice
from sparsecc.passes.graph_utils import add_constant, constant_of, drop_unused_constants, shape_dtype
from sparsecc.passes.direct_conv import ConvGeometry, phase_input, phase_weight
from sparsecc.passes.pointwise_conv import CONVOLUTION, as_convolution_output, channels_last_rows, why_not_pointwise
from sparsecc.settings import Settings

aten = torch.ops.aten
REWRITTEN = "sparsecc_rewritten"  # node.meta key on each sparse_linear node: the weight's attribute name


def rewrite_sparse(gm: fx.GraphModule, settings: Settings, plan: SparsePlan) -> int:
    """Replace each matrix product with a weight the plan made sparse by sparse_linear; returns how many."""
    chosen = {k: c for k, c in plan.choices.items() if c.format is not SparseFormat.DENSE}
    packed: dict[tuple[str, bool], tuple[fx.Node, fx.Node, fx.Node]] = {}
    count = 0
    # Read off the graph as captured: once a convolution is replaced, the next one's input is a new node.
    geometries = {n: ConvGeometry.of(n, constant_of(gm, n.args[1])) for n in gm.graph.nodes
                  if n.op == "call_function" and n.target is CONVOLUTION and isinstance(n.args[1], fx.Node)
                  and n.args[1].op == "get_attr" and n.args[1].target in chosen}
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is CONVOLUTION:
            weight = node.args[1]
            if isinstance(weight, fx.Node) and weight.op == "get_attr" and weight.target in chosen:
                choice = chosen[weight.target]
                if why_not_pointwise(node, constant_of(gm, weight)) is None and choice.kernel != DIRECT_KERNEL:
                    _replace_pointwise_conv(gm, node, weight, choice, packed)
                else:  # analysis admitted only convolutions the direct kernel takes
                    _replace_direct_conv(gm, node, weight, choice, packed, geometries[node])
                count += 1
            continue
        if node.op != "call_function" or node.target not in (aten.mm.default, aten.addmm.default):
            continue
        if node.target is aten.addmm.default:
            if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
                continue
            bias, a, b = node.args[:3]
        else:
            bias, (a, b) = None, node.args[:2]
        for weight, x, on_right in ((b, a, True), (a, b, False)):
            if isinstance(weight, fx.Node) and weight.op == "get_attr" and weight.target in chosen:
                _replace(gm, node, weight, x, bias, on_right, chosen[weight.target], packed)
                count += 1
                break
    drop_unused_constants(gm)
    return count


def _packed(gm, node, weight, matrix, on_right, choice, packed, key=None) -> tuple[fx.Node, fx.Node, fx.Node]:
    """The packed arrays of `weight` as graph constants, made once per weight and orientation (or `key`)."""
    key = key or (weight.target, on_right)
    if key not in packed:
        packed[key] = tuple(
            add_constant(gm, f"{weight.target}_packed_{part}", arr, before=node)
            for part, arr in zip(("indptr", "indices", "values"), pack_choice(matrix, choice))
        )
    return packed[key]


def _replace_pointwise_conv(gm, node, weight, choice, packed) -> None:
    tensor = constant_of(gm, weight)  # (out, in, 1, 1): analysis admitted only 1x1 convolutions to the plan
    indptr, indices, values = _packed(gm, node, weight, tensor.reshape(tensor.shape[0], -1), False, choice, packed)
    graph = gm.graph
    with graph.inserting_before(node):
        rows, _ = channels_last_rows(graph, node)
        sparse = graph.call_function(torch.ops.sparsecc.sparse_linear.default,
                                     (rows, indptr, indices, values, node.args[2], int(tensor.shape[0])))
        y = as_convolution_output(graph, node, sparse)
    sparse.meta[REWRITTEN] = weight.target
    node.replace_all_uses_with(y)
    graph.erase_node(node)


def _replace_direct_conv(gm, node, weight, choice, packed, geo: ConvGeometry) -> None:
    tensor = constant_of(gm, weight)
    # The phase weight depends on the stride and dilation: one weight in convolutions of different ones packs twice.
    key = (weight.target, "conv", geo.stride, geo.dilation)
    indptr, indices, values = _packed(gm, node, weight, phase_weight(tensor, geo), False, choice, packed, key)
    graph = gm.graph
    with graph.inserting_before(node):
        x = phase_input(graph, node.args[0], geo)
        y = sparse = graph.call_function(
            torch.ops.sparsecc.sparse_conv2d.default,
            (x, indptr, indices, values, node.args[2], geo.out_channels, list(geo.phase_kernel), list(geo.out_size)))
        # Eager's output keeps a channels-last input's memory format; passes/drop_layout_copies.py removes this copy
        # where nothing can see the strides.
        if geo.channels_last:
            y = graph.call_function(aten.clone.default, (sparse,), {"memory_format": torch.channels_last})
    # Shapes for the passes before the next shape propagation (epilogue fusion matches a residual's shape).
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        # A meta tensor, not a call on dynamo's fake value: that would run in dynamo's fake mode and could leave
        # guards in its shape environment.
        sparse.meta["val"] = torch.empty(val.shape, dtype=val.dtype, device="meta")
        if y is not sparse:
            y.meta["val"] = val
    sparse.meta[REWRITTEN] = weight.target
    node.replace_all_uses_with(y)
    graph.erase_node(node)


def _replace(gm, node, weight, x, bias, on_right, choice, packed) -> None:
    tensor = constant_of(gm, weight)
    # sparse_linear wants W as (out, in) rows; a right operand holds W^T.
    indptr, indices, values = _packed(gm, node, weight, tensor.t() if on_right else tensor, on_right, choice, packed)
    out_features = tensor.shape[1] if on_right else tensor.shape[0]
    fuse_bias = on_right and bias is not None and _is_vector(bias, out_features)
    graph = gm.graph
    with graph.inserting_before(node):
        if on_right:
            y = sparse = graph.call_function(
                torch.ops.sparsecc.sparse_linear.default,
                (x, indptr, indices, values, bias if fuse_bias else None, out_features))
        else:
            xt = graph.call_function(aten.t.default, (x,))
            sparse = graph.call_function(torch.ops.sparsecc.sparse_linear.default,
                                     (xt, indptr, indices, values, None, out_features))
            y = graph.call_function(aten.t.default, (sparse,))
        if bias is not None and not fuse_bias:
            y = graph.call_function(aten.add.Tensor, (y, bias))
    sparse.meta[REWRITTEN] = weight.target
    node.replace_all_uses_with(y)
    graph.erase_node(node)


def _is_vector(bias: fx.Node, width: int) -> bool:
    sd = shape_dtype(bias)
    return sd is not None and sd[0] == (width,)
