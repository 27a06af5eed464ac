"""TIR kernel for a k x k convolution with a sparse weight, computed directly from the stored weights (no im2col).

y[b, o, i, j] = activation(bias[o] + sum over stored (c, u, v) of W[o, c, u, v] * x[b, c, i + u*dh, j + v*dw])

over an input already padded (and, for strides above 1, split into stride phases: see passes/sparse_conv.py), so
the kernel itself only ever runs stride 1.

Why this form: in the padded NCHW image, flattened per image, output pixel p = i * Wp + j reads input pixel
p + offset(c, u, v) with offset = c * Hp * Wp + u * dh * Wp + v * dw, the same for every pixel. So a stored weight
multiplies a contiguous run of input pixels into a contiguous run of output pixels: one broadcast and a run of
vector FMAs, with nothing gathered. The run spans `rows` output rows at once, including the Wp - Wo columns between
them that belong to no output pixel (computed, never stored): fewer, longer runs keep more accumulators in flight,
and the wasted share is (Wp - Wo) / Wp, 3 % for a 3x3 at 56x56. The offsets are worked out once, when the region
is lowered (the input shape is static), and replace the column indices in the kernel.

Work split: a task is one image's band of `rows` output rows, for every output channel; its input band
(C x (rows + kh - 1) rows) is reused by every output channel, so it stays in cache while the weights stream past.
The last band of an image starts `rows` rows before the image's end and recomputes a few rows, so every band has
the same constant shape and no masks. Accumulators are on the stack and small (STACK_LIMIT_BYTES), so LLVM keeps
them in registers.
"""

from __future__ import annotations

from tvm.script import tirx as T

from sparsecc.codegen.kernels.cpu.bsr import erf_expr
from sparsecc.conv_work import ConvKnobs, band_rows, chunk_count, run_length, vector_lanes
from sparsecc.kernel_work import CONV_ACTIVATIONS


