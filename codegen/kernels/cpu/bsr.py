"""TIR kernel for y = activation(x @ W^T + bias) + residual with W in block-sparse rows (BSR, r x c blocks,
only blocks holding a non-zero stored). CSR is the 1 x 1 case of the same kernel.

Layout, and why:
- x is transposed once into token tiles, (tiles, K, 32): each weight value multiplies a contiguous run of 32
  tokens, which is broadcast + vector FMA. A gather along K in row-major x would be scalar. The transpose, and the
  one back into a row-major y, run as register transposes (codegen/kernels/cpu/transpose.py) on whole blocks.
- Each loaded run of x^T is reused by the r rows of a block; block loops are unrolled so the accumulators
  have constant indices and stay in registers (unrolling halved the time at 768x768).
- Tasks own runs of consecutive block-rows holding equal work (stored blocks plus a per-row cost, found by a
  binary search over indptr at the start of each task), so threads are balanced by non-zeros rather than by rows:
  TVM hands each thread a contiguous run of tasks, and with equal-row tasks a weight whose rows thin out from top
  to bottom left one thread with most of the work. A task goes through its block-rows `rows` output rows at a
  time; their outputs collect in a small buffer and go back to y as `rows` contiguous values per token; storing
  y[m, n] from each row is one strided store per token.
- Loop order: "token-outer" runs the token tiles outside the parallel loop, so all threads share one 32-token
  slice of x^T at a time. With the token-tiled layout it only paid once x^T overflows L2 (5 % at K = 3072) and
  cost 10-30 % at K = 768; `prefers_token_outer` decides unless the caller does. "Token split" instead gives
  each thread whole token tiles (all rows of them): its slice of x^T is its own, transposed by itself into a
  one-tile buffer, with no barrier. It wins wherever the tiles divide among the threads (`default_knobs`).
- Accumulators live on the stack (see STACK_LIMIT_BYTES), so LLVM keeps them in registers.
- One parallel launch per kernel (transpose, barrier, product): each launch may have to wake TVM's workers.
- x and y may instead be in the token-tiled layout itself (`token_tiled_shape`), when one sparse kernel feeds the
  next: the writer stores whole tiles, the reader skips its transpose.
Token count, sizes, block shape, epilogue and dtype are baked in; the number of stored blocks stays symbolic so
layers of one shape share one kernel.

Knobs (`KernelKnobs`): token tile, output rows per task, loop order and accumulator chains. `default_knobs` holds
the heuristics above; codegen/tuning/ searches the others per kernel and weight pattern.
"""

from __future__ import annotations

import dataclasses

from tvm import tirx
from tvm.script import tirx as T

from sparsecc.codegen.kernels.cpu.transpose import emit_transpose, is_power_of_two, load, ramp, store, vector_lanes
from sparsecc.kernel_work import (ACTIVATIONS, ROW_WORK, TRANSPOSE_STRIP, KernelKnobs, default_knobs, task_count,
                                 token_tiled_shape)

# erf for fp32 epilogues, in operations that vectorise: LLVM turns T.erf into one libm call per value (a 3072 x 768
# layer at 128 tokens, CSR 10 %: 7.6-8.1 ms with GELU, 0.6-1.0 ms without). erf(x) = x P(x^2) / Q(x^2) with x
# clamped to +-ERF_CLAMP (where fp32 erf is already 1), P and Q of degree 5, fitted here by iteratively reweighted
# least squares on the float64 erf. Largest error evaluated in fp32 over the whole fp32 range: 3.5e-7 (the
# earlier series-plus-tail form: 4.6e-7 at about twice the operations).
ERF_CLAMP = 3.92
ERF_P = (1.128379022, 0.1927648425, 0.05306059033, 0.003868362981, 0.0002874805502, 2.03473344e-06)
ERF_Q = (1.0, 0.5041650598, 0.1150849487, 0.01517236623, 0.001188124479, 3.807068636e-05)


def horner(x, coefficients, dtype):
    acc = T.cast(coefficients[-1], dtype)
    for c in reversed(coefficients[:-1]):
        acc = acc * x + T.cast(c, dtype)
    return acc


