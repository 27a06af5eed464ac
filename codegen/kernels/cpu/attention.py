"""TIR kernel for multi-head attention without a mask: out = softmax(q_h k_h^T * scale) v_h for every head h, with
q, k, v and out in the (batch, tokens, heads * head_dim) layout the projections produce and consume.

Why it exists: in BERT-base the attention sat between two TVM regions, so each layer crossed into PyTorch and back
twice; as a kernel it lets a whole encoder layer be one region. Alone, at 128 tokens, 12 heads of 64, it measured
300-340 us against 430-470 for PyTorch's flash attention on this machine's two cores.

Layout, and why: a task owns one head and a tile of 32 queries, which become the vector lanes (as in the sparse
kernel). The scaled queries are transposed into (head_dim, 32); scores S^T (keys, 32) are then accumulated
`KEY_BLOCK` keys at a time, each key value broadcast against a vector of 32 queries, so the accumulators stay in
registers; softmax runs down the key axis with whole vectors; and the output O^T (head_dim, 32) is accumulated
`DIM_BLOCK` dimensions at a time from the probabilities in the same way. Everything a task touches besides k and v
(8 KB of queries, 16 KB of scores at 128 tokens) stays in L1.
"""

from __future__ import annotations

import math

from tvm.script import tirx as T

from sparsecc.codegen.kernels.cpu.bsr import horner
from sparsecc.kernel_work import STACK_LIMIT_BYTES, elem_bytes, token_tiled_shape

QUERY_TILE = 32
KEY_BLOCK = 4
DIM_BLOCK = 4

# exp(x) for fp32 in vectorisable operations (LLVM calls libm once per value for T.exp): x = n ln2 + r with
# |r| <= ln2 / 2, exp(r) by its Taylor polynomial to degree 7 (relative error below 1e-7 there), 2^n by building
# the float's exponent bits. Inputs are clamped at EXP_LOW so 2^n stays a normal float; softmax only ever feeds
# values <= 0, where that clamp changes a result by less than 1e-37.
EXP_LOW = -87.0
LOG2E = 1.4426950408889634
# ln 2 split so n * LN2_HIGH is exact in fp32 for the n that occur (|n| < 128).
LN2_HIGH = 0.693145751953125
LN2_LOW = 1.428606765330187e-06
EXP_TAYLOR = tuple(1.0 / math.factorial(i) for i in range(8))


def exp_expr(v, dtype: str):
    """exp(v) as a TIR expression: T.exp for float64, else the vectorisable form above."""
    if dtype != "float32":
        return T.exp(v)
    x = T.max(v, T.float32(EXP_LOW))
    n = T.floor(x * T.float32(LOG2E) + T.float32(0.5))
    r = x - n * T.float32(LN2_HIGH) - n * T.float32(LN2_LOW)
    return horner(r, EXP_TAYLOR, dtype) * T.reinterpret("float32", T.shift_left(T.cast(n, "int32") + 127, 23))


def query_tile(tokens: int, dtype: str) -> int:
    """Queries a task takes as vector lanes: QUERY_TILE, halved until the score accumulators fit the stack."""
    tile = min(QUERY_TILE, tokens)
    while tile > 1 and KEY_BLOCK * tile * elem_bytes(dtype) >= STACK_LIMIT_BYTES:
        tile //= 2
    return tile


def can_tile(batch: int, tokens: int, dtype: str) -> bool:
    """Whether q, k, v, out may be in the token-tiled layout: a tile of the flattened tokens must not straddle two
    sequences."""
    return batch == 1 or tokens % query_tile(tokens, dtype) == 0


