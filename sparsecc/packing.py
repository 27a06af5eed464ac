"""Dense weights <-> the packed arrays `sparsecc::sparse_linear` and the kernels take, and back.

Every format is the same three arrays: int32 block-row pointers (indptr), block-column indices, values (stored
blocks, r, c). CSR is BSR with 1 x 1 blocks. ELL is BSR whose block-rows were padded to one length with zero blocks,
so indptr is a multiple of the row index and the kernel can take the row length as a constant
(codegen/kernels/cpu/bsr.py, `row_blocks`). Padding repeats a column the row already holds: the kernel's extra multiply
reads x^T it has just loaded, and torch's sparse tensors (the eager reference) add duplicate entries.
"""

from __future__ import annotations

import torch

from sparsecc.formats import FormatChoice, SparseFormat

# torch warns that CSR support is "beta" on first use; sparsecc relies only on the long-stable pieces.
SPARSE_BETA = "Sparse (CSR|BSR) tensor support is in beta state"


def pack_blocks(weight: torch.Tensor, block: tuple[int, int] = (1, 1)) -> tuple[torch.Tensor, ...]:
    """Dense (N, K) -> int32 block-row pointers, block-column indices, values (stored blocks, r, c), blocks in
    row-major order. Only blocks holding a non-zero are stored; (1, 1) blocks are CSR. Column indices are int16 when
    every block column fits (K / c <= 32767): at 90 % zeros fp32 that is 0.15x the dense bytes instead of 0.2x,
    and less for the kernel to stream.

    Packed from the mask of occupied blocks rather than by torch's to_sparse_csr / to_sparse_bsr, which go through
    a sorted COO copy: those took most of a warm BERT-base compile's rewrite (the arrays are the same)."""
    from sparsecc.passes.analyze_weights import nonzero_mask, occupied_blocks

    _check_divides(tuple(weight.shape), block)
    w = weight.detach().contiguous()
    (n, k), (r, c) = w.shape, block
    occupied = occupied_blocks(nonzero_mask(w), r, c)
    indptr = torch.zeros(n // r + 1, dtype=torch.int32)
    torch.cumsum(occupied.sum(dim=1), dim=0, out=indptr[1:])
    column_dtype = torch.int16 if k // c <= torch.iinfo(torch.int16).max else torch.int32
    stored = occupied.view(-1).nonzero().squeeze(1)  # flat block numbers, row-major: one scan for both arrays
    columns = (stored % (k // c)).to(column_dtype)
    blocks = w.view(-1, 1, 1) if block == (1, 1) else w.view(n // r, r, k // c, c).transpose(1, 2).reshape(-1, r, c)
    return indptr, columns, blocks.index_select(0, stored)


def pack_ell(weight: torch.Tensor, block: tuple[int, int] = (1, 1)) -> tuple[torch.Tensor, ...]:
    """Like `pack_blocks`, with every block-row padded to the longest one's stored blocks (ELLPACK)."""
    indptr, indices, values = pack_blocks(weight, block)
    counts = indptr.diff().long()
    rows, width = len(counts), int(counts.max()) if len(counts) else 0
    row_of = torch.repeat_interleave(torch.arange(rows), counts)
    slot = torch.arange(len(indices)) - indptr[:-1].long()[row_of]
    last = indices[(indptr[1:].long() - 1).clamp(min=0)] if len(indices) else torch.zeros(rows, dtype=indices.dtype)
    last = torch.where(counts > 0, last, torch.zeros_like(last))
    ell_indices = last.unsqueeze(1).expand(rows, width).clone()
    ell_indices[row_of, slot] = indices
    ell_values = values.new_zeros(rows, width, *block)
    ell_values[row_of, slot] = values
    ell_indptr = (torch.arange(rows + 1) * width).to(torch.int32)
    return ell_indptr, ell_indices.reshape(-1), ell_values.reshape(-1, *block)


def ell_stored_blocks(per_block_row: torch.Tensor) -> int:
    """Blocks `pack_ell` stores for a weight holding `per_block_row` blocks in each block-row."""
    return int(per_block_row.max()) * len(per_block_row) if len(per_block_row) else 0


def pack_choice(weight: torch.Tensor, choice: FormatChoice) -> tuple[torch.Tensor, ...]:
    """`weight` (out, in) packed as the plan chose: ELL or CSR / BSR."""
    if choice.format is SparseFormat.DENSE:
        raise ValueError("a weight planned dense is not packed")
    return (pack_ell if choice.format is SparseFormat.ELL else pack_blocks)(weight, choice.block or (1, 1))


def unpack_blocks(indptr: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
                  shape: tuple[int, int]) -> torch.Tensor:
    """The dense (N, K) weight of packed arrays in any of the formats above (duplicate blocks add up)."""
    n, k = shape
    _, r, c = values.shape
    _check_divides((n, k), (r, c))
    rows = torch.repeat_interleave(torch.arange(len(indptr) - 1), indptr.diff().long())
    dense = values.new_zeros(n // r, k // c, r, c)
    dense.index_put_((rows, indices.long()), values, accumulate=True)
    return dense.permute(0, 2, 1, 3).reshape(n, k)


def uniform_row_blocks(indptr: torch.Tensor) -> int | None:
    """The blocks every block-row stores when all store the same number (ELL rows, or a weight pruned evenly), else
    None. A kernel specialised on it skips indptr and runs each row's loop a constant number of times."""
    if len(indptr) < 2:
        return None
    counts = indptr.diff()
    return int(counts[0]) if bool((counts == counts[0]).all()) else None


def _check_divides(shape: tuple[int, ...], block: tuple[int, int]) -> None:
    if len(shape) != 2 or shape[0] % block[0] or shape[1] % block[1]:
        raise ValueError(f"a {shape} weight does not split into {block[0]}x{block[1]} blocks: "
                         f"pack 2-D weights whose rows divide by {block[0]} and columns by {block[1]}")
