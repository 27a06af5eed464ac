"""Predicted time of one layer, y = x @ W^T with W (n out x k in) applied to `tokens` rows, in each candidate format:
dense in PyTorch, or sparsecc's BSR kernel (codegen/kernels/cpu/bsr.py) with r x c blocks (CSR = 1 x 1).

The model follows what the machine does with each, and its coefficients come from a short micro-benchmark of this
machine (sparsecc/planning/calibration.py), stored per target in the cache:

- Dense (PyTorch's GEMM): a call overhead plus the larger of streaming the weight at the bandwidth measured for a
  working set of its size (caches included), and the multiply-adds at the rate PyTorch reached at that token count
  (the rate of a GEMM climbs steeply from 1 to ~64 rows).
- Sparse kernel, as generated with its default knobs:
  * parallel launches (one, plus one per token tile when token tiles run outside the parallel loop),
  * transposing x into token tiles and writing y, per element and thread,
  * per stored block visited by the busiest thread (a visit = one block times one token tile: index and value
    loads, the gather of c rows of x^T) and per vector FMA (r x c x ceil(tile / lanes) of them per visit), fitted
    per block shape because register pressure and unrolling differ,
  * an extra cost per visit when the x^T working set overflows L2,
  * streaming the stored values and indices at the measured bandwidth (again per token tile with token-outer).
  The busiest thread counts, not the average: where rows are split into contiguous runs per thread, skewed row
  lengths make one thread late (`imbalance`); where threads split the token tiles instead (`token_split`), each
  runs every row, holds one tile of x^T and streams the weight once per tile.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Mapping, Sequence

from sparsecc.kernel_work import default_knobs, elem_bytes

# Version of the model's features: calibrations stored for another version are measured again.
MODEL_VERSION = 4


@dataclasses.dataclass(frozen=True)
class BlockCoefficients:
    """Seconds per unit of the sparse kernel's block-shape-specific work."""

    per_visit: float
    per_vector_fma: float
    # Extra seconds per visit per unit of stored density: kernels slow down more than linearly as the stored
    # fraction grows (measured 3072 x 768, 128 tokens, CSR: 1.3 ms at 25 %, 4.0 ms at 50 %), from the pressure of
    # a task's values and the x^T rows they gather on L1.
    per_dense_visit: float = 0.0
    # Extra seconds per visit with one-token tiles (a single row of x): scalar FMAs wait on scalar gathers.
    per_scalar_visit: float = 0.0


