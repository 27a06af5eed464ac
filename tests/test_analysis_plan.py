import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.fx.experimental.proxy_tensor import make_fx

from sparsecc.planning.cost_model import REFERENCE
from sparsecc.errors import OptionError
from sparsecc.formats import BlockStats, FormatChoice, SparseFormat, SparsePlan, WeightSparsity, WeightUse
from sparsecc.passes.analyze_weights import (analysed_weights, analyze_weights, block_stats, describe_weight, nm_stats,
                                            nonzero_mask, occupied_blocks)
from sparsecc.passes.fold_constants import fold_constants
from sparsecc.passes.plan_formats import choose_format, plan_formats
from sparsecc.settings import Settings


def traced(fn, *inputs):
    """make_fx plus capture's constant folding, so `w.t()` reaches analysis as the folded weight."""
    with torch.no_grad():
        gm = make_fx(fn)(*inputs)
    return fold_constants(gm, Settings())


def sparse_matrix(rows, cols, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    w[torch.rand(rows, cols, generator=g) >= density] = 0
    return w


def only_weight(gm):
    weights = list(analysed_weights(gm).values())
    assert len(weights) == 1
    return weights[0]


@pytest.mark.parametrize("fn, operand, op", [
    (lambda w: (lambda x: x @ w), 1, "aten.mm.default"),  # (in, out) weight on the right
    (lambda w: (lambda x: w @ x), 0, "aten.mm.default"),  # weight on the left
    (lambda w: (lambda x: torch.addmm(torch.ones(w.shape[1]), x, w)), 2, "aten.addmm.default"),  # GPT-2 Conv1D
])
def test_zeros_found_in_either_operand(fn, operand, op):
    w = sparse_matrix(32, 32, 0.2)
    gm = analyze_weights(traced(fn(w), torch.randn(32, 32)), Settings().resolved())
    found = only_weight(gm)
    assert found.nnz == int(torch.count_nonzero(w)) and found.shape == (32, 32)
    assert found.uses == (WeightUse(op, operand, found.uses[0].node, 32),)  # 32 rows of x


def test_bmm_weight_is_analysed_but_kept_dense():
    w = torch.zeros(4, 16, 16)
    w[:, 0, 0] = 1
    gm = analyze_weights(traced(lambda x: torch.bmm(x, w), torch.randn(4, 8, 16)), Settings().resolved())
    found = only_weight(gm)
    assert found.nnz == 4 and found.uses[0].op == "aten.bmm.default"
    choice = choose_format(found, Settings(min_weight_numel=1), REFERENCE)
    assert choice.format is SparseFormat.DENSE and "3-D weight" in choice.reason


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 40), density=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_density_is_exact(rows, cols, density, seed):
    w = sparse_matrix(rows, cols, density, seed)
    gm = analyze_weights(traced(lambda x: x @ w, torch.randn(3, rows)), Settings().resolved())
    found = only_weight(gm)
    assert found.nnz == int((w != 0).sum())
    assert found.density == pytest.approx(found.nnz / (rows * cols))


def weight(density, shape=(1024, 1024), dtype="float32", uses=(("aten.addmm.default", 2),)):
    numel = shape[0] * shape[1]
    return WeightSparsity("w", shape, dtype, int(numel * density), "strided",
                          tuple(WeightUse(op, pos, "n") for op, pos in uses))


@pytest.mark.parametrize("w, fmt, fragment", [
    (weight(0.05), SparseFormat.CSR, "csr predicted at"),
    (weight(0.5), SparseFormat.DENSE, "more than its break-even fraction"),
    (weight(0.05, shape=(64, 64)), SparseFormat.DENSE, "no sparse format predicted faster"),  # overheads win
    (weight(0.0), SparseFormat.CSR, "all zeros"),
    (weight(0.1, dtype="bfloat16"), SparseFormat.DENSE, "dtype bfloat16"),
    (weight(0.1, shape=(8, 8)), SparseFormat.DENSE, "< min_weight_numel"),
    (weight(0.1, uses=(("aten.addmm.default", 2), ("aten.bmm.default", 1))), SparseFormat.DENSE, "aten.bmm"),
])
def test_format_choice_and_reason(w, fmt, fragment):
    choice = choose_format(w, Settings(min_weight_numel=1024), REFERENCE)
    assert choice.format is fmt and fragment in choice.reason