def erf_expr(v, dtype: str):
    """erf(v) as a TIR expression: T.erf for float64 (the approximation is fp32-accurate only), else the
    vectorisable rational form above."""
    if dtype != "float32":
        return T.erf(v)
    x = T.max(T.min(v, T.cast(ERF_CLAMP, dtype)), T.cast(-ERF_CLAMP, dtype))
    s = x * x
    return x * horner(s, ERF_P, dtype) / horner(s, ERF_Q, dtype)


@dataclasses.dataclass(frozen=True)
class _Geometry:
    """What one kernel bakes in, worked out once from `bsr_linear_kernel`'s arguments. The macro factories below
    copy the fields they use into plain locals: TVMScript looks a macro's names up in its closure when it parses it,
    and decides conditions on Python values (`if residual:`) right then."""

    m: int
    n: int
    k: int
    r: int
    c: int
    dtype: str
    activation: str
    residual: bool
    x_tiled: bool
    y_tiled: bool
    residual_tiled: bool
    row_blocks: int | None
    token_outer: bool
    chains: int
    tile: int
    m_outer: int
    block_rows: int
    group: int
    tasks: int
    search_steps: int
    rows: int
    k_strips: int
    lanes: int
    token_lanes: int
    rows_out: int
    transpose_in: bool
    transpose_out: bool
    x_shape: tuple
    y_shape: tuple
    res_shape: tuple


