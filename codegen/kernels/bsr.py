"""TIR kernel for y = x @ W^T + bias with W in block-sparse rows (BSR, r x c blocks, only blocks holding a
non-zero stored). CSR is the 1 x 1 case of the same kernel.

Layout, and why:
- x is transposed once into a (K, M) scratch, so each weight value multiplies a contiguous run of tokens:
  broadcast + vector FMA. A gather along K in row-major x would be scalar.
- Each loaded run of x^T is reused by the r rows of a block.
- A task owns `rows_per_task` consecutive output rows (several block-rows when blocks are short). Their
  outputs collect in a small token-contiguous buffer (stays in L1) and go back to y as rows_per_task
  contiguous values per token. Writing y[m, n] directly from each row is one strided store per token,
  which measured up to 2.5x slower at 3072 output rows.
Token count, sizes, block shape and dtype are baked in; the number of stored blocks stays symbolic so layers of
one shape share one kernel.
"""

from __future__ import annotations

from tvm.script import tirx as T

# Tokens per inner tile: 4 AVX2 fp32 vectors of accumulators per row.
TOKEN_TILE = 32
# Output rows a task writes back together: 8 fp32 values make a 32-byte run per token.
ROWS_PER_TASK = 8


ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh")


def bsr_linear_kernel(m: int, n: int, k: int, block: tuple[int, int], dtype: str, activation: str = "none",
                      residual: bool = False, index_dtype: str = "int32"):
    """PrimFunc `(x[m, k], indptr[n/r + 1], indices[nb], values[nb, r, c], bias[n], res, y[m, n])` computing
    y = activation(x @ W^T + bias) + res. `res` is (m, n) when `residual`, else an unused (1, 1) buffer.
    Needs n % r == 0 and k % c == 0 (the planner only picks block shapes that divide the weight)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is not one of {ACTIVATIONS}")
    r, c = block
    tile = min(TOKEN_TILE, m)
    m_outer = (m + tile - 1) // tile
    mp = m_outer * tile
    block_rows = n // r
    group = max(1, ROWS_PER_TASK // r)  # block-rows per task
    tasks = (block_rows + group - 1) // group
    rows = group * r
    res_shape = (m, n) if residual else (1, 1)

    @T.prim_func(private=True)
    def kernel(x: T.handle, indptr: T.handle, indices: T.handle, values: T.handle, bias: T.handle, res: T.handle,
               y: T.handle):
        T.func_attr({"tir.noalias": True})
        nb = T.int64()
        X = T.match_buffer(x, (m, k), dtype)
        P = T.match_buffer(indptr, (block_rows + 1,), index_dtype)
        J = T.match_buffer(indices, (nb,), index_dtype)
        V = T.match_buffer(values, (nb, r, c), dtype)
        B = T.match_buffer(bias, (n,), dtype)
        R = T.match_buffer(res, res_shape, dtype)
        Y = T.match_buffer(y, (m, n), dtype)
        XT = T.alloc_buffer((k, mp), dtype)
        for kk in T.parallel(k):
            for mm in T.serial(mp):
                XT[kk, mm] = T.if_then_else(mm < m, X[T.min(mm, m - 1), kk], T.cast(0, dtype))
        for task in T.parallel(tasks):
            out = T.decl_buffer((rows, mp), dtype)
            acc = T.decl_buffer((r, tile), dtype, scope="local")
            for g in T.serial(group):
                if task * group + g < block_rows:
                    for mo in T.serial(m_outer):
                        for i in T.serial(r):
                            for t in T.vectorized(tile):
                                acc[i, t] = B[(task * group + g) * r + i]
                        for e in T.serial(P[task * group + g + 1] - P[task * group + g]):
                            for j in T.serial(c):
                                for i in T.serial(r):
                                    for t in T.vectorized(tile):
                                        acc[i, t] = acc[i, t] + V[P[task * group + g] + e, i, j] * XT[
                                            J[P[task * group + g] + e] * c + j, mo * tile + t]
                        for i in T.serial(r):
                            for t in T.vectorized(tile):
                                if activation == "relu":
                                    out[g * r + i, mo * tile + t] = T.max(acc[i, t], T.cast(0, dtype))
                                elif activation == "gelu":
                                    out[g * r + i, mo * tile + t] = acc[i, t] * T.cast(0.5, dtype) * (
                                        T.cast(1, dtype) + T.erf(acc[i, t] * T.cast(0.7071067811865476, dtype)))
                                elif activation == "gelu_tanh":
                                    out[g * r + i, mo * tile + t] = acc[i, t] * T.cast(0.5, dtype) * (
                                        T.cast(1, dtype) + T.tanh(T.cast(0.7978845608028654, dtype) * (
                                            acc[i, t] + T.cast(0.044715, dtype) * acc[i, t] * acc[i, t] * acc[i, t])))
                                else:
                                    out[g * r + i, mo * tile + t] = acc[i, t]
            for mm in T.serial(m):
                for i in T.serial(rows):
                    if task * rows + i < n:
                        if residual:
                            Y[mm, task * rows + i] = out[i, mm] + R[mm, task * rows + i]
                        else:
                            Y[mm, task * rows + i] = out[i, mm]

    return kernel
