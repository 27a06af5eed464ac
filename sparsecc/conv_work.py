"""The direct convolution kernel's work in numbers, without TVM: its knobs, how its tasks split the output, and
the padding it reads (codegen/kernels/cpu/direct_conv.py is the kernel; the rewrite pass, the planner and the
converter need the same arithmetic, and the first two must not load TVM for it)."""

from __future__ import annotations

import dataclasses

from sparsecc.kernel_work import STACK_LIMIT_BYTES, elem_bytes

# Bump when the generated code changes: timings stored for an older kernel are then ignored.
CONV_TEMPLATE_VERSION = 4
# Bytes of the widest vector register the kernels' targets have (as codegen/kernels/cpu/transpose.VECTOR_BYTES).
VECTOR_BYTES = 64


def vector_lanes(dtype: str) -> int:
    return VECTOR_BYTES // elem_bytes(dtype)


@dataclasses.dataclass(frozen=True)
class ConvKnobs:
    """rows: output rows per task (`band_rows` caps it). chunk: input channels whose weights are applied before the
    next chunk's: their input band stays in L1 while `group` output channels read it (one output channel at a time
    streamed the whole band, C x (rows + kh - 1) rows, from L2 for every stored weight, which bound the kernel at
    about a fifth of the FMA rate). group: output channels computed together, their partial sums kept between
    chunks. The defaults measured best of rows 1-4, chunk 8-32 and group 8-256 on 3x3 256->256 convolutions at
    56x56, 28x28 and 14x14, 90 % sparse (benchmarks/direct_conv.py --sweep, --densities)."""

    rows: int | None = None
    chunk: int | None = None  # None: `default_chunk` of the kernel's taps
    group: int = 64

    def for_taps(self, taps: int) -> "ConvKnobs":
        """These knobs with the chunk decided for a kernel of `taps` taps (the kernel itself sees only offsets)."""
        return self if self.chunk is not None else dataclasses.replace(self, chunk=default_chunk(taps))


# Candidate weights (input channels x taps) per output channel in one chunk. Measured best here: 16 channels of a
# 3x3 (144) and 256 of a 1x1 (1x1 convolutions 256->64 @56 to 2048->512 @7: 1.2-1.5x faster than 16 or 64
# channels); fewer candidates leave too few stored weights per chunk to pay for loading and storing its
# accumulators, more push the chunk's input band out of L1/L2.
CHUNK_CANDIDATES = 256


def default_chunk(taps: int) -> int:
    """The largest power of two of input channels with at most CHUNK_CANDIDATES candidate weights, at least 8."""
    channels = max(1, CHUNK_CANDIDATES // max(1, taps))
    return max(8, 1 << (channels.bit_length() - 1))


def chunk_count(channels: int, chunk: int) -> int:
    return (channels + chunk - 1) // chunk


def chunk_pointers(indptr, columns, taps: int, chunk: int, channels: int):
    """(out_channels, chunks + 1) int32 array: where each row's stored weights of each input-channel chunk begin,
    from a CSR weight (`indptr`, sorted `columns` into the (out, channels * taps) matrix)."""
    import numpy as np

    indptr = np.asarray(indptr, dtype=np.int64)
    columns = np.asarray(columns, dtype=np.int64)
    chunks = chunk_count(channels, chunk)
    bounds = np.arange(chunks + 1) * chunk * taps
    out = np.empty((len(indptr) - 1, chunks + 1), dtype=np.int32)
    for o in range(len(indptr) - 1):
        row = columns[indptr[o]:indptr[o + 1]]
        out[o] = indptr[o] + np.searchsorted(row, bounds, side="left")
    return out


def band_rows(out_h: int, out_w: int, padded_w: int, dtype: str, wanted: int | None = None) -> int:
    """Output rows per task: as many as the accumulators (a run of (rows - 1) * Wp + Wo values) fit the stack, at
    most `wanted` (default: all that fit) and at most the image's height."""
    rows = max(1, min(out_h, wanted or out_h))
    while rows > 1 and run_length(rows, out_w, padded_w, dtype) * elem_bytes(dtype) >= STACK_LIMIT_BYTES:
        rows -= 1
    return rows


def run_length(rows: int, out_w: int, padded_w: int, dtype: str) -> int:
    """Accumulators per task: the band's run of pixels rounded up to whole vectors (an odd-length vector is split
    by LLVM into shuffles that cost more than the FMAs)."""
    lanes = vector_lanes(dtype)
    return -(-((rows - 1) * padded_w + out_w) // lanes) * lanes


def tail_rows(padded_w: int, dtype: str) -> int:
    """Rows of zeros below the padded input: the last band's whole vectors read up to a vector less one past the
    input's end (`run_length`), whatever the band's rows."""
    return -(-(vector_lanes(dtype) - 1) // padded_w)
