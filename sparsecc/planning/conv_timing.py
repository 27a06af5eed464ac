"""Timings of a k x k convolution's two candidates on its own geometry: PyTorch's dense convolution (oneDNN), and the
direct sparse kernel (codegen/kernels/cpu/direct_conv.py) plus the padding and phase split the graph does ahead of
it, so the comparison is the whole cost of either path.

Why measured and not predicted: the cost model knows matrix products; a convolution's time also depends on its
image size, stride and how oneDNN blocks it (on this project's Xeon oneDNN runs a dense 3x3 at about the FMA peak,
so the break-even density moves with every layer shape).
"""

from __future__ import annotations

import torch

from sparsecc.conv_work import ConvKnobs, chunk_pointers
from sparsecc.measure.clock import median_seconds
from sparsecc.ops import packed_conv_available
from sparsecc.packing import pack_blocks
from sparsecc.passes.direct_conv import ConvGeometry
from sparsecc.tolerances import TOLERANCES

RUNS = 10


def _input(geo: ConvGeometry) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(geo.batch, geo.channels, *geo.size, generator=g, dtype=getattr(torch, geo.dtype))
    return x.contiguous(memory_format=torch.channels_last) if geo.channels_last else x


def _convolve(geo: ConvGeometry, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.conv2d(x, weight, bias, geo.stride, geo.padding, geo.dilation)


def dense_conv_seconds(geo: ConvGeometry, runs: int = RUNS) -> float:
    """Median seconds of PyTorch's convolution on `geo`'s shapes and memory format, as a dense one runs in a compiled
    graph: on a weight reordered once (sparsecc::packed_conv2d) where oneDNN is there."""
    x = _input(geo)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(geo.out_channels, geo.channels, *geo.kernel, generator=g, dtype=x.dtype)
    if geo.channels_last:
        w = w.contiguous(memory_format=torch.channels_last)
    b = torch.randn(geo.out_channels, generator=g, dtype=x.dtype)
    with torch.no_grad():
        if packed_conv_available() and x.dtype == torch.float32:
            layout = "channels_last" if geo.channels_last else "contiguous"
            args = (list(geo.stride), list(geo.padding), list(geo.dilation), 1, "none", layout)
            return median_seconds(lambda: torch.ops.sparsecc.packed_conv2d(x, w, b, *args), runs)
        return median_seconds(lambda: _convolve(geo, x, w, b), runs)


def phase_input_eager(x: torch.Tensor, geo: ConvGeometry) -> torch.Tensor:
    """What passes/direct_conv.phase_input computes, in PyTorch: the padded, phase-split (N, C', Hq, Wq) input."""
    (sh, sw), (ph, pw), (h, w) = geo.stride, geo.padding, geo.size
    hq, wq = geo.phase_size
    y = torch.nn.functional.pad(x, [pw, wq * sw - w - pw, ph, hq * sh - h - ph])
    if (sh, sw) != (1, 1) and geo.single_phase:
        y = y[:, :, ::sh, ::sw]
    elif (sh, sw) != (1, 1):
        y = y.reshape(geo.batch, geo.channels, hq, sh, wq, sw).permute(0, 1, 3, 5, 2, 4)
    return y.reshape(geo.batch, geo.phase_channels, hq, wq).contiguous()


class DirectConvTimer:
    """Builds the direct kernel once per geometry and times it on weights of that geometry, checked against PyTorch's
    convolution of the same weight."""

    def __init__(self, target):
        self.target = target
        self._built: dict = {}

    def seconds(self, weight: torch.Tensor, phase_matrix: torch.Tensor, geo: ConvGeometry,
                knobs: ConvKnobs = ConvKnobs(), runs: int = RUNS) -> float:
        """Median seconds of the phase split plus the kernel for `weight` (out, in, kh, kw), whose phase matrix
        (passes/direct_conv.phase_weight) is `phase_matrix`."""
        import tvm

        from sparsecc.codegen.kernels.cpu.direct_conv import direct_conv_kernel

        hq, wq = geo.phase_size
        ka, kb = geo.phase_kernel
        knobs = knobs.for_taps(ka * kb)
        key = (geo, knobs)
        if key not in self._built:
            func = direct_conv_kernel(geo.batch, geo.phase_channels, (hq, wq), geo.out_channels, geo.out_size,
                                      geo.dtype, knobs=knobs)
            self._built[key] = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                                           target=self.target)["main"]
        kernel = self._built[key]
        indptr, columns, values = pack_blocks(phase_matrix, (1, 1))
        columns = columns.long()
        channel, tap = columns // (ka * kb), columns % (ka * kb)
        offsets = (channel * (hq * wq) + (tap // kb) * wq + tap % kb).to(torch.int32)
        pointers = torch.from_numpy(chunk_pointers(indptr.numpy(), columns.numpy(), ka * kb, knobs.chunk,
                                                   geo.phase_channels))
        x = _input(geo)
        bias = torch.randn(geo.out_channels, generator=torch.Generator().manual_seed(2), dtype=x.dtype)
        y = torch.empty(geo.batch, geo.out_channels, *geo.out_size, dtype=x.dtype)
        from sparsecc.codegen.executable import aligned

        def as_tvm(t):
            return tvm.runtime.from_dlpack(aligned(t))

        no_residual = torch.zeros(1, 1, 1, 1, dtype=x.dtype)
        fixed = [as_tvm(t) for t in (pointers, offsets, values.reshape(-1), bias, no_residual)]
        out = as_tvm(y)

        phase = as_tvm(phase_input_eager(x, geo).reshape(geo.batch, -1))
        kernel(phase, *fixed, out)
        expected = _convolve(geo, x, weight, bias)
        tol = TOLERANCES.get(x.dtype, {})
        if not torch.allclose(y, expected, rtol=tol.get("rtol", 1e-4), atol=tol.get("atol", 1e-4)):
            raise RuntimeError(f"the direct convolution kernel for {geo} disagreed with PyTorch's convolution "
                               f"(max abs error {float((y - expected).abs().max()):.3g})")
        # Timed apart: run back to back, PyTorch's OpenMP threads still spin after the split while TVM's workers
        # start the kernel (2x its time here); a compiled model runs its kernels on PyTorch's threads instead.
        split = median_seconds(lambda: phase_input_eager(x, geo), runs)
        return split + median_seconds(lambda: kernel(phase, *fixed, out), runs)
