"""`sparsecc::` custom ops. The rewritten graph uses them; each has a fake (shape) implementation for
tracing and an eager reference built on torch.sparse, so a rewritten graph still runs in plain PyTorch."""

from __future__ import annotations

import warnings

import torch

from sparsecc.packing import SPARSE_BETA

ACTIVATIONS = {
    "none": lambda y: y,
    "relu": torch.relu,
    "gelu": torch.nn.functional.gelu,
    "gelu_tanh": lambda y: torch.nn.functional.gelu(y, approximate="tanh"),
    "relu6": torch.nn.functional.relu6,
    "silu": torch.nn.functional.silu,
}


@torch.library.custom_op("sparsecc::sparse_linear", mutates_args=())
def sparse_linear(
    x: torch.Tensor,
    indptr: torch.Tensor,
    indices: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
    activation: str = "none",
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = activation(x @ W^T + bias) + residual for 2-D x, with W (out_features x in_features) in
    block-sparse rows: `values` is (stored blocks, r, c); CSR is the 1 x 1 case. activation is one of
    ACTIVATIONS; residual, if given, is (rows of x, out_features)."""
    _, r, c = values.shape
    size = (out_features, x.shape[1])
    indices = indices.to(indptr.dtype)  # torch's sparse tensors want one index dtype
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=SPARSE_BETA)
        if (r, c) == (1, 1):
            weight = torch.sparse_csr_tensor(indptr, indices, values.reshape(-1), size, check_invariants=False)
            y = (weight @ x.t()).t()
        else:  # torch's CPU BSR matmul rejects non-square blocks; the reference expands instead
            weight = torch.sparse_bsr_tensor(indptr, indices, values, size, check_invariants=False).to_dense()
            y = x @ weight.t()
    if bias is not None:
        y = y + bias
    y = ACTIVATIONS[activation](y)
    if residual is not None:
        y = y + residual
    return y.contiguous()


@sparse_linear.register_fake
def _(x, indptr, indices, values, bias, out_features, activation="none", residual=None):
    return x.new_empty((x.shape[0], out_features))


@torch.library.custom_op("sparsecc::sparse_conv2d", mutates_args=())
def sparse_conv2d(
    x: torch.Tensor,
    indptr: torch.Tensor,
    indices: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor | None,
    out_channels: int,
    kernel: list[int],
    out_size: list[int],
    activation: str = "none",
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = activation(conv2d(x, W) + bias + residual), stride 1, no padding, cropped to `out_size`, for x (N, C, Hq,
    Wq) already padded (passes/direct_conv.py), with W the (out_channels, C * kh * kw) matrix in CSR (`values` is
    (stored, 1, 1), as sparse_linear takes it). y and residual are (N, out_channels, *out_size); y is contiguous.
    The residual comes before the activation (unlike sparse_linear's): a ResNet block is relu(conv(x) + shortcut)."""
    size = (out_channels, x.shape[1] * kernel[0] * kernel[1])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=SPARSE_BETA)
        weight = torch.sparse_csr_tensor(indptr, indices.to(indptr.dtype), values.reshape(-1), size,
                                         check_invariants=False).to_dense()
    y = torch.nn.functional.conv2d(x, weight.reshape(out_channels, x.shape[1], *kernel), bias)
    y = y[:, :, :out_size[0], :out_size[1]]
    if residual is not None:
        y = y + residual
    return ACTIVATIONS[activation](y).contiguous()


@sparse_conv2d.register_fake
def _(x, indptr, indices, values, bias, out_channels, kernel, out_size, activation="none", residual=None):
    return x.new_empty((x.shape[0], out_channels, *out_size))


# Dense convolutions that stay in PyTorch run oneDNN's convolution on a weight reordered once into its blocked
# layout. F.conv2d reorders the weight on every call: at batch 1 that reorder is most of the time (ResNet-50 layers
# here: 1.7-8x slower than the reordered call, e.g. 64->256 1x1 at 56x56 3.2 ms against 0.39 ms).
_PACKED_WEIGHTS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
CONV_LAYOUTS = ("contiguous", "channels_last", "any")


def packed_conv_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def _packed_weight(weight: torch.Tensor, x_shape, stride, padding, dilation, groups) -> torch.Tensor:
    key = (weight.data_ptr(), weight._version, tuple(weight.shape), tuple(weight.stride()), tuple(x_shape),
           tuple(stride), tuple(padding), tuple(dilation), groups)
    entry = _PACKED_WEIGHTS.get(key)
    # The entry holds the weight (the op may be handed a new alias of it each call, so not compared by identity):
    # its storage stays alive, so no other tensor can take its address while the entry lives; in-place changes
    # bump the version all aliases share.
    if entry is None:
        packed = torch._C._nn.mkldnn_reorder_conv2d_weight(weight.to_mkldnn(), list(padding), list(stride),
                                                           list(dilation), groups, list(x_shape))
        entry = _PACKED_WEIGHTS[key] = (weight, packed)
    return entry[1]


@torch.library.custom_op("sparsecc::packed_conv2d", mutates_args=())
def packed_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: list[int],
                  padding: list[int], dilation: list[int], groups: int, activation: str = "none",
                  layout: str = "contiguous") -> torch.Tensor:
    """activation(conv2d(x, weight, bias)) through oneDNN with the weight reordered once (cached per weight and input
    shape); activation "none" or "relu". The result is in `layout` (CONV_LAYOUTS); "any" leaves oneDNN's own."""
    packed = _packed_weight(weight, x.shape, stride, padding, dilation, groups)
    y = torch.ops.mkldnn._convolution_pointwise(x, packed, bias, padding, stride, dilation, groups, activation, [],
                                               "")
    if layout == "any":
        return y
    return y.contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)


@packed_conv2d.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, activation="none", layout="contiguous"):
    size = [x.shape[0], weight.shape[0]] + [
        (x.shape[i + 2] + 2 * padding[i] - dilation[i] * (weight.shape[i + 2] - 1) - 1) // stride[i] + 1
        for i in range(2)]
    fmt = torch.contiguous_format if layout == "contiguous" else torch.channels_last
    return x.new_empty(size).contiguous(memory_format=fmt)


SPARSE_LINEAR_OPS = frozenset({torch.ops.sparsecc.sparse_linear.default})
# Every op that multiplies by a sparse weight: what a region forms around, and what shows the sparse path ran.
SPARSE_OPS = SPARSE_LINEAR_OPS | {torch.ops.sparsecc.sparse_conv2d.default}


@torch.library.custom_op("sparsecc::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    """Multi-head attention without a mask, every tensor (batch, tokens, heads * head_dim) with the heads side by
    side in the last dimension, as projections produce them (passes/fuse_attention.py rewrites the split into heads,
    scaled_dot_product_attention and the merge back into this op)."""
    batch, tokens, width = q.shape
    split = [t.view(batch, tokens, heads, width // heads).transpose(1, 2) for t in (q, k, v)]
    out = torch.nn.functional.scaled_dot_product_attention(*split, scale=scale)
    return out.transpose(1, 2).reshape(batch, tokens, width)


@attention.register_fake
def _(q, k, v, heads, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def sparse_linear_args(args: tuple) -> tuple:
    """sparse_linear's 8 arguments, with the defaults of activation and residual filled in when a node omits them."""
    return tuple(args) + ("none", None)[len(args) - 6:]
