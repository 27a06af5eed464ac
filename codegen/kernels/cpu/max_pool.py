"""TIR kernel for 2-D max pooling over NCHW: y[b, c, i, j] = max over the window of the padded x (padding is -inf).

Why it exists: ResNet's max pool sits between the stem and the first sparse convolution; PyTorch's NCHW max pool
took 3 ms of ResNet-50's 30 here (its channels-last one is several times faster), and left in PyTorch it is a region
border. Separable: a task takes one (image, channel) plane; for each output row it first takes the max over the
window's input rows, a contiguous run of the row (vectorised), then over each output's columns of that run, which is
in L1. The window's rows that fall in the padding are skipped, the columns read -inf from the run's padded ends.
"""

from __future__ import annotations

from tvm.script import tirx as T

from sparsecc.conv_work import vector_lanes


def max_pool_kernel(batch: int, channels: int, size: tuple[int, int], kernel: tuple[int, int],
                    stride: tuple[int, int], padding: tuple[int, int], out_size: tuple[int, int], dtype: str):
    """PrimFunc `(x[batch, channels, H, W], low[1], y[batch, channels, Ho, Wo])`, dilation 1, floor or ceil mode
    both (the output size says which). `low` holds the padding value, -inf: given as an input, because a kernel that
    reads only x looks like a reshape to TVM's RewriteDataflowReshape, whose analysis then fails on it."""
    (h, w), (kh, kw), (sh, sw), (ph, pw), (ho, wo) = size, kernel, stride, padding, out_size
    lanes = vector_lanes(dtype)
    # The run of one output row's window rows, padded on both sides so every column read is inside it.
    run = max((wo - 1) * sw + kw, w + pw)
    runv = -(-run // lanes) * lanes

    @T.prim_func(private=True)
    def kernel(x: T.handle, low: T.handle, y: T.handle):
        T.func_attr({"tir.noalias": True})
        X = T.match_buffer(x, (batch, channels, h, w), dtype)
        L = T.match_buffer(low, (1,), dtype)
        Y = T.match_buffer(y, (batch, channels, ho, wo), dtype)
        for plane in T.parallel(batch * channels):
            line = T.alloc_buffer((runv,), dtype)
            b = plane // channels
            c = plane % channels
            for i in T.serial(ho):
                for q in T.vectorized(runv):
                    line[q] = L[0]
                for u in T.serial(kh):
                    if 0 <= i * sh + u - ph and i * sh + u - ph < h:
                        for q in T.vectorized(w):
                            line[q + pw] = T.max(line[q + pw], X[b, c, i * sh + u - ph, q])
                for j in T.serial(wo):
                    Y[b, c, i, j] = L[0]
                    for v in T.unroll(kw):
                        Y[b, c, i, j] = T.max(Y[b, c, i, j], line[j * sw + v])

    return kernel
