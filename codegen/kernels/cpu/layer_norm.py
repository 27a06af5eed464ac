"""TIR kernel for layer norm over the last dimension: y = (x - mean) / sqrt(var + eps) * weight + bias.

Why it exists: layer norm sits between the sparse kernels of a transformer layer; left in PyTorch it cut every
layer into three TVM regions. Rows are independent, so tasks take runs of rows; each row's sums run in `LANES`
vector lanes (then across them), as TVM's generic reduction would run one value at a time.

Between sparse kernels the activations are in their token-tiled layout (bsr.token_tiled_shape). There a task takes
a tile of tokens as the vector lanes and walks the width: every sum is a vector add, with no reduction across lanes.
"""

from __future__ import annotations

from tvm.script import tirx as T

from sparsecc.kernel_work import TOKEN_TILE, token_tiled_shape

# 16 fp32 lanes: one AVX-512 register.
LANES = 16
# Rows a task normalises: enough work per task to hide the launch, 8 tasks for 128 tokens.
ROWS_PER_TASK = 16
# Independent partial sums per row.
CHAINS = 4


def token_tile(rows: int) -> int:
    """Tokens a tile of the token-tiled layout holds: the sparse kernels' default, clipped to the token count."""
    return min(TOKEN_TILE, rows)


def layer_norm_kernel(rows: int, width: int, eps: float, dtype: str, affine: bool, x_tiled: bool = False,
                      y_tiled: bool = False):
    """PrimFunc `(x[rows, width], weight[width], bias[width], y[rows, width])`; weight and bias are unused
    (1,) buffers when not `affine`. `x_tiled` / `y_tiled`: x / y in the token-tiled layout with `token_tile(rows)`
    tokens a tile instead."""
    if x_tiled or y_tiled:
        return _token_lanes_kernel(rows, width, eps, dtype, affine, x_tiled, y_tiled)
    lanes = LANES if width % LANES == 0 else 1
    chunks = width // lanes
    chains = CHAINS if chunks % CHAINS == 0 else 1
    tasks = (rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    param = (width,) if affine else (1,)

    @T.macro
    def row_sum(X, part, stat, row, s):
        # stat[0] = the row's mean (s = 0), then stat[1] = the mean squared deviation from it (s = 1). Mean first:
        # one pass of sum and sum of squares loses digits when the mean is large against the spread; and the mean
        # as the first value plus the mean offset from it, for the same reason. CHAINS
        # independent vector sums, as each add waits for the previous one into its register.
        for q in T.unroll(chains):
            for l in T.vectorized(lanes):
                part[q, l] = T.cast(0, dtype)
        for c in T.serial(chunks // chains):
            for q in T.unroll(chains):
                for l in T.vectorized(lanes):
                    if s == 0:
                        part[q, l] = part[q, l] + (X[row, (c * chains + q) * lanes + l] - X[row, 0])
                    else:
                        part[q, l] = part[q, l] + (X[row, (c * chains + q) * lanes + l] - stat[0]) * (
                            X[row, (c * chains + q) * lanes + l] - stat[0])
        stat[s] = T.cast(0, dtype)
        for q in T.serial(chains):
            for l in T.serial(lanes):
                stat[s] = stat[s] + part[q, l]
        stat[s] = stat[s] / T.cast(width, dtype)
        if s == 0:
            stat[0] = stat[0] + X[row, 0]

    @T.prim_func(private=True)
    def kernel(x: T.handle, weight: T.handle, bias: T.handle, y: T.handle):
        T.func_attr({"tir.noalias": True})
        X = T.match_buffer(x, (rows, width), dtype)
        W = T.match_buffer(weight, param, dtype)
        B = T.match_buffer(bias, param, dtype)
        Y = T.match_buffer(y, (rows, width), dtype)
        for task in T.parallel(tasks):
            part = T.alloc_local((chains, lanes), dtype, scope="global")
            stat = T.alloc_local((2,), dtype, scope="global")
            for i in T.serial(ROWS_PER_TASK):
                if task * ROWS_PER_TASK + i < rows:
                    row = task * ROWS_PER_TASK + i
                    # Mean first, then the squared deviations: one pass of sum and sum of squares loses digits
                    # when the mean is large against the spread.
                    row_sum(X, part, stat, row, 0)
                    row_sum(X, part, stat, row, 1)
                    stat[1] = T.cast(1, dtype) / T.sqrt(stat[1] + T.cast(eps, dtype))
                    for c in T.serial(chunks):
                        for l in T.vectorized(lanes):
                            if affine:
                                Y[row, c * lanes + l] = (X[row, c * lanes + l] - stat[0]) * stat[1] * W[c * lanes + l] + B[
                                    c * lanes + l]
                            else:
                                Y[row, c * lanes + l] = (X[row, c * lanes + l] - stat[0]) * stat[1]

    return kernel


def _token_lanes_kernel(rows: int, width: int, eps: float, dtype: str, affine: bool, x_tiled: bool, y_tiled: bool):
    tile = token_tile(rows)
    tiles = (rows + tile - 1) // tile
    chains = CHAINS if width % CHAINS == 0 else 1  # independent partial sums, for speed and accuracy
    param = (width,) if affine else (1,)
    x_shape = token_tiled_shape(rows, width, tile) if x_tiled else (rows, width)
    y_shape = token_tiled_shape(rows, width, tile) if y_tiled else (rows, width)

    def x_at(X, mo, t, c):
        # Padded tokens of a row-major x read its last row; their results are never stored in a row-major y.
        if x_tiled:
            return X[mo, c, t]
        return X[T.min(mo * tile + t, rows - 1), c]

    def normalised(X, W, B, stat, mo, t, c):
        value = (x_at(X, mo, t, c) - stat[0, t]) * stat[1, t]
        return value * W[c] + B[c] if affine else value

    @T.macro
    def lane_sum(X, part, stat, mo, s):
        # As row_sum, one sum per token lane: stat[0] = the mean (s = 0), then stat[1] = the mean squared deviation
        # from it (s = 1); `chains` partial sums down the width, for speed and accuracy.
        for q in T.unroll(chains):
            for t in T.vectorized(tile):
                part[q, t] = T.cast(0, dtype)
        for c in T.serial(width // chains):
            for q in T.unroll(chains):
                for t in T.vectorized(tile):
                    if s == 0:
                        part[q, t] = part[q, t] + (x_at(X, mo, t, c * chains + q) - x_at(X, mo, t, 0))
                    else:
                        part[q, t] = part[q, t] + (x_at(X, mo, t, c * chains + q) - stat[0, t]) * (
                            x_at(X, mo, t, c * chains + q) - stat[0, t])
        for t in T.vectorized(tile):
            stat[s, t] = T.cast(0, dtype)
        for q in T.unroll(chains):
            for t in T.vectorized(tile):
                stat[s, t] = stat[s, t] + part[q, t]
        for t in T.vectorized(tile):
            stat[s, t] = stat[s, t] / T.cast(width, dtype)
            if s == 0:
                stat[0, t] = stat[0, t] + x_at(X, mo, t, 0)

    @T.prim_func(private=True)
    def kernel(x: T.handle, weight: T.handle, bias: T.handle, y: T.handle):
        T.func_attr({"tir.noalias": True})
        X = T.match_buffer(x, x_shape, dtype)
        W = T.match_buffer(weight, param, dtype)
        B = T.match_buffer(bias, param, dtype)
        Y = T.match_buffer(y, y_shape, dtype)
        for mo in T.parallel(tiles):
            stat = T.alloc_local((2, tile), dtype, scope="global")
            part = T.alloc_local((chains, tile), dtype, scope="global")
            lane_sum(X, part, stat, mo, 0)
            lane_sum(X, part, stat, mo, 1)
            for t in T.vectorized(tile):
                stat[1, t] = T.cast(1, dtype) / T.sqrt(stat[1, t] + T.cast(eps, dtype))
            if y_tiled:
                for c in T.serial(width):
                    for t in T.vectorized(tile):
                        Y[mo, c, t] = normalised(X, W, B, stat, mo, t, c)
            else:
                for t in T.serial(tile):
                    if mo * tile + t < rows:
                        for c in T.serial(width):
                            Y[mo * tile + t, c] = normalised(X, W, B, stat, mo, t, c)

    return kernel
