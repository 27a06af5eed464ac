"""1x1 convolutions as matrix products: which ones, and the graph that computes one with a sparse weight.

A 1x1 convolution with one group and no padding multiplies every pixel's channel vector by the (out, in) weight: in
the channels-last layout that is `sparse_linear` over N * H' * W' rows (a stride s first keeps every s-th pixel). The
activations go channels-last for the product, which for a channels-last input is a view (no copy, nothing like
im2col); the result keeps the memory format eager PyTorch's convolution would give, so later views of it behave
the same.

k x k, grouped, padded and transposed convolutions stay in PyTorch (the plan says so per weight).
"""

from __future__ import annotations

import torch
from torch import fx

from sparsecc.passes.graph_utils import shape_dtype

aten = torch.ops.aten
CONVOLUTION = aten.convolution.default
# The use analysis records for a convolution sparsecc multiplies as a matrix product (WeightUse.op).
POINTWISE_USE = "conv1x1"


def conv_arguments(node: fx.Node) -> tuple:
    """(x, weight, bias, stride, padding, dilation, transposed, output_padding, groups) of a convolution node."""
    return tuple(node.args) + tuple(node.kwargs.values())


def no_sparse_kernel(node: fx.Node, weight: torch.Tensor) -> str | None:
    """What makes a convolution one no sparse kernel takes (neither the product nor the direct kernel), or None."""
    x, _, _, _, _, _, transposed, _, groups = conv_arguments(node)[:9]
    info = shape_dtype(x) if isinstance(x, fx.Node) else None
    if weight.dim() != 4 or info is None or len(info[0]) != 4 or shape_dtype(node) is None:
        return f"a {weight.dim() - 2}-D convolution (only 2-D ones have a sparse kernel)"
    kernel = "x".join(map(str, weight.shape[2:]))
    if transposed:
        return f"a transposed {kernel} convolution"
    if groups != 1:
        return f"a {kernel} convolution in {groups} groups (grouped and depthwise ones stay dense)"
    return None


def why_not_pointwise(node: fx.Node, weight: torch.Tensor) -> str | None:
    """None when `node` (aten.convolution with constant `weight`) is a 1x1 convolution sparsecc runs as a matrix
    product; else what it is, for the plan's reason line."""
    x, _, _, stride, padding = conv_arguments(node)[:5]
    info = shape_dtype(x) if isinstance(x, fx.Node) else None
    if (why := no_sparse_kernel(node, weight)) is not None:
        return why
    kernel = "x".join(map(str, weight.shape[2:]))
    if tuple(weight.shape[2:]) != (1, 1):
        return f"a {kernel} convolution (only 1x1 convolutions have a sparse kernel yet)"
    if any(p != 0 for p in padding):
        return f"a 1x1 convolution with padding {list(padding)}"
    if not torch.is_floating_point(weight) or info[1] != weight.dtype:
        return f"a 1x1 convolution of {info[1]} inputs and {weight.dtype} weights"
    del stride  # any stride: every s-th pixel is sliced out first
    return None


def channels_last_rows(graph: fx.Graph, node: fx.Node) -> tuple[fx.Node, tuple[int, int, int, int]]:
    """Nodes (before `node`) giving the convolution's input as (N * H' * W', C) rows; and the output's (N, K, H',
    W')."""
    x, _, _, stride = conv_arguments(node)[:4]
    out_shape = shape_dtype(node)[0]
    n, k, h, w = out_shape
    for dim, step in ((2, stride[0]), (3, stride[1])):
        if step != 1:
            x = graph.call_function(aten.slice.Tensor, (x, dim, 0, None, step))
    rows = graph.call_function(aten.permute.default, (x, [0, 2, 3, 1]))
    return graph.call_function(aten.reshape.default, (rows, [n * h * w, shape_dtype(node.args[0])[0][1]])), out_shape


def as_convolution_output(graph: fx.Graph, node: fx.Node, rows: fx.Node) -> fx.Node:
    """The (N * H' * W', K) product rows as the convolution's (N, K, H', W') output, in the memory format eager
    PyTorch gives it (channels-last for a channels-last input, else contiguous)."""
    n, k, h, w = shape_dtype(node)[0]
    y = graph.call_function(aten.permute.default, (graph.call_function(aten.view.default, (rows, [n, h, w, k])),
                                                   [0, 3, 1, 2]))
    if is_channels_last(node):
        return y
    return graph.call_function(aten.clone.default, (y,), {"memory_format": torch.contiguous_format})


def is_channels_last(node: fx.Node) -> bool:
    """Whether the node's value is a 4-D tensor in the channels-last memory format (not also contiguous)."""
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.dim() == 4 and not val.is_contiguous() and \
        val.is_contiguous(memory_format=torch.channels_last)
