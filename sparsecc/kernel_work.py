"""The sparse kernel's work in numbers, without TVM: its knobs and their defaults, how its tasks split the rows,
the token-tiled layout, and the template's version.

The kernel itself is TIR (codegen/kernels/cpu/bsr.py); analysis (thread balance), the cost model (work per
thread), tuning (the knob space) and the converters all need the same arithmetic, and analysis and the cost
model must not load TVM to get it. So it lives here, and the kernel imports it like everyone else.
"""

from __future__ import annotations

import dataclasses
import math

import torch

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
# The direct convolution kernel also fuses the ones CNNs use (MobileNet: ReLU6; EfficientNet, YOLO: SiLU).
CONV_ACTIVATIONS = (*ACTIVATIONS, "relu6", "silu")


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
