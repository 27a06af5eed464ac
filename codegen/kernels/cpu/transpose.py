"""Register transposes for TIR kernels: R vectors of C lanes in, C columns of R values out, in shuffles.

Why: converting between row-major tensors and the token-tiled layout is a transpose. Written as scalar loops (one
load and one strided store per value) it took about a sixth of a 768 x 768 sparse kernel at 128 tokens; LLVM does
not turn those loops into shuffles by itself.

How: one round zips vector i with vector i + R/2 (lanes interleaved), giving vectors 2i and 2i + 1. Seen as one
array of R * C values that is a perfect shuffle, which rotates the bits of each value's position by one; after
log2(R) rounds position r * C + c has moved to c * R + r, the transposed order. Each zip is one two-source
permute on x86 (vpermt2ps / vunpck*), so R * log2(R) shuffles move R * C values.

`emit_transpose` is called while a TVMScript function is parsed and adds its stores to the statement being built.
"""

from __future__ import annotations

from typing import Callable

from tvm import tirx
from tvm.script import tirx as T

# Lanes of one 512-bit vector by element size: the widest register the kernels' targets have.
VECTOR_BYTES = 64


def vector_lanes(dtype: str) -> int:
    return VECTOR_BYTES // (8 if dtype == "float64" else 4)


def is_power_of_two(v: int) -> bool:
    return v >= 1 and v & (v - 1) == 0


def _zip_round(vectors: list[tirx.PrimExpr], lanes: int) -> list[tirx.PrimExpr]:
    half = len(vectors) // 2
    out = []
    for i in range(half):
        pair = [vectors[i], vectors[i + half]]
        for part in range(2):
            out.append(tirx.Shuffle(pair, [v for j in range(part * lanes // 2, (part + 1) * lanes // 2)
                                           for v in (j, lanes + j)]))
    return out


def emit_transpose(rows: list[tirx.PrimExpr], lanes: int,
                   store: Callable[[int, int, tirx.PrimExpr, int], None]) -> None:
    """`rows`: R vector expressions of `lanes` (C) lanes each, R and C powers of two. Calls
    `store(c, r0, vector, n)` for runs of column c: `vector` holds rows r0 .. r0 + n - 1 of it (n = min(R, C))."""
    count = len(rows)
    if not (is_power_of_two(count) and is_power_of_two(lanes) and lanes > 1):
        raise ValueError(f"a register transpose needs power-of-two rows and lanes, got {count} x {lanes}")
    vectors = list(rows)
    for _ in range(count.bit_length() - 1):
        vectors = _zip_round(vectors, lanes)
    for v, vector in enumerate(vectors):
        first = v * lanes  # position of its first lane in the transposed (C x R) order
        if count >= lanes:
            store(first // count, first % count, vector, lanes)
        else:
            for u in range(lanes // count):
                store(first // count + u, 0, tirx.Shuffle([vector], list(range(u * count, (u + 1) * count))), count)


def ramp(base: tirx.PrimExpr, lanes: int) -> tirx.Ramp:
    """Indices base .. base + lanes - 1: a vector access when used as a buffer index."""
    return tirx.Ramp(base, 1, lanes)


def load(buffer: tirx.Buffer, indices: list) -> tirx.PrimExpr:
    """`buffer[indices]` as an expression a helper can combine (a Ramp index makes it a vector)."""
    return tirx.BufferLoad(buffer, indices)


def store(buffer: tirx.Buffer, indices: list, value: tirx.PrimExpr) -> None:
    """Add `buffer[indices] = value` to the statement being parsed (callable from a helper, unlike `=`)."""
    T.buffer_store(buffer, value, indices)