def attention_kernel(batch: int, tokens: int, heads: int, head_dim: int, scale: float, dtype: str,
                     tiled: frozenset[str] = frozenset()):
    """PrimFunc `(q, k, v, out)`, each (batch, tokens, heads * head_dim), or, when named in `tiled`, in the sparse
    kernels' token-tiled layout of the (batch * tokens, heads * head_dim) matrix with `query_tile` tokens a tile
    (bsr.token_tiled_shape; needs `can_tile`). Tiled queries need no transpose and a tiled output is stored in
    whole vectors."""
    if not tiled <= {"q", "k", "v", "out"}:
        raise ValueError(f"tiled names operands out of q, k, v, out: {sorted(tiled)}")
    if tiled and not can_tile(batch, tokens, dtype):
        raise ValueError(f"attention over {batch} sequences of {tokens} tokens cannot be token-tiled: tiles of "
                         f"{query_tile(tokens, dtype)} would straddle sequences")
    width = heads * head_dim
    tile = query_tile(tokens, dtype)
    tiles = (tokens + tile - 1) // tile
    key_blocks, key_tail = divmod(tokens, KEY_BLOCK)
    dim_block = next(b for b in (DIM_BLOCK, 2, 1) if head_dim % b == 0)
    shapes = {name: token_tiled_shape(batch * tokens, width, tile) if name in tiled else (batch, tokens, width)
              for name in ("q", "k", "v", "out")}

    q_tiled, k_tiled, v_tiled, out_tiled = ("q" in tiled), ("k" in tiled), ("v" in tiled), ("out" in tiled)

    def at(buf, is_tiled, b, token, column):
        # Element (b, token, column) of an operand in its layout.
        if is_tiled:
            return buf[(b * tokens + token) // tile, column, (b * tokens + token) % tile]
        return buf[b, token, column]

    @T.macro
    def add_scores(Kb, QT, ST, mx, acc, b, h, first, count):
        # Scores of keys first .. first + count - 1 against the tile's queries.
        for jj in T.unroll(count):
            for t in T.vectorized(tile):
                acc[jj, t] = T.cast(0, dtype)
        for dd in T.serial(head_dim):
            for jj in T.unroll(count):
                for t in T.vectorized(tile):
                    acc[jj, t] = acc[jj, t] + at(Kb, k_tiled, b, first + jj, h * head_dim + dd) * QT[dd, t]
        for jj in T.unroll(count):
            for t in T.vectorized(tile):
                ST[first + jj, t] = acc[jj, t]
                mx[t] = T.max(mx[t], acc[jj, t])

    @T.prim_func(private=True)
    def kernel(q: T.handle, k: T.handle, v: T.handle, out: T.handle):
        T.func_attr({"tir.noalias": True})
        Q = T.match_buffer(q, shapes["q"], dtype)
        Kb = T.match_buffer(k, shapes["k"], dtype)
        V = T.match_buffer(v, shapes["v"], dtype)
        O = T.match_buffer(out, shapes["out"], dtype)
        for task in T.parallel(batch * heads * tiles):
            # "global" scope: TVM keeps a CPU allocation on the stack only in that scope and under
            # STACK_LIMIT_BYTES (the accumulators); the larger buffers come from the workspace allocator.
            QT = T.alloc_local((head_dim, tile), dtype, scope="global")
            ST = T.alloc_local((tokens, tile), dtype, scope="global")
            mx = T.alloc_local((tile,), dtype, scope="global")
            total = T.alloc_local((tile,), dtype, scope="global")
            acc = T.alloc_local((KEY_BLOCK, tile), dtype, scope="global")
            b = task // (heads * tiles)
            h = task // tiles % heads
            first = task % tiles * tile
            if q_tiled:
                # A tile starts a sequence's tile (can_tile); queries past the last token hold whatever the
                # producer left in the padding, and their lanes are never stored in a row-major output.
                for dd in T.serial(head_dim):
                    for t in T.vectorized(tile):
                        QT[dd, t] = Q[(b * tokens + first) // tile, h * head_dim + dd, t] * T.cast(scale, dtype)
            else:
                for t in T.serial(tile):
                    for dd in T.serial(head_dim):
                        # Queries past the last token are zeros: their scores are computed and never stored.
                        QT[dd, t] = T.if_then_else(first + t < tokens,
                                                   Q[b, T.min(first + t, tokens - 1), h * head_dim + dd],
                                                   T.cast(0, dtype)) * T.cast(scale, dtype)
            for t in T.vectorized(tile):
                mx[t] = T.min_value(dtype)
                total[t] = T.cast(0, dtype)
            for j0 in T.serial(key_blocks):
                add_scores(Kb, QT, ST, mx, acc, b, h, j0 * KEY_BLOCK, KEY_BLOCK)
            if key_tail > 0:
                add_scores(Kb, QT, ST, mx, acc, b, h, key_blocks * KEY_BLOCK, key_tail)
            for j in T.serial(tokens):
                for t in T.vectorized(tile):
                    ST[j, t] = exp_expr(ST[j, t] - mx[t], dtype)
                    total[t] = total[t] + ST[j, t]
            for t in T.vectorized(tile):
                total[t] = T.cast(1, dtype) / total[t]
            for d0 in T.serial(head_dim // dim_block):
                for di in T.unroll(dim_block):
                    for t in T.vectorized(tile):
                        acc[di, t] = T.cast(0, dtype)
                for j in T.serial(tokens):
                    for di in T.unroll(dim_block):
                        for t in T.vectorized(tile):
                            acc[di, t] = acc[di, t] + at(V, v_tiled, b, j, h * head_dim + d0 * dim_block + di) * ST[j, t]
                if out_tiled:
                    for di in T.unroll(dim_block):
                        for t in T.vectorized(tile):
                            O[(b * tokens + first) // tile, h * head_dim + d0 * dim_block + di, t] = acc[di, t] * total[t]
                else:
                    for t in T.serial(tile):
                        for di in T.serial(dim_block):
                            if first + t < tokens:
                                O[b, first + t, h * head_dim + d0 * dim_block + di] = acc[di, t] * total[t]

    return kernel
