import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.fx.experimental.proxy_tensor import make_fx

from sparsecc.formats import FormatChoice, SparseFormat, SparsePlan, WeightSparsity, WeightUse
from sparsecc.passes.analyze_weights import analysed_weights, analyze_weights
from sparsecc.passes.plan_formats import choose_format, plan_formats
from sparsecc.settings import Settings


def traced(fn, *inputs):
    with torch.no_grad():
        return make_fx(fn)(*inputs)


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
    gm = analyze_weights(traced(fn(w), torch.randn(32, 32)), Settings())
    found = only_weight(gm)
    assert found.nnz == int(torch.count_nonzero(w)) and found.shape == (32, 32)
    assert found.uses == (WeightUse(op, operand, found.uses[0].node),)


def test_bmm_weight_is_analysed_but_kept_dense():
    w = torch.zeros(4, 16, 16)
    w[:, 0, 0] = 1
    gm = analyze_weights(traced(lambda x: torch.bmm(x, w), torch.randn(4, 8, 16)), Settings())
    found = only_weight(gm)
    assert found.nnz == 4 and found.uses[0].op == "aten.bmm.default"
    choice = choose_format(found, Settings(min_weight_numel=1))
    assert choice.format is SparseFormat.DENSE and "3-D weight" in choice.reason


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 40), density=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_density_is_exact(rows, cols, density, seed):
    w = sparse_matrix(rows, cols, density, seed)
    gm = analyze_weights(traced(lambda x: x @ w, torch.randn(3, rows)), Settings())
    found = only_weight(gm)
    assert found.nnz == int((w != 0).sum())
    assert found.density == pytest.approx(found.nnz / (rows * cols))


def weight(density, shape=(64, 64), dtype="float32", uses=(("aten.addmm.default", 2),)):
    numel = shape[0] * shape[1]
    return WeightSparsity("w", shape, dtype, int(numel * density), "strided",
                          tuple(WeightUse(op, pos, "n") for op, pos in uses))


@pytest.mark.parametrize("w, fmt, fragment", [
    (weight(0.1), SparseFormat.CSR, "<= csr_max_density"),
    (weight(0.5), SparseFormat.DENSE, "> csr_max_density"),
    (weight(0.0), SparseFormat.CSR, "all zeros"),
    (weight(0.1, dtype="bfloat16"), SparseFormat.DENSE, "dtype bfloat16"),
    (weight(0.1, shape=(8, 8)), SparseFormat.DENSE, "< min_weight_numel"),
    (weight(0.1, uses=(("aten.addmm.default", 2), ("aten.bmm.default", 1))), SparseFormat.DENSE, "aten.bmm"),
])
def test_format_choice_and_reason(w, fmt, fragment):
    choice = choose_format(w, Settings(min_weight_numel=1024))
    assert choice.format is fmt and fragment in choice.reason


def test_plan_covers_every_analysed_weight():
    w1, w2 = sparse_matrix(64, 96, 0.05), sparse_matrix(96, 64, 0.9)
    gm = analyze_weights(traced(lambda x: (x @ w1) @ w2, torch.randn(2, 64)), Settings())
    plan = plan_formats(gm, Settings(min_weight_numel=1))
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
    assert json.loads(text)["version"] == 1
