"""TIR kernel for y = x @ W^T + bias with W held in CSR.

The kernel is generated per layer: token count, feature sizes and dtype are baked in as constants so LLVM
can unroll and vectorise; the number of non-zeros stays symbolic so layers of one shape share one kernel
(a BERT-base has 72 sparse Linears but only 3 distinct shapes, which keeps LLVM time down). A layer
without bias passes a zero vector: one kernel variant, N floats of cost.

Layout: the kernel first transposes x into a (K, M) scratch buffer. Each non-zero w[n, k] then multiplies
one contiguous run x^T[k, m0:m0+tile], which LLVM turns into broadcast + vector FMA; a gather along K in
row-major x would be scalar. Rows of W are spread over threads.
"""

from __future__ import annotations

from tvm.script import tirx as T

# Tokens handled per inner tile: 4 AVX2 fp32 vectors, enough to hide FMA latency without spilling.
TOKEN_TILE = 32


def csr_linear_kernel(m: int, n: int, k: int, dtype: str, index_dtype: str = "int32"):
    """PrimFunc `(x[m, k], indptr[n+1], indices[nnz], values[nnz], bias[n], y[m, n])`."""
    tile = min(TOKEN_TILE, m)
    m_outer = (m + tile - 1) // tile

    @T.prim_func(private=True)
    def kernel(x: T.handle, indptr: T.handle, indices: T.handle, values: T.handle, bias: T.handle, y: T.handle):
        T.func_attr({"tir.noalias": True})
        nnz = T.int64()
        X = T.match_buffer(x, (m, k), dtype)
        P = T.match_buffer(indptr, (n + 1,), index_dtype)
        J = T.match_buffer(indices, (nnz,), index_dtype)
        V = T.match_buffer(values, (nnz,), dtype)
        B = T.match_buffer(bias, (n,), dtype)
        Y = T.match_buffer(y, (m, n), dtype)
        XT = T.alloc_buffer((k, m_outer * tile), dtype)
        for kk in T.parallel(k):
            for mm in T.serial(m_outer * tile):
                XT[kk, mm] = T.if_then_else(mm < m, X[T.min(mm, m - 1), kk], T.cast(0, dtype))
        for row in T.parallel(n):
            acc = T.decl_buffer((tile,), dtype, scope="local")  # declared inside the loop: one per thread
            for mo in T.serial(m_outer):
                for t in T.vectorized(tile):
                    acc[t] = B[row]
                for e in T.serial(P[row + 1] - P[row]):
                    for t in T.vectorized(tile):
                        acc[t] = acc[t] + V[P[row] + e] * XT[J[P[row] + e], mo * tile + t]
                for t in T.serial(tile):
                    if mo * tile + t < m:
                        Y[mo * tile + t, row] = acc[t]

    return kernel
