"""TIR kernel for constant padding of the last two dimensions of an NCHW tensor: the padding in front of a direct
convolution (passes/direct_conv.phase_input).

Why it exists: relax's pad is legalized to a loop nest TVM leaves unscheduled, one thread, element by element; ahead
of a 3x3 256->256 convolution at 56x56 it took longer than half the kernel itself. Here a task is one (image,
channel) plane, and each row is a vector copy between its two runs of padding.
"""

from __future__ import annotations

from tvm.script import tirx as T


def pad_kernel(planes: int, size: tuple[int, int], pads: tuple[int, int, int, int], dtype: str):
    """PrimFunc `(x[planes, H, W], fill[1], y[planes, H + top + bottom, W + left + right])`, pads = (top, bottom,
    left, right). `fill` holds the value: given as an input, because a kernel that reads only x looks like a reshape
    to TVM's RewriteDataflowReshape, whose analysis then fails on it."""
    (h, w), (top, bottom, left, right) = size, pads
    hp, wp = h + top + bottom, w + left + right

    @T.prim_func(private=True)
    def kernel(x: T.handle, fill: T.handle, y: T.handle):
        T.func_attr({"tir.noalias": True})
        X = T.match_buffer(x, (planes, h, w), dtype)
        F = T.match_buffer(fill, (1,), dtype)
        Y = T.match_buffer(y, (planes, hp, wp), dtype)
        for p in T.parallel(planes):
            for i in T.serial(hp):
                if i < top or i >= top + h:
                    for j in T.vectorized(wp):
                        Y[p, i, j] = F[0]
                else:
                    for j in T.serial(left):
                        Y[p, i, j] = F[0]
                    for j in T.vectorized(w):
                        Y[p, i, left + j] = X[p, i - top, j]
                    for j in T.serial(right):
                        Y[p, i, left + w + j] = F[0]

    return kernel
