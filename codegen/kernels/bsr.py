"""TIR kernel for y = activation(x @ W^T + bias) + residual with W in block-sparse rows (BSR, r x c blocks,
only blocks holding a non-zero stored). CSR is the 1 x 1 case of the same kernel.

Layout, and why:
- x is transposed once into token tiles, (tiles, K, 32): each weight value multiplies a contiguous run of 32
  tokens, which is broadcast + vector FMA. A gather along K in row-major x would be scalar. The transpose, and the
  one back into a row-major y, run as register transposes (codegen/kernels/transpose.py) on whole blocks.
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
the heuristics above; codegen/tuning.py searches the others per kernel and weight pattern.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from tvm import tirx
from tvm.script import tirx as T

from sparsecc.codegen.kernels.transpose import emit_transpose, is_power_of_two, load, ramp, store, vector_lanes

# Bump when the generated code changes for the same knobs: tuning results stored for an older template are
# then ignored (the tuning database keys on it).
TEMPLATE = "bsr_linear"
TEMPLATE_VERSION = 10

# Tokens per inner tile. Measured at BERT shapes on AVX-512: 32 beat 16, 64 and 128 for 1-row blocks.
TOKEN_TILE = 32
# TVM puts a CPU allocation on the stack only below this size (runtime::kMaxStackAlloca); above it the
# accumulators come from the workspace allocator and LLVM stores them after every FMA. Tall blocks take
# shorter token tiles to stay below it.
STACK_LIMIT_BYTES = 1024
# Output rows a task writes back together: 8 fp32 values make a 32-byte run per token.
ROWS_PER_TASK = 8
# A row's fixed cost (accumulator set-up, reduction, epilogue, write-back) in units of one stored value's
# multiply-adds: about 30 cycles per row and token tile against 2.5 per value at 3072x768, 128 tokens.
ROW_WORK = 12
# At most this many tasks per kernel: enough for work-balanced spans to even out, few enough that each task's
# binary search costs nothing (one task per 8 rows cost 3-6 % at BERT shapes). 48 divides evenly among 1, 2, 3, 4,
# 6, 8, 12, 16, 24 and 48 threads, as TVM hands each thread ceil(tasks / threads) consecutive tasks.
MAX_TASKS = 48
# Columns of x transposed together: 16 fp32 values fill one 64-byte cache line.
TRANSPOSE_STRIP = 16
ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh")


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


def prefers_token_outer(k: int) -> bool:
    """Token-outer pays once x^T no longer fits L2 (K = 3072 at 128 tokens: 1.5 MB); measured 5 % there,
    and 10-30 % slower at K = 768."""
    return k >= 2048


@dataclasses.dataclass(frozen=True)
class KernelKnobs:
    """The template's free parameters. Every combination computes the same result; only speed differs.

    token_tile: tokens per vector run (a power of two; clipped to the token count). The accumulators,
        chains * r * token_tile values, must stay below STACK_LIMIT_BYTES (see `fits`).
    rows_per_task: output rows a task computes and writes back together (whole block-rows, at least one); also
        sets the number of tasks, n / rows_per_task up to MAX_TASKS, each owning an equal share of the work.
    token_outer: token tiles outside the parallel loop (all threads share one slice of x^T) or inside it.
    chains: independent accumulator sets the non-zeros of a row are spread over (hides FMA latency).
    token_split: threads split the token tiles instead of the rows: each owns whole tiles, transposes only those,
        and runs every row over them (token_outer and the row tasks then do nothing). Even only when the tiles
        divide among the threads.
    """

    token_tile: int
    rows_per_task: int
    token_outer: bool
    chains: int
    token_split: bool = False

    def fits(self, block: tuple[int, int], dtype: str) -> bool:
        """Whether the accumulators stay on the stack (else LLVM stores them after every FMA)."""
        return self.chains * block[0] * self.token_tile * elem_bytes(dtype) < STACK_LIMIT_BYTES

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def elem_bytes(dtype: str) -> int:
    return 8 if dtype == "float64" else 4


def default_knobs(m: int, n: int, k: int, block: tuple[int, int], dtype: str,
                  threads: int | None = None) -> KernelKnobs:
    """The untuned heuristics: 32-token tiles halved until the accumulators fit the stack, 8 output rows a task,
    token-outer from K = 2048, 4 / r accumulator chains; threads split the token tiles where `threads` (those
    the kernel will run on) divide them evenly. Measured at 128 tokens on 2 threads, 90 % CSR: 768 x 768 17 %
    faster with row-major x and y (8 % with tiled ones), 768 x 3072 23 % (benchmarks/loop_orders.py)."""
    knobs = KernelKnobs(token_tile=TOKEN_TILE, rows_per_task=ROWS_PER_TASK, token_outer=prefers_token_outer(k),
                        chains=max(1, 4 // block[0]))
    while knobs.token_tile > 1 and not knobs.fits(block, dtype):
        knobs = dataclasses.replace(knobs, token_tile=knobs.token_tile // 2)
    tiles = -(-m // min(knobs.token_tile, m))
    if threads is not None and tiles % threads == 0:
        knobs = dataclasses.replace(knobs, token_outer=False, token_split=True)
    return knobs


def task_count(n: int, block: tuple[int, int], rows_per_task: int) -> int:
    """Parallel tasks of the kernel for an n-row weight: one per `rows_per_task` rows, at most MAX_TASKS."""
    block_rows = n // block[0]
    group = max(1, rows_per_task // block[0])
    return min((block_rows + group - 1) // group, MAX_TASKS)


def work_prefix(blocks_per_row: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """The kernel's work before each block-row, and the total (rows + 1 values): stored values plus ROW_WORK per row,
    as the kernel's own `work` computes it from indptr."""
    r, c = block
    rows = torch.arange(len(blocks_per_row) + 1, dtype=torch.int64)
    stored = torch.nn.functional.pad(blocks_per_row.to(torch.int64).cumsum(0), (1, 0))
    return stored * (r * c) + rows * (r * ROW_WORK)