def test_plan_covers_every_analysed_weight():
    w1, w2 = sparse_matrix(512, 768, 0.02), sparse_matrix(768, 512, 0.9)
    gm = analyze_weights(traced(lambda x: (x @ w1) @ w2, torch.randn(64, 512)), Settings().resolved())
    plan = plan_formats(gm, Settings(min_weight_numel=1, cost_model="calibrated"), REFERENCE)
    assert [c.format for c in plan.choices.values()] == [SparseFormat.CSR, SparseFormat.DENSE]
    assert plan.sparse_weights() == [next(iter(plan.choices))]


names = st.text("abcdefgh._0123456789", min_size=1, max_size=12)


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(names, st.tuples(st.integers(1, 4096), st.integers(1, 4096), st.floats(0, 1),
                                        st.sampled_from(list(SparseFormat)), st.text(max_size=30)), max_size=6))
def test_plan_json_round_trip(entries):
    weights, choices = {}, {}
    for key, (r, c, density, fmt, reason) in entries.items():
        weights[key] = WeightSparsity(key, (r, c), "float32", int(r * c * density), "strided",
                                      (WeightUse("aten.mm.default", 1, "mm"),))
        choices[key] = FormatChoice(fmt, None, density, reason)
    plan = SparsePlan(choices=choices, weights=weights)
    text = plan.to_json()
    assert SparsePlan.from_json(text) == plan
    assert json.loads(text)["version"] == 3