@dataclasses.dataclass(frozen=True)
class MachineModel:
    """What the cost model knows of a machine; `calibrated` False means the built-in reference figures."""

    description: str
    calibrated: bool
    threads: int
    lanes: int  # fp32 values in the widest vector register
    l2_bytes: int
    # (working-set bytes, read bytes per second), increasing sizes: caches, then memory
    bandwidth: tuple[tuple[int, float], ...]
    # (tokens, multiply-adds per second) of PyTorch's dense matmul, increasing token counts
    dense_rate: tuple[tuple[int, float], ...]
    dense_overhead: float  # seconds per PyTorch call
    launch: float  # seconds per parallel launch of a TVM kernel
    transpose: float  # seconds per element of x transposed, per thread
    output: float  # seconds per output element, per thread
    spill: float  # extra seconds per visit when x^T does not fit L2
    blocks: Mapping[str, BlockCoefficients]  # "1x1" (CSR), "8x1", ...

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["version"] = MODEL_VERSION
        return json.dumps(d, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "MachineModel":
        d = json.loads(text)
        if d.pop("version", None) != MODEL_VERSION:
            raise ValueError("machine model of another version")
        d["bandwidth"] = tuple(tuple(p) for p in d["bandwidth"])
        d["dense_rate"] = tuple(tuple(p) for p in d["dense_rate"])
        d["blocks"] = {k: BlockCoefficients(**v) for k, v in d["blocks"].items()}
        return cls(**d)

    def has_block(self, block: tuple[int, int]) -> bool:
        return block_key(block) in self.blocks


def block_key(block: tuple[int, int]) -> str:
    return f"{block[0]}x{block[1]}"


def _interpolate(points: Sequence[tuple[int, float]], x: float) -> float:
    """Piecewise linear in log(x) between measured points, flat beyond them."""
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x <= x1:
            f = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + f * (y1 - y0)
    return points[-1][1]


def bandwidth(machine: MachineModel, working_set: float) -> float:
    return _interpolate(machine.bandwidth, max(working_set, 1.0))


def predict_dense(machine: MachineModel, n: int, k: int, tokens: int, dtype: str = "float32") -> float:
    """Seconds for PyTorch's dense x @ W^T (+ bias)."""
    weight_bytes = n * k * elem_bytes(dtype)
    stream = weight_bytes / bandwidth(machine, weight_bytes)
    rate = _interpolate(machine.dense_rate, tokens) * (0.5 if dtype == "float64" else 1.0)
    return machine.dense_overhead + max(stream, n * k * tokens / rate)


@dataclasses.dataclass(frozen=True)
class SparseWork:
    """The sparse kernel's work for one layer, in the units the machine model prices."""

    launches: int
    transposed: int  # elements of x^T, per thread
    outputs: int  # elements of y, per thread
    visits: int  # stored blocks x token tiles, busiest thread
    dense_visits: float  # visits x stored fraction of the blocks
    scalar_visits: int  # visits with a one-token tile
    vector_fmas: int  # busiest thread
    spills: int  # visits while x^T overflows L2 (0 when it fits)
    stream_seconds: float  # reading the stored weight at the machine's bandwidth


# Which coefficient prices which part of the work: MachineModel field (shared by block shapes) or BlockCoefficients
# field -> SparseWork field. The prediction and the calibration's fit both go through these.
SHARED_TERMS = {"launch": "launches", "transpose": "transposed", "output": "outputs", "spill": "spills"}
BLOCK_TERMS = {"per_visit": "visits", "per_vector_fma": "vector_fmas", "per_dense_visit": "dense_visits",
               "per_scalar_visit": "scalar_visits"}


def sparse_work(machine: MachineModel, n: int, k: int, tokens: int, block: tuple[int, int], stored_blocks: int,
                imbalance: float = 1.0, dtype: str = "float32") -> SparseWork:
    r, c = block
    threads = max(1, machine.threads)
    knobs = default_knobs(tokens, n, k, block, dtype, threads)
    tile = min(knobs.token_tile, tokens)
    tiles = -(-tokens // tile)
    lanes = max(1, machine.lanes * 4 // elem_bytes(dtype))
    size = elem_bytes(dtype)
    weight_bytes = stored_blocks * (r * c * size + 4) + (n // r + 1) * 4
    if knobs.token_split:
        # Each thread runs every row over its own tiles: skewed rows cost all threads alike, each thread's x^T is
        # one tile, and each streams all of the weight once per tile it owns.
        visits = round(stored_blocks * tiles / threads)
        x_bytes = k * tile * size
        passes = tiles
    else:
        visits = round(stored_blocks * max(1.0, imbalance) / threads * tiles)
        x_bytes = k * (tile if knobs.token_outer else tiles * tile) * size
        passes = tiles if knobs.token_outer else 1
    return SparseWork(
        launches=1 + (tiles if knobs.token_outer else 1),
        transposed=-(-k * tiles * tile // threads),
        outputs=-(-n * tiles * tile // threads),
        visits=visits,
        dense_visits=visits * stored_blocks / max(1, (n // r) * (k // c)),
        scalar_visits=visits if tile == 1 else 0,
        vector_fmas=visits * r * c * -(-tile // lanes),
        spills=visits if x_bytes > machine.l2_bytes else 0,
        stream_seconds=weight_bytes * passes / bandwidth(machine, weight_bytes) / threads,
    )


def predict_sparse(machine: MachineModel, n: int, k: int, tokens: int, block: tuple[int, int], stored_blocks: int,
                   imbalance: float = 1.0, dtype: str = "float32") -> float | None:
    """Seconds for sparsecc's kernel with `block`-shaped blocks, None when the machine model has no figures for that
    shape."""
    coeffs = machine.blocks.get(block_key(block))
    if coeffs is None:
        return None
    w = sparse_work(machine, n, k, tokens, block, stored_blocks, imbalance, dtype)
    shared = sum(getattr(w, work) * getattr(machine, price) for price, work in SHARED_TERMS.items())
    per_block = sum(getattr(w, work) * getattr(coeffs, price) for price, work in BLOCK_TERMS.items())
    return shared + per_block + w.stream_seconds


# Figures of the project's 2-core AMD Zen 5 (AVX-512) machine, from `python -m sparsecc.planning.calibration`, used where no
# calibration can run: targets other than this host (cross builds). Plans made with them say so.
REFERENCE = MachineModel(
    description="reference figures of a 2-core Zen 5 (not measured on the target)", calibrated=False, threads=2,
    lanes=16, l2_bytes=1 << 20,
    bandwidth=((262144, 4.86e+10), (1048576, 1.35e+11), (4194304, 1.30e+11), (33554432, 6.22e+10)),
    dense_rate=((1, 1.46e+10), (4, 2.04e+10), (16, 5.42e+10), (64, 7.69e+10), (256, 9.66e+10)),
    dense_overhead=2.66e-06, launch=7.32e-06, transpose=5.75e-10, output=1.6e-09, spill=0,
    blocks={"1x1": BlockCoefficients(0, 3.92e-10, 0, 0),
            "1x4": BlockCoefficients(0, 2.97e-10, 0, 0),
            "4x1": BlockCoefficients(3.02e-10, 1.42e-10, 2.42e-10, 0),
            "8x1": BlockCoefficients(1.32e-11, 1.05e-10, 8.86e-10, 0),
            "16x1": BlockCoefficients(5.98e-12, 9.57e-11, 1.32e-10, 0),
            "4x4": BlockCoefficients(5.02e-10, 2.28e-10, 0, 0),
            "8x8": BlockCoefficients(2.36e-12, 1.51e-10, 0, 0)},
)