def task_spans(prefix: torch.Tensor, tasks: int) -> torch.Tensor:
    """The block-row where each task starts, and the end (tasks + 1 values), as the kernel finds them: task t starts
    at the first block-row whose `work_prefix` reaches t / tasks of the total."""
    targets = prefix[-1] * torch.arange(tasks + 1, dtype=torch.int64)
    return torch.searchsorted(prefix * tasks, targets, side="left")


def token_tiled_shape(m: int, width: int, tile: int) -> tuple[int, int, int]:
    """The kernel's own layout of an (m, width) activation: (token tiles, width, tile), tokens past m zero-padded
    on input. A kernel that feeds another sparse kernel can write its output this way, and the next one then
    skips its transpose (the writer stores whole vectors instead of one value per token)."""
    return ((m + tile - 1) // tile, width, tile)


def to_token_tiles(x: torch.Tensor, tile: int, fill: float = 0.0) -> torch.Tensor:
    """x, read as a (tokens, last dimension) matrix, in `token_tiled_shape`; tokens past the last filled with `fill`.
    The kernels never convert (they read and write the layout themselves); tests and benchmarks do."""
    flat = x.reshape(-1, x.shape[-1])
    tiles, width, _ = token_tiled_shape(flat.shape[0], flat.shape[1], tile)
    padded = torch.full((tiles * tile, width), fill, dtype=x.dtype)
    padded[:flat.shape[0]] = flat
    return padded.reshape(tiles, tile, width).transpose(1, 2).contiguous()


def from_token_tiles(tiled: torch.Tensor, shape) -> torch.Tensor:
    """The inverse of `to_token_tiles` for a tensor of `shape`."""
    tiles, width, tile = tiled.shape
    tokens = math.prod(shape) // width
    return tiled.transpose(1, 2).reshape(tiles * tile, width)[:tokens].reshape(shape)


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
    # Register transposes (codegen/kernels/transpose.py) move whole blocks: `lanes` columns of x per vector in,
    # `token_lanes` tokens of `rows_out` output rows out. Partial tiles, strips and groups keep the scalar loops.
    lanes = vector_lanes(dtype)
    token_lanes = min(tile, lanes)
    rows_out = min(rows, lanes)
    transpose_in = (not x_tiled and is_power_of_two(token_lanes) and token_lanes > 1 and tile % token_lanes == 0
                    and TRANSPOSE_STRIP % lanes == 0)
    transpose_out = (not y_tiled and is_power_of_two(token_lanes) and token_lanes > 1 and tile % token_lanes == 0
                     and is_power_of_two(rows_out) and rows_out > 1 and rows % rows_out == 0)
    y_shape = token_tiled_shape(m, n, tile) if y_tiled else (m, n)

    if row_blocks is not None and row_blocks < 0:
        raise ValueError(f"row_blocks must be >= 0, got {row_blocks}")

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

    def read_tokens(X, XT, mo, xmo, kb, h, part):
        # x's tokens h * token_lanes .. of tile mo, columns of strip kb's part: into x^T, a run of tokens per column.
        column = kb * TRANSPOSE_STRIP + part * lanes

        def put(c, r0, vector, count):
            store(XT, [xmo, column + c, ramp(h * token_lanes + r0, count)], vector)

        emit_transpose([load(X, [mo * tile + h * token_lanes + i, ramp(column, lanes)]) for i in range(token_lanes)],
                       lanes, put)

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
    def rows_times_tile(X, P, J, V, B, R, Y, XT, mo, xmo, first, end):
        # Block-rows first .. first + group - 1 that lie before `end`, for token tile mo (x^T's tile xmo).
        # "global" scope: TVM keeps a CPU allocation on the stack only in that scope and under STACK_LIMIT_BYTES
        # (an annotation asking for it did not reach the allocation in TVM 0.27).
        out = T.alloc_local((rows, tile), dtype, scope="global")
        acc = T.alloc_local((chains, r, tile), dtype, scope="global")
        for g in T.serial(group):
            if first + g < end:
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