def direct_conv_kernel(batch: int, channels: int, padded: tuple[int, int], out_channels: int,
                       out_size: tuple[int, int], dtype: str, activation: str = "none", residual: bool = False, *,
                       knobs: ConvKnobs | None = None, index_dtype: str = "int32"):
    """PrimFunc `(x[batch, channels * Hp * Wp], chunk_ptr[out_channels, chunks + 1], offsets[nnz], values[nnz],
    bias[out_channels], r, y[batch, out_channels, Ho, Wo])`, r the residual added before the activation (y's shape;
    with `residual` False, a (1, 1, 1, 1) buffer it ignores): `offsets` hold each stored weight's input offset (module
    docstring), `chunk_ptr[o, q]` where output channel o's weights from input channel `q * knobs.chunk` on begin
    (`chunk_pointers`). Hp includes `tail_rows` rows of zeros."""
    if activation not in CONV_ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is not one of {CONV_ACTIVATIONS}")
    hp, wp = padded
    ho, wo = out_size
    if ho < 1 or wo < 1 or ho > hp or wo > wp:
        raise ValueError(f"output {ho}x{wo} does not fit the padded input {hp}x{wp}")
    knobs = knobs or ConvKnobs()
    if knobs.chunk is None:
        raise ValueError("direct_conv_kernel needs the knobs' chunk decided (ConvKnobs.for_taps)")
    rows = band_rows(ho, wo, wp, dtype, knobs.rows)
    run = run_length(rows, wo, wp, dtype)
    bands = (ho + rows - 1) // rows
    plane = channels * hp * wp
    chunks = chunk_count(channels, knobs.chunk)
    group = min(knobs.group, out_channels)
    groups = (out_channels + group - 1) // group

    lanes = vector_lanes(dtype)
    vectors = run // lanes
    # Output rows are stored a whole vector at a time, then the rest of the row.
    whole, rest = divmod(wo, lanes)

    def activate(v):
        if activation == "relu":
            return T.max(v, T.cast(0, dtype))
        if activation == "gelu":
            return v * T.cast(0.5, dtype) * (T.cast(1, dtype) + erf_expr(v * T.cast(0.7071067811865476, dtype),
                                                                         dtype))
        if activation == "gelu_tanh":
            return v * T.cast(0.5, dtype) * (T.cast(1, dtype) + T.tanh(T.cast(0.7978845608028654, dtype) * (
                v + T.cast(0.044715, dtype) * v * v * v)))
        if activation == "relu6":
            return T.min(T.max(v, T.cast(0, dtype)), T.cast(6, dtype))
        if activation == "silu":
            return v / (T.cast(1, dtype) + T.exp(T.cast(0, dtype) - v))
        return v

    def plus_residual(v, R, b, o, i, j):
        return v + R[b, o, i, j] if residual else v

    @T.macro
    def epilogue(part, Y, R, b, o, g, top):
        for i in T.unroll(rows):
            for h in T.unroll(whole):
                for j in T.vectorized(lanes):
                    Y[b, o, top + i, h * lanes + j] = activate(plus_residual(
                        part[g, i * wp + h * lanes + j], R, b, o, top + i, h * lanes + j))
            if rest > 0:  # decided when the kernel is written: a vectorized loop of extent 0 fails to build
                for j in T.vectorized(rest):
                    Y[b, o, top + i, whole * lanes + j] = activate(plus_residual(
                        part[g, i * wp + whole * lanes + j], R, b, o, top + i, whole * lanes + j))

    @T.prim_func(private=True)
    def kernel(x: T.handle, indptr: T.handle, offsets: T.handle, values: T.handle, bias: T.handle, r: T.handle,
               y: T.handle):
        T.func_attr({"tir.noalias": True})
        nnz = T.int64()
        X = T.match_buffer(x, (batch, plane), dtype)
        P = T.match_buffer(indptr, (out_channels, chunks + 1), index_dtype)
        F = T.match_buffer(offsets, (nnz,), "int32")
        V = T.match_buffer(values, (nnz,), dtype)
        B = T.match_buffer(bias, (out_channels,), dtype)
        R = T.match_buffer(r, (batch, out_channels, ho, wo) if residual else (1, 1, 1, 1), dtype)
        Y = T.match_buffer(y, (batch, out_channels, ho, wo), dtype)
        for task in T.parallel(batch * bands):
            # "global" scope keeps `acc` on the stack (see codegen/kernels/cpu/bsr.py); it is whole vectors with
            # constant indices, so LLVM keeps each in a register. `part` (too large for the stack) holds the group's
            # partial sums between input-channel chunks, and the epilogue reads its rows, which need not start on a
            # vector (read from the accumulators themselves, LLVM shuffled all of them inside the loop over stored
            # weights: 5x slower).
            acc = T.alloc_local((vectors, lanes), dtype, scope="global")
            part = T.alloc_buffer((group, run), dtype)
            b = task // bands
            top = T.min((task % bands) * rows, ho - rows)
            for og in T.serial(groups):
                for g in T.serial(group):
                    for t in T.vectorized(run):
                        part[g, t] = B[T.min(og * group + g, out_channels - 1)]
                for q in T.serial(chunks):
                    for g in T.serial(group):
                        if og * group + g < out_channels:
                            for v in T.unroll(vectors):
                                for t in T.vectorized(lanes):
                                    acc[v, t] = part[g, v * lanes + t]
                            for e in T.serial(P[og * group + g, q + 1] - P[og * group + g, q]):
                                for v in T.unroll(vectors):
                                    for t in T.vectorized(lanes):
                                        acc[v, t] = acc[v, t] + V[P[og * group + g, q] + e] * X[
                                            b, F[P[og * group + g, q] + e] + top * wp + v * lanes + t]
                            for v in T.unroll(vectors):
                                for t in T.vectorized(lanes):
                                    part[g, v * lanes + t] = acc[v, t]
                for g in T.serial(group):
                    if og * group + g < out_channels:
                        epilogue(part, Y, R, b, og * group + g, g, top)

    return kernel
