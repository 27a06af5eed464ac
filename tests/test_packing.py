"""Dense <-> packed weights (sparsecc/packing.py): every format round-trips, ELL rows are of one length, and N:M
weights pack into rows of one length."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsecc.packing import ell_stored_blocks, pack_blocks, pack_ell, unpack_blocks, uniform_row_blocks
from sparsecc.sparsify import nm_prune_

BLOCKS = [(1, 1), (1, 4), (4, 1), (8, 1), (16, 1), (4, 4), (8, 8)]
KINDS = ["random", "empty_rows", "full_rows", "zeros", "single", "uneven"]


def blocked_weight(n_blocks: int, k_blocks: int, block, kind: str, density: float, seed: int) -> torch.Tensor:
    r, c = block
    g = torch.Generator().manual_seed(seed)
    occupied = torch.rand(n_blocks, k_blocks, generator=g) < density
    if kind == "empty_rows":
        occupied[::2] = False
    elif kind == "full_rows":
        occupied[1::3] = True
    elif kind == "zeros":
        occupied[:] = False
    elif kind == "single":
        occupied[:] = False
        occupied[n_blocks // 2, k_blocks // 2] = True
    elif kind == "uneven":
        occupied = torch.rand(n_blocks, k_blocks, generator=g) < torch.linspace(1, 0, n_blocks).unsqueeze(1)
    w = torch.randn(n_blocks * r, k_blocks * c, generator=g)
    # Zeros inside stored blocks too: a block is stored when any of its values is non-zero.
    w[torch.rand(w.shape, generator=g) < 0.3] = 0
    return w * occupied.repeat_interleave(r, 0).repeat_interleave(c, 1)


@settings(max_examples=60, deadline=None)
@given(n_blocks=st.integers(1, 24), k_blocks=st.integers(1, 24), block=st.sampled_from(BLOCKS),
       kind=st.sampled_from(KINDS), density=st.floats(0.0, 1.0), seed=st.integers(0, 10_000),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_blocks_and_ell_round_trip(n_blocks, k_blocks, block, kind, density, seed, dtype):
    w = blocked_weight(n_blocks, k_blocks, block, kind, density, seed).to(dtype)
    per_row = w.reshape(n_blocks, block[0], k_blocks, block[1]).ne(0).any(3).any(1).sum(1)

    indptr, indices, values = pack_blocks(w, block)
    assert values.dtype == dtype and values.shape == (int(per_row.sum()), *block)
    torch.testing.assert_close(unpack_blocks(indptr, indices, values, tuple(w.shape)), w, rtol=0, atol=0)

    indptr, indices, values = pack_ell(w, block)
    width = int(per_row.max())
    assert uniform_row_blocks(indptr) == width
    assert values.shape[0] == ell_stored_blocks(per_row) == width * n_blocks
    assert len(indices) == 0 or int(indices.max()) < k_blocks
    torch.testing.assert_close(unpack_blocks(indptr, indices, values, tuple(w.shape)), w, rtol=0, atol=0)


def nm_weight(n_out: int, k: int, n: int, m: int, seed: int, underfilled: float = 0.0) -> torch.Tensor:
    """A weight pruned to n of every m inputs; `underfilled`: the fraction of groups that lose one more value (as an
    exact zero in the trained weight would)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_out, k, generator=g)
    nm_prune_(w, n, m)
    lose = (torch.rand(n_out, k // m, generator=g) < underfilled).repeat_interleave(m, 1)
    first_kept = w.ne(0).reshape(n_out, k // m, m).int().argmax(2, keepdim=True)
    only_first = torch.zeros(n_out, k // m, m, dtype=torch.bool).scatter_(2, first_kept, True).reshape(n_out, k)
    return torch.where(lose & only_first, torch.zeros_like(w), w)


@settings(max_examples=30, deadline=None)
@given(pattern=st.sampled_from([(2, 4), (1, 4), (2, 8), (4, 8), (1, 2)]), rows=st.integers(1, 40),
       groups=st.integers(1, 20), underfilled=st.sampled_from([0.0, 0.2]), seed=st.integers(0, 10_000))
def test_nm_weights_pack_into_rows_of_one_length(pattern, rows, groups, underfilled, seed):
    n, m = pattern
    w = nm_weight(rows, groups * m, n, m, seed, underfilled)
    indptr, indices, values = pack_blocks(w)
    torch.testing.assert_close(unpack_blocks(indptr, indices, values, tuple(w.shape)), w, rtol=0, atol=0)
    if underfilled == 0.0:  # exactly n of every m: CSR rows are already of one length, the ELL kernel's case
        assert uniform_row_blocks(indptr) == n * groups
    indptr, indices, values = pack_ell(w)
    assert uniform_row_blocks(indptr) <= n * groups
    torch.testing.assert_close(unpack_blocks(indptr, indices, values, tuple(w.shape)), w, rtol=0, atol=0)


def test_nm_pruning_keeps_the_largest_of_each_group():
    w = torch.tensor([[1.0, -4.0, 3.0, 0.5, 2.0, 2.5, -3.0, 0.0]])
    nm_prune_(w, 2, 4)
    assert w.tolist() == [[0.0, -4.0, 3.0, 0.0, 0.0, 2.5, -3.0, 0.0]]
    with pytest.raises(ValueError, match="2:3 needs"):
        nm_prune_(torch.ones(2, 8), 2, 3)


def test_ell_pads_with_zeros_at_a_column_the_row_holds():
    w = torch.tensor([[0.0, 2.0, 0.0, 3.0], [0.0, 0.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0]])
    indptr, indices, values = pack_ell(w)
    assert indptr.tolist() == [0, 2, 4, 6]
    assert indices.tolist() == [1, 3, 0, 0, 0, 0]
    assert values.reshape(-1).tolist() == [2.0, 3.0, 0.0, 0.0, 5.0, 0.0]


def test_uniform_rows_only_when_every_row_matches():
    assert uniform_row_blocks(torch.tensor([0, 3, 6, 9], dtype=torch.int32)) == 3
    assert uniform_row_blocks(torch.tensor([0, 3, 5, 9], dtype=torch.int32)) is None
    assert uniform_row_blocks(torch.tensor([0, 0, 0], dtype=torch.int32)) == 0


def test_blocks_that_do_not_tile_the_weight_are_refused():
    with pytest.raises(ValueError, match=r"\(10, 8\) weight does not split into 4x1 blocks"):
        pack_ell(torch.ones(10, 8), (4, 1))
    with pytest.raises(ValueError, match="does not split into 1x4"):
        unpack_blocks(torch.zeros(2, dtype=torch.int32), torch.zeros(0, dtype=torch.int16),
                      torch.zeros(0, 1, 4), (1, 6))


@settings(max_examples=60, deadline=None, derandomize=True)
@given(n_blocks=st.integers(1, 24), k_blocks=st.integers(1, 24), block=st.sampled_from(BLOCKS),
       kind=st.sampled_from(KINDS), density=st.floats(0.0, 1.0), seed=st.integers(0, 10_000))
def test_packed_arrays_are_torchs_block_sparse_arrays(n_blocks, k_blocks, block, kind, density, seed):
    import warnings

    w = blocked_weight(n_blocks, k_blocks, block, kind, density, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = w.to_sparse_csr() if block == (1, 1) else w.to_sparse_bsr(block)
    indptr, columns, values = pack_blocks(w, block)
    assert indptr.dtype == torch.int32 and columns.dtype == torch.int16
    assert torch.equal(indptr, reference.crow_indices().to(torch.int32))
    assert torch.equal(columns, reference.col_indices().to(torch.int16))
    assert torch.equal(values, reference.values().reshape(-1, *block))
