"""k x k convolutions with a sparse weight, computed directly (codegen/kernels/cpu/direct_conv.py): which ones, how
their weight and input are rearranged, and the graph that computes one.

The kernel runs only stride 1, no dilation, over an input padded by the graph. Strides and dilations become that
case by splitting the input into stride phases: output row i reads input row i * s + u * d, which is row
i + (u * d) // s of phase (u * d) % s, the image's rows of that remainder. So the convolution is a stride-1 one
over C * sh * sw phase channels with a kernel of ((kh - 1) * dh) // sh + 1 rows (and the same for columns), whose
weight holds each original tap at its phase and offset and zeros elsewhere. A sparse weight does not store those
zeros, so the rearrangement costs nothing in the kernel; for stride 1 it is the identity, and a dilation just spreads
the taps. The phases are a reshape and a permute of the padded input (one copy, of the input's size).

Grouped and transposed convolutions stay in PyTorch (the plan says so per weight), as does any 1x1 convolution
passes/pointwise_conv.py runs as a matrix product.
"""

from __future__ import annotations

import dataclasses
import json

import torch
from torch import fx

from sparsecc.conv_work import tail_rows
from sparsecc.passes.graph_utils import shape_dtype
from sparsecc.passes.pointwise_conv import conv_arguments, is_channels_last, no_sparse_kernel

aten = torch.ops.aten
# The use analysis records for a convolution sparsecc runs with the direct kernel (WeightUse.op).
DIRECT_USE = "conv_direct"
DIRECT_DTYPES = (torch.float32, torch.float64)


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """One convolution's shapes and arguments, and the stride-1 phase convolution the kernel computes."""

    batch: int
    channels: int
    size: tuple[int, int]  # input H, W
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    out_size: tuple[int, int]
    dtype: str
    channels_last: bool = False  # the input's (and so eager's output's) memory format

    @classmethod
    def of(cls, node: fx.Node, weight: torch.Tensor) -> "ConvGeometry":
        x, _, _, stride, padding, dilation = conv_arguments(node)[:6]
        (n, c, h, w), dtype = shape_dtype(x)
        out = shape_dtype(node)[0]
        return cls(int(n), int(c), (int(h), int(w)), int(weight.shape[0]), tuple(map(int, weight.shape[2:])),
                   _pair(stride), _pair(padding), _pair(dilation), (int(out[2]), int(out[3])),
                   str(dtype).removeprefix("torch."), is_channels_last(x))

    @property
    def phase_kernel(self) -> tuple[int, int]:
        return tuple(((k - 1) * d) // s + 1 for k, d, s in zip(self.kernel, self.dilation, self.stride))

    @property
    def single_phase(self) -> bool:
        """Every tap falls in the first phase (a strided 1x1 convolution, say): the split is then a strided slice
        of the padded input, and the other phases, which no weight reads, are never copied."""
        return all((u * d) % s == 0 for k, d, s in zip(self.kernel, self.dilation, self.stride) for u in range(k))

    @property
    def phase_channels(self) -> int:
        return self.channels if self.single_phase else self.channels * self.stride[0] * self.stride[1]

    @property
    def taps(self) -> int:
        return self.phase_kernel[0] * self.phase_kernel[1]

    @property
    def phase_size(self) -> tuple[int, int]:
        """(Hq, Wq) of the phase input the kernel reads, with its rows of zeros below (`tail_rows`)."""
        (ka, kb), (ho, wo) = self.phase_kernel, self.out_size
        wq = wo + kb - 1
        return ho + ka - 1 + tail_rows(wq, self.dtype), wq

    @property
    def macs(self) -> int:
        return self.batch * self.out_channels * self.out_size[0] * self.out_size[1] * self.channels * \
            self.kernel[0] * self.kernel[1]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ConvGeometry":
        d = json.loads(text)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _pair(v) -> tuple[int, int]:
    v = list(v)
    return (int(v[0]), int(v[-1]))


def why_not_direct(node: fx.Node, weight: torch.Tensor) -> str | None:
    """None when `node` (aten.convolution with constant `weight`) is one the direct kernel computes; else what it
    is, for the plan's reason line."""
    if (why := no_sparse_kernel(node, weight)) is not None:
        return why
    x = conv_arguments(node)[0]
    info, out = shape_dtype(x), shape_dtype(node)
    kernel = "x".join(map(str, weight.shape[2:]))
    if info[1] not in DIRECT_DTYPES or info[1] != weight.dtype:
        return f"a {kernel} convolution of {info[1]} inputs and {weight.dtype} weights"
    if any(not isinstance(d, int) for d in (*info[0], *out[0])):
        return f"a {kernel} convolution with symbolic shapes"
    return None


def phase_weight(weight: torch.Tensor, geo: ConvGeometry) -> torch.Tensor:
    """The (out, phase channels * taps) matrix of the stride-1 phase convolution (module docstring); column
    (c * sh * sw + ph * sw + pw) * taps + a * kb + b holds tap (u, v) with u * dh = a * sh + ph, v * dw = b * sw + pw."""
    (sh, sw), (dh, dw), (ka, kb) = geo.stride, geo.dilation, geo.phase_kernel
    o, c, kh, kw = weight.shape
    out = weight.new_zeros((o, c, 1, 1, ka, kb) if geo.single_phase else (o, c, sh, sw, ka, kb))
    for u in range(kh):
        a, ph = divmod(u * dh, sh)
        for v in range(kw):
            b, pw = divmod(v * dw, sw)
            out[:, :, ph, pw, a, b] = weight[:, :, u, v]
    return out.reshape(o, -1)


def phase_input(graph: fx.Graph, x: fx.Node, geo: ConvGeometry) -> fx.Node:
    """Nodes (inserted at the graph's cursor) giving the (N, phase channels, Hq, Wq) input of the phase
    convolution: padded (negative pads crop rows the convolution never reads), split into phases."""
    (sh, sw), (ph, pw), (h, w) = geo.stride, geo.padding, geo.size
    hq, wq = geo.phase_size
    pads = [pw, wq * sw - w - pw, ph, hq * sh - h - ph]
    y = graph.call_function(aten.constant_pad_nd.default, (x, pads, 0.0))
    if (sh, sw) != (1, 1) and geo.single_phase:
        y = graph.call_function(aten.slice.Tensor, (y, 2, 0, hq * sh, sh))
        y = graph.call_function(aten.slice.Tensor, (y, 3, 0, wq * sw, sw))
    elif (sh, sw) != (1, 1):
        n, c = geo.batch, geo.channels
        y = graph.call_function(aten.reshape.default, (y, [n, c, hq, sh, wq, sw]))
        y = graph.call_function(aten.permute.default, (y, [0, 1, 3, 5, 2, 4]))
    # Contiguous: the kernel reads the image flat (a region's input arrives contiguous anyway).
    return graph.call_function(aten.reshape.default, (y, [geo.batch, geo.phase_channels, hq, wq]))