def block_pruned(n, k, block, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    r, c = block
    occupied = torch.rand(n // r, k // c, generator=g) < density
    return torch.randn(n, k, generator=g) * occupied.repeat_interleave(r, 0).repeat_interleave(c, 1)


# A weight pruned in big blocks is also perfectly filled in the smaller blocks that tile them; the plan takes
# whichever of those the cost model predicts fastest, never a shape that would store zeros inside blocks.
@pytest.mark.parametrize("block", [(4, 1), (8, 1), (4, 4), (8, 8), (16, 1)])
def test_block_structure_is_detected_and_chosen(block):
    w = block_pruned(128, 256, block, 0.1)
    stats = {(b.rows, b.cols): b for b in block_stats(w)}
    occupied = int((w.reshape(128 // block[0], block[0], 256 // block[1], block[1]) != 0).any(3).any(1).sum())
    assert stats[block].blocks == occupied
    ws = WeightSparsity("w", (128, 256), "float32", int((w != 0).sum()), "strided",
                        (WeightUse("aten.mm.default", 0, "mm"),), tuple(stats.values()))
    assert ws.block_fill(*block) == pytest.approx(1.0)
    choice = choose_format(ws, Settings(), REFERENCE)
    assert choice.format is SparseFormat.BSR and "bsr" in choice.reason
    assert ws.block_fill(*choice.block) == pytest.approx(1.0)
    assert choice.predictions[f"bsr{choice.block[0]}x{choice.block[1]}"] < choice.predictions["csr"]


def test_blocks_measured_in_out_by_in_orientation():
    w = block_pruned(64, 32, (16, 1), 0.2)  # (out, in) with 16 x 1 blocks
    # used as W^T on the right
    gm = analyze_weights(traced(lambda x: x @ w.t(), torch.randn(3, 32)), Settings().resolved())
    found = only_weight(gm)
    assert found.block_fill(16, 1) == pytest.approx(1.0)


def test_unstructured_weight_prefers_csr():
    w = sparse_matrix(512, 512, 0.08)
    ws = WeightSparsity("w", (512, 512), "float32", int((w != 0).sum()), "strided",
                        (WeightUse("aten.mm.default", 0, "mm"),), block_stats(w))
    assert choose_format(ws, Settings(), REFERENCE).format is SparseFormat.CSR


def n_of_m(rows, cols, n, m, seed=0):
    """A weight where each group of m consecutive inputs keeps its n largest entries."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    groups = w.reshape(rows, cols // m, m)
    keep = groups.abs().topk(n, dim=2).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, keep, True)
    return (groups * mask).reshape(rows, cols)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 3), rows=st.integers(1, 16), groups=st.integers(1, 16), seed=st.integers(0, 1000))
def test_n_of_4_structure_is_detected(n, rows, groups, seed):
    w = n_of_m(rows, groups * 8, n, 4, seed)
    stats = dict((m, k) for k, m in nm_stats(w))
    assert stats[4] == n and stats[8] <= 2 * n


@pytest.mark.parametrize("n, m, fmt, label", [(2, 4, SparseFormat.DENSE, "2:4"), (1, 4, SparseFormat.CSR, "1:4"),
                                              (1, 8, SparseFormat.CSR, "1:8")])
def test_nm_weights_are_labelled_and_planned_by_density(n, m, fmt, label):
    w = n_of_m(512, 1024, n, m)
    ws = WeightSparsity("w", (512, 1024), "float32", int((w != 0).sum()), "strided",
                        (WeightUse("aten.mm.default", 0, "mm"),), block_stats(w), nm_stats(w))
    assert ws.nm_label() == label
    choice = choose_format(ws, Settings(), REFERENCE)
    assert choice.format is fmt and f"{label} structured" in choice.reason
    assert SparsePlan.from_json(SparsePlan({"w": choice}, {"w": ws}).to_json()).weights["w"].nm_label() == label


def test_dense_enough_groups_get_no_nm_label():
    w = n_of_m(64, 64, 3, 4)  # 3:4 is less than half sparse: not worth a label
    ws = WeightSparsity("w", (64, 64), "float32", int((w != 0).sum()), "strided", (), (), nm_stats(w))
    assert ws.nm_label() is None


def _weight_with_blocks(density_csr: float, stored_8x1: float) -> WeightSparsity:
    total = (768 // 8) * 768
    return WeightSparsity(name="w", shape=(768, 768), dtype="float32", nnz=int(density_csr * 768 * 768),
                          source_layout="strided", uses=(), blocks=(BlockStats(8, 1, int(stored_8x1 * total), total),))


def test_formats_option_restricts_and_forces():
    w = _weight_with_blocks(0.1, 0.2)
    free = choose_format(w, Settings(), REFERENCE)
    assert free.format is not SparseFormat.DENSE and free.predictions["csr"] < free.predictions["dense"]
    only_csr = choose_format(w, Settings.from_options({"formats": ["dense", "csr"]}), REFERENCE)
    assert only_csr.format is SparseFormat.CSR and set(only_csr.predictions) == {"dense", "csr"}
    only_blocks = choose_format(w, Settings.from_options({"formats": ["dense", "bsr8x1"]}), REFERENCE)
    assert (only_blocks.format, only_blocks.block) == (SparseFormat.BSR, (8, 1))
    assert choose_format(w, Settings.from_options({"formats": ["dense"]}), REFERENCE).format is SparseFormat.DENSE
    # Without "dense" in the list a sparse format is forced even where it is predicted slower than dense.
    dense_ish = _weight_with_blocks(0.6, 0.9)
    assert choose_format(dense_ish, Settings(), REFERENCE).format is SparseFormat.DENSE
    forced = choose_format(dense_ish, Settings.from_options({"formats": ["csr"]}), REFERENCE)
    assert forced.format is SparseFormat.CSR and "forced" in forced.reason


def test_min_gain_keeps_small_gains_dense():
    w = _weight_with_blocks(0.24, 1.0)
    chosen = choose_format(w, Settings(), REFERENCE)
    assert chosen.format is SparseFormat.CSR
    gain = 1 / chosen.est_cost
    kept = choose_format(w, Settings.from_options({"min_gain": gain * 1.1}), REFERENCE)
    assert kept.format is SparseFormat.DENSE and f"{gain * 1.1:.2f}x faster" in kept.reason
    assert choose_format(w, Settings.from_options({"min_gain": gain * 0.9}), REFERENCE).format is SparseFormat.CSR


def test_formats_and_min_gain_options_are_checked():
    with pytest.raises(OptionError, match="'coo' is not one of dense, csr, ell, bsr"):
        Settings.from_options({"formats": ["coo"]})
    with pytest.raises(OptionError, match="min_gain"):
        Settings.from_options({"min_gain": 0})
    assert Settings.from_options({"formats": "csr"}).formats == ("csr",)


def _rows_holding(counts: list[int], k: int) -> torch.Tensor:
    """A (len(counts), k) weight whose row i holds counts[i] non-zeros at random columns."""
    g = torch.Generator().manual_seed(0)
    keep = torch.rand(len(counts), k, generator=g).argsort(dim=1) < torch.tensor(counts).unsqueeze(1)
    return torch.randn(len(counts), k, generator=g) * keep


def test_ell_is_offered_where_padding_rows_costs_little():
    use = (WeightUse("aten.addmm.default", 2, "addmm", 128),)
    even = describe_weight("w", _rows_holding([50, 52] * 256, 512), False, use, "strided", 2)
    assert (even.row_max, even.ell_stored) == (52, 52 * 512)
    assert "ell" in choose_format(even, Settings(), REFERENCE).predictions
    uneven = describe_weight("w", _rows_holding([20, 80] * 256, 512), False, use, "strided", 2)
    assert "ell" not in choose_format(uneven, Settings(), REFERENCE).predictions  # would store 1.6x the non-zeros
    # Rows already of one length are ELL as CSR: nothing to pad, no second candidate.
    same = describe_weight("w", _rows_holding([51] * 512, 512), False, use, "strided", 2)
    assert "ell" not in choose_format(same, Settings(), REFERENCE).predictions

    forced = choose_format(uneven, Settings.from_options({"formats": ["ell"]}), REFERENCE)
    assert (forced.format, forced.block, forced.candidate) == (SparseFormat.ELL, None, "ell")
    assert "ell forced" in forced.reason
    asked = []

    def measure(names):  # the constant row length measured faster than CSR
        asked.append(names)
        return {name: {"dense": 1e-3, "csr": 3e-4, "ell": 2.8e-4}.get(name, 6e-4) for name in names}

    measured = choose_format(even, Settings(cost_model="measured"), REFERENCE, measure)
    assert "ell" in asked[0] and measured.format is SparseFormat.ELL and "ell measured at 0.28x" in measured.reason


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.sampled_from([1, 2, 4, 8, 16]), st.sampled_from([1, 2, 3, 4, 8]), st.integers(1, 6), st.integers(1, 6),
       st.floats(0.0, 1.0), st.booleans(), st.integers(0, 2**16))
def test_block_and_nm_statistics_match_a_loop_over_the_blocks(r, c, rows, cols, density, transposed, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows * r, cols * c, generator=g) * (torch.rand(rows * r, cols * c, generator=g) < density)
    matrix = w.t().contiguous().t() if transposed else w  # a transposed view, as a right operand arrives
    occupied = occupied_blocks(nonzero_mask(matrix), r, c)
    expected = [[bool((w[i * r:(i + 1) * r, j * c:(j + 1) * c] != 0).any()) for j in range(cols)] for i in range(rows)]
    assert occupied.tolist() == expected
    for most, m in nm_stats(matrix):
        groups = [int((w[i, j:j + m] != 0).sum()) for i in range(w.shape[0]) for j in range(0, w.shape[1], m)]
        assert most == max(groups)