def _geometry(m: int, n: int, k: int, block: tuple[int, int], dtype: str, activation: str, residual: bool,
              knobs: KernelKnobs, x_tiled: bool, y_tiled: bool, residual_tiled: bool,
              row_blocks: int | None) -> _Geometry:
    token_outer = knobs.token_outer
    r, c = block
    # `chains`: independent accumulator sets. An FMA waits ~4 cycles for the previous one into the same
    # register, so short blocks split their non-zeros over several sets.
    chains = knobs.chains
    tile = min(knobs.token_tile, m)
    m_outer = (m + tile - 1) // tile
    block_rows = n // r
    group = max(1, knobs.rows_per_task // r)  # block-rows computed together
    tasks = task_count(n, block, knobs.rows_per_task)
    search_steps = block_rows.bit_length() + 1
    rows = group * r
    res_shape = (token_tiled_shape(m, n, tile) if residual_tiled else (m, n)) if residual else (1, 1)
    k_strips = (k + TRANSPOSE_STRIP - 1) // TRANSPOSE_STRIP
    x_shape = token_tiled_shape(m, k, tile) if x_tiled else (m, k)
    # Register transposes (codegen/kernels/cpu/transpose.py) move whole blocks: `lanes` columns of x per vector in,
    # `token_lanes` tokens of `rows_out` output rows out. Partial tiles, strips and groups keep the scalar loops.
    lanes = vector_lanes(dtype)
    token_lanes = min(tile, lanes)
    rows_out = min(rows, lanes)
    transpose_in = (not x_tiled and is_power_of_two(token_lanes) and token_lanes > 1 and tile % token_lanes == 0
                    and TRANSPOSE_STRIP % lanes == 0)
    transpose_out = (not y_tiled and is_power_of_two(token_lanes) and token_lanes > 1 and tile % token_lanes == 0
                     and is_power_of_two(rows_out) and rows_out > 1 and rows % rows_out == 0)
    y_shape = token_tiled_shape(m, n, tile) if y_tiled else (m, n)
    return _Geometry(m=m, n=n, k=k, r=r, c=c, dtype=dtype, activation=activation, residual=residual,
                     x_tiled=x_tiled, y_tiled=y_tiled, residual_tiled=residual_tiled, row_blocks=row_blocks,
                     token_outer=token_outer, chains=chains, tile=tile, m_outer=m_outer, block_rows=block_rows,
                     group=group, tasks=tasks, search_steps=search_steps, rows=rows, k_strips=k_strips, lanes=lanes,
                     token_lanes=token_lanes, rows_out=rows_out, transpose_in=transpose_in,
                     transpose_out=transpose_out, x_shape=x_shape, y_shape=y_shape, res_shape=res_shape)


def _indexing(geo: _Geometry):
    """`start(P, b)`, `stored(P, b)`: block-row b's blocks in indices / values; `task_span`: a task's block-rows."""
    r, c, row_blocks = geo.r, geo.c, geo.row_blocks
    block_rows, tasks, search_steps = geo.block_rows, geo.tasks, geo.search_steps

    def start(P, b):
        # Where block-row b's blocks begin in indices / values.
        return P[b] if row_blocks is None else b * row_blocks

    def stored(P, b):
        # Blocks stored in block-row b: a constant for ELL rows.
        return P[b + 1] - P[b] if row_blocks is None else row_blocks

    def work(P, b):
        return T.cast(start(P, b), "int64") * (r * c) + T.cast(b, "int64") * (r * ROW_WORK)

    @T.macro
    def task_span(P, task, span):
        # span[s] = the first block-row whose work prefix reaches (task + s) / tasks of the total. The prefix grows
        # strictly with the row (ROW_WORK > 0), so task + s = tasks lands exactly on block_rows.
        for s in T.unroll(2):
            span[s] = 0
            span[2] = block_rows
            for _ in T.serial(search_steps):
                if span[s] < span[2]:
                    if work(P, (span[s] + span[2]) // 2) * tasks < work(P, block_rows) * (task + s):
                        span[s] = (span[s] + span[2]) // 2 + 1
                    else:
                        span[2] = (span[s] + span[2]) // 2

    return start, stored, task_span


def _activation(geo: _Geometry):
    """`activate(acc, out, g)`: accumulator set 0, through the activation, into block-row g's rows of `out`."""
    r, tile, dtype, activation = geo.r, geo.tile, geo.dtype, geo.activation

    @T.macro
    def activate(acc, out, g):
        for i in T.unroll(r):
            for t in T.vectorized(tile):
                if activation == "relu":
                    out[g * r + i, t] = T.max(acc[0, i, t], T.cast(0, dtype))
                elif activation == "gelu":
                    out[g * r + i, t] = acc[0, i, t] * T.cast(0.5, dtype) * (
                        T.cast(1, dtype) + erf_expr(acc[0, i, t] * T.cast(0.7071067811865476, dtype), dtype))
                elif activation == "gelu_tanh":
                    out[g * r + i, t] = acc[0, i, t] * T.cast(0.5, dtype) * (
                        T.cast(1, dtype) + T.tanh(T.cast(0.7978845608028654, dtype) * (
                            acc[0, i, t] + T.cast(0.044715, dtype) * acc[0, i, t] * acc[0, i, t] * acc[0, i, t])))
                else:
                    out[g * r + i, t] = acc[0, i, t]

    return activate


def _write_back(geo: _Geometry):
    """`write_rows(out, R, Y, mo, first, end)`: the rows of `out` that lie before block-row `end`, plus the
    residual, into y (token tile mo, from block-row `first`), in y's layout."""
    m, r, tile, rows, group = geo.m, geo.r, geo.tile, geo.rows, geo.group
    residual, residual_tiled, y_tiled = geo.residual, geo.residual_tiled, geo.y_tiled
    transpose_out, token_lanes, rows_out = geo.transpose_out, geo.token_lanes, geo.rows_out

    def residual_at(R, mo, t, row):
        # Padded tokens of a row-major residual read its last row: their outputs are never used.
        if residual_tiled:
            return R[mo, row, t]
        return R[T.min(mo * tile + t, m - 1), row]

    def write_back(out, R, Y, mo, first, h, o):
        # Rows o * rows_out .. of `out`, tokens h * token_lanes ..: into row-major y as runs of rows per token.
        def put(c, r0, vector, count):
            token = mo * tile + h * token_lanes + c
            row = first * r + o * rows_out + r0
            if residual and residual_tiled:  # rows of one token lie a tile apart: one load each
                vector = vector + tirx.Shuffle([load(R, [mo, row + i, h * token_lanes + c]) for i in range(count)],
                                               list(range(count)))
            elif residual:
                vector = vector + load(R, [token, ramp(row, count)])
            store(Y, [token, ramp(row, count)], vector)

        emit_transpose([load(out, [o * rows_out + i, ramp(h * token_lanes, token_lanes)]) for i in range(rows_out)],
                       token_lanes, put)

    @T.macro
    def write_back_scalar(out, R, Y, mo, first, end):
        for t in T.serial(tile):
            for i in T.serial(rows):
                if mo * tile + t < m and first * r + i < end * r:
                    if residual:
                        Y[mo * tile + t, first * r + i] = out[i, t] + residual_at(R, mo, t, first * r + i)
                    else:
                        Y[mo * tile + t, first * r + i] = out[i, t]

    @T.macro
    def write_rows(out, R, Y, mo, first, end):
        if y_tiled:
            # Token tiles past m hold values computed from x's zero padding; the next kernel's padded tokens are
            # never written back, so they need not be zero.
            for i in T.serial(rows):
                if first * r + i < end * r:
                    for t in T.vectorized(tile):
                        if residual:
                            Y[mo, first * r + i, t] = out[i, t] + residual_at(R, mo, t, first * r + i)
                        else:
                            Y[mo, first * r + i, t] = out[i, t]
        elif transpose_out:
            if first + group <= end and mo * tile + tile <= m:
                for h in T.serial(tile // token_lanes):
                    for o in T.serial(rows // rows_out):
                        write_back(out, R, Y, mo, first, h, o)
            else:
                write_back_scalar(out, R, Y, mo, first, end)
        else:
            write_back_scalar(out, R, Y, mo, first, end)

    return write_rows


def _row_product(geo: _Geometry, start, stored, activate, write_rows):
    """`rows_times_tile(X, P, J, V, B, R, Y, XT, mo, xmo, first, end)`: one group of block-rows times one token
    tile of x^T, through the epilogue into y."""
    r, c, tile, rows, group, chains, dtype = geo.r, geo.c, geo.tile, geo.rows, geo.group, geo.chains, geo.dtype

    @T.macro
    def accumulate(P, J, V, B, XT, xmo, first, g, acc):
        # Block-row first + g times x^T's tile xmo, its non-zeros dealt round the `chains` accumulator sets, summed
        # into set 0.
        for q in T.unroll(chains):
            for i in T.unroll(r):
                for t in T.vectorized(tile):
                    acc[q, i, t] = T.if_then_else(q == 0, B[(first + g) * r + i], T.cast(0, dtype))
        for e in T.serial(stored(P, first + g) // chains):
            for q in T.unroll(chains):
                for j in T.unroll(c):
                    for i in T.unroll(r):
                        for t in T.vectorized(tile):
                            acc[q, i, t] = acc[q, i, t] + V[start(P, first + g) + e * chains + q, i, j] * XT[
                                xmo, T.cast(J[start(P, first + g) + e * chains + q], "int32") * c + j, t]
        for e in T.serial(stored(P, first + g) % chains):
            for j in T.unroll(c):
                for i in T.unroll(r):
                    for t in T.vectorized(tile):
                        acc[0, i, t] = acc[0, i, t] + V[start(P, first + g + 1) - stored(P, first + g) % chains + e, i, j] * XT[
                            xmo, T.cast(J[start(P, first + g + 1) - stored(P, first + g) % chains + e],
                                  "int32") * c + j, t]
        for q in T.unroll(chains - 1):
            for i in T.unroll(r):
                for t in T.vectorized(tile):
                    acc[0, i, t] = acc[0, i, t] + acc[q + 1, i, t]

    @T.macro
    def rows_times_tile(X, P, J, V, B, R, Y, XT, mo, xmo, first, end):
        # Block-rows first .. first + group - 1 that lie before `end`, for token tile mo (x^T's tile xmo).
        # "global" scope: TVM keeps a CPU allocation on the stack only in that scope and under STACK_LIMIT_BYTES
        # (an annotation asking for it did not reach the allocation in TVM 0.27).
        out = T.alloc_local((rows, tile), dtype, scope="global")
        acc = T.alloc_local((chains, r, tile), dtype, scope="global")
        for g in T.serial(group):
            if first + g < end:
                accumulate(P, J, V, B, XT, xmo, first, g, acc)
                activate(acc, out, g)
        write_rows(out, R, Y, mo, first, end)

    return rows_times_tile


def _transposes(geo: _Geometry):
    """`transpose_strip(X, XT, mo, xmo, kb)`: one token tile of one strip of x into x^T; `transpose(X, XT)`: all of
    x, in one parallel loop."""
    m, k, tile, dtype, m_outer, k_strips = geo.m, geo.k, geo.tile, geo.dtype, geo.m_outer, geo.k_strips
    lanes, token_lanes, transpose_in = geo.lanes, geo.token_lanes, geo.transpose_in

    def read_tokens(X, XT, mo, xmo, kb, h, part):
        # x's tokens h * token_lanes .. of tile mo, columns of strip kb's part: into x^T, a run of tokens per column.
        column = kb * TRANSPOSE_STRIP + part * lanes

        def put(c, r0, vector, count):
            store(XT, [xmo, column + c, ramp(h * token_lanes + r0, count)], vector)

        emit_transpose([load(X, [mo * tile + h * token_lanes + i, ramp(column, lanes)]) for i in range(token_lanes)],
                       lanes, put)

    @T.macro
    def transpose_scalar(X, XT, mo, xmo, kb):
        for t in T.serial(tile):
            for kj in T.serial(TRANSPOSE_STRIP):
                if kb * TRANSPOSE_STRIP + kj < k:
                    XT[xmo, kb * TRANSPOSE_STRIP + kj, t] = T.if_then_else(
                        mo * tile + t < m, X[T.min(mo * tile + t, m - 1), kb * TRANSPOSE_STRIP + kj], T.cast(0, dtype))

    @T.macro
    def transpose_strip(X, XT, mo, xmo, kb):
        # Token tile mo of X's columns in strip kb into x^T's tile xmo.
        if transpose_in:
            if kb * TRANSPOSE_STRIP + TRANSPOSE_STRIP <= k and mo * tile + tile <= m:
                for h in T.serial(tile // token_lanes):
                    for part in T.serial(TRANSPOSE_STRIP // lanes):
                        read_tokens(X, XT, mo, xmo, kb, h, part)
            else:
                transpose_scalar(X, XT, mo, xmo, kb)
        else:
            transpose_scalar(X, XT, mo, xmo, kb)

    @T.macro
    def transpose(X, XT):
        # In TRANSPOSE_STRIP-column strips: reading a column of X touches one cache line per token, and at K = 3072
        # those lines all map to one L1 set; a strip uses each line it loads 16 times.
        for kb in T.parallel(k_strips):
            for mo in T.serial(m_outer):
                transpose_strip(X, XT, mo, mo, kb)

    return transpose_strip, transpose


def _schedules(geo: _Geometry, task_span, rows_times_tile, transpose_strip):
    """The loop orders over token tiles and row tasks: `by_token_tiles(X, P, J, V, B, R, Y)` (token split) and
    `product(X, P, J, V, B, R, Y, XT)` (over an x^T already transposed)."""
    k, tile, dtype, m_outer, k_strips, x_tiled = geo.k, geo.tile, geo.dtype, geo.m_outer, geo.k_strips, geo.x_tiled
    block_rows, group, tasks, token_outer = geo.block_rows, geo.group, geo.tasks, geo.token_outer

    @T.macro
    def by_token_tiles(X, P, J, V, B, R, Y):
        # Each thread owns whole token tiles and transposes only its own, into a buffer of one tile that stays in
        # its cache: no barrier, and no thread reads x^T another core wrote.
        for mo in T.parallel(m_outer):
            if x_tiled:
                for part in T.serial((block_rows + group - 1) // group):
                    rows_times_tile(X, P, J, V, B, R, Y, X, mo, mo, part * group, block_rows)
            else:
                XT = T.alloc_buffer((1, k, tile), dtype)
                for kb in T.serial(k_strips):
                    transpose_strip(X, XT, mo, 0, kb)
                for part in T.serial((block_rows + group - 1) // group):
                    rows_times_tile(X, P, J, V, B, R, Y, XT, mo, 0, part * group, block_rows)

    @T.macro
    def product(X, P, J, V, B, R, Y, XT):
        # Inside one launch each parallel loop splits its tasks the same way, so a thread keeps its rows from one
        # token tile to the next and needs no barrier between them.
        if token_outer:
            for mo in T.serial(m_outer):
                for task in T.parallel(tasks):
                    span = T.alloc_local((3,), "int32", scope="global")
                    task_span(P, task, span)
                    for part in T.serial((span[1] - span[0] + group - 1) // group):
                        rows_times_tile(X, P, J, V, B, R, Y, XT, mo, mo, span[0] + part * group, span[1])
        else:
            for task in T.parallel(tasks):
                span = T.alloc_local((3,), "int32", scope="global")
                task_span(P, task, span)
                for part in T.serial((span[1] - span[0] + group - 1) // group):
                    for mo in T.serial(m_outer):
                        rows_times_tile(X, P, J, V, B, R, Y, XT, mo, mo, span[0] + part * group, span[1])

    return by_token_tiles, product


def bsr_linear_kernel(m: int, n: int, k: int, block: tuple[int, int], dtype: str, activation: str = "none",
                      residual: bool = False, index_dtype: str = "int32", column_dtype: str = "int32", *,
                      knobs: KernelKnobs | None = None, x_tiled: bool = False, y_tiled: bool = False,
                      residual_tiled: bool = False, row_blocks: int | None = None):
    """PrimFunc `(x[m, k], indptr[n/r + 1], indices[nb], values[nb, r, c], bias[n], res, y[m, n])`.
    `res` is (m, n) when `residual`, else an unused (1, 1) buffer. Needs n % r == 0 and k % c == 0 (the planner
    only picks block shapes that divide the weight). `knobs` defaults to `default_knobs(m, n, k, block, dtype)`.
    `x_tiled` / `y_tiled` / `residual_tiled`: x / y / res come in / go out in `token_tiled_shape` with the knobs'
    token tile (clipped to m) instead of (m, k) / (m, n) / (m, n); a tiled x needs no transpose.
    `row_blocks`: every block-row stores exactly this many blocks (ELL rows, `uniform_row_blocks`): the kernel then
    never reads indptr, and each row's loop has a constant trip count that LLVM unrolls."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is not one of {ACTIVATIONS}")
    if knobs is None:
        knobs = default_knobs(m, n, k, block, dtype)
    if knobs.token_tile < 1 or knobs.rows_per_task < 1 or knobs.chains < 1:
        raise ValueError(f"knobs must be positive: {knobs}")
    geo = _geometry(m, n, k, block, dtype, activation, residual, knobs, x_tiled, y_tiled, residual_tiled, row_blocks)
    if row_blocks is not None and row_blocks < 0:
        raise ValueError(f"row_blocks must be >= 0, got {row_blocks}")

    start, stored, task_span = _indexing(geo)
    rows_times_tile = _row_product(geo, start, stored, _activation(geo), _write_back(geo))
    transpose_strip, transpose = _transposes(geo)
    by_token_tiles, product = _schedules(geo, task_span, rows_times_tile, transpose_strip)
    r, c, tile, m_outer, block_rows, tasks, k_strips = (geo.r, geo.c, geo.tile, geo.m_outer, geo.block_rows,
                                                        geo.tasks, geo.k_strips)
    x_shape, y_shape, res_shape = geo.x_shape, geo.y_shape, geo.res_shape

    @T.prim_func(private=True)
    def kernel(x: T.handle, indptr: T.handle, indices: T.handle, values: T.handle, bias: T.handle, res: T.handle,
               y: T.handle):
        T.func_attr({"tir.noalias": True})
        nb = T.int64()
        X = T.match_buffer(x, x_shape, dtype)
        P = T.match_buffer(indptr, (block_rows + 1,), index_dtype)
        J = T.match_buffer(indices, (nb,), column_dtype)
        V = T.match_buffer(values, (nb, r, c), dtype)
        B = T.match_buffer(bias, (n,), dtype)
        R = T.match_buffer(res, res_shape, dtype)
        Y = T.match_buffer(y, y_shape, dtype)
        if knobs.token_split:
            by_token_tiles(X, P, J, V, B, R, Y)
        elif x_tiled:
            product(X, P, J, V, B, R, Y, X)
        else:
            XT = T.alloc_buffer((m_outer, k, tile), dtype)
            # One parallel launch for the transpose and the product, with a barrier between them: a second launch
            # wakes TVM's sleeping workers a second time (BERT-base's kernels measured 5-10 % faster this way).
            # TVM drops a parallel loop of one iteration, and a launch point then finds none: such kernels launch
            # twice.
            if k_strips > 1 and tasks > 1:
                with T.attr(0, "pragma_parallel_launch_point", 1):
                    with T.attr(0, "pragma_parallel_barrier_when_finish", 1):
                        transpose(X, XT)
                    product(X, P, J, V, B, R, Y, XT)
            else:
                transpose(X, XT)
                product(X, P, J, V, B, R, Y, XT)

    return kernel
