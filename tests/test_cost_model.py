import dataclasses
import json
import logging

import pytest
import torch

from sparsecc.codegen.targets import host_target
from sparsecc.formats import SparseFormat, SparsePlan
from sparsecc.passes.plan_formats import choose_format
from sparsecc.planning import calibration
from sparsecc.planning.calibration import fit_sparse, machine_key, machine_model
from sparsecc.planning.cost_model import REFERENCE, MachineModel, predict_dense, predict_sparse
from sparsecc.planning.plan_quality import Layer, make_weight, weight_sparsity
from sparsecc.settings import Settings


def test_predictions_grow_with_work():
    m = REFERENCE
    assert predict_dense(m, 1024, 1024, 128) > predict_dense(m, 1024, 1024, 8) > predict_dense(m, 256, 256, 8)
    few, many = (predict_sparse(m, 1024, 1024, 128, (1, 1), nnz) for nnz in (10_000, 100_000))
    assert many > few
    # 96 tokens are 3 tiles, which 2 threads cannot split: rows are split, and skewed rows make one thread late.
    even_rows = predict_sparse(m, 1024, 1024, 96, (1, 1), 100_000)
    assert predict_sparse(m, 1024, 1024, 96, (1, 1), 100_000, imbalance=1.8) > even_rows
    # 128 tokens are 4 tiles: each thread runs every row over two of them, so skew costs nothing extra.
    assert predict_sparse(m, 1024, 1024, 128, (1, 1), 100_000, imbalance=1.8) == many
    assert predict_sparse(m, 1024, 1024, 128, (3, 3), 100) is None  # no figures for that block shape


def test_machine_model_json_round_trip():
    assert MachineModel.from_json(REFERENCE.to_json()) == REFERENCE
    with pytest.raises(ValueError, match="version"):
        MachineModel.from_json(json.dumps({**json.loads(REFERENCE.to_json()), "version": 0}))


def test_fit_recovers_the_coefficients_it_was_generated_with():
    truth = dataclasses.replace(REFERENCE, launch=4e-6, transpose=2e-10, output=1e-9, spill=3e-10)
    samples = [(n, k, t, b, int((n // b[0]) * (k // b[1]) * d), 0.0)
               for b in calibration.BLOCKS for n, k, t in calibration.LAYERS for d in calibration.DENSITIES]
    samples = [(n, k, t, b, s, predict_sparse(truth, n, k, t, b, s)) for n, k, t, b, s, _ in samples]
    fitted = fit_sparse(REFERENCE, samples)
    for n, k, t, b, s, seconds in samples:
        assert predict_sparse(fitted, n, k, t, b, s) == pytest.approx(seconds, rel=1e-3)


def test_plan_records_every_candidate_and_why(reference_machine):
    w = weight_sparsity(make_weight(Layer(1024, 1024, 128, 0.97, "random")), 128, 2)
    choice = choose_format(w, Settings(), reference_machine)
    assert choice.format is SparseFormat.CSR
    assert {"dense", "csr", "bsr8x1", "bsr4x4"} <= set(choice.predictions)
    assert choice.predictions["csr"] < choice.predictions["dense"]
    assert "csr predicted at" in choice.reason and "dense" in choice.reason and "128 tokens" in choice.reason
    plan = SparsePlan({"w": choice}, {"w": w}, machine=reference_machine.description)
    again = SparsePlan.from_json(plan.to_json())
    assert again == plan and again.choices["w"].predictions == choice.predictions


def test_dense_weight_stays_dense(reference_machine):
    w = weight_sparsity(make_weight(Layer(768, 768, 128, 0.2, "random")), 128, 2)
    choice = choose_format(w, Settings(), reference_machine)
    assert choice.format is SparseFormat.DENSE and "dense" in choice.reason and "csr" in choice.predictions


def test_block_structure_picks_a_block_format(reference_machine):
    w = weight_sparsity(make_weight(Layer(768, 768, 128, 0.9, "8x1")), 128, 2)
    choice = choose_format(w, Settings(), reference_machine)
    assert choice.format is SparseFormat.BSR and choice.predictions[f"bsr{choice.block[0]}x{choice.block[1]}"] < \
        choice.predictions["csr"]


def test_threads_share_non_zeros_not_rows():
    even = weight_sparsity(make_weight(Layer(512, 512, 1, 0.9, "random")), 1, 2)
    # Rows fall from 2x the mean density to 0: split by rows, the first thread would hold about 3/4 of them.
    skewed = weight_sparsity(make_weight(Layer(512, 512, 1, 0.9, "skewed")), 1, 2)
    assert even.imbalance == pytest.approx(1.0, abs=0.05)
    assert skewed.imbalance == pytest.approx(1.0, abs=0.05)
    lone_row = torch.zeros(64, 8192)
    lone_row[3] = 1.0  # one row cannot be split: its thread has nearly everything
    assert weight_sparsity(lone_row, 1, 2).imbalance > 1.8


def test_calibrated_option_reaches_the_plan(reference_machine, monkeypatch):
    from sparsecc.planning.target_pricing import pricing_for

    monkeypatch.setattr(calibration, "machine_model", lambda settings: reference_machine)
    w = weight_sparsity(make_weight(Layer(1024, 1024, 128, 0.97, "random")), 128, 2)
    assert pricing_for(Settings(cost_model="break-even").resolved()).machine is None
    assert choose_format(w, Settings(cost_model="break-even")).predictions == {}  # break-even rule: no predictions
    pricing = pricing_for(Settings(cost_model="calibrated").resolved())
    assert pricing.timer is None  # predictions only: nothing is timed
    calibrated = choose_format(w, Settings(cost_model="calibrated"), pricing.machine)
    assert "dense" in calibrated.predictions and "csr" in calibrated.predictions
    with pytest.raises(ValueError, match="machine model"):
        choose_format(w, Settings(cost_model="calibrated"))


def test_a_target_that_cannot_run_here_uses_the_reference_figures():
    assert machine_model(Settings(target="aarch64").resolved()) is REFERENCE


def test_calibration_is_read_from_the_cache(tmp_path, monkeypatch):
    settings = Settings(cache_dir=str(tmp_path)).resolved()
    target = host_target(torch.get_num_threads())
    path = tmp_path / "machines" / f"{machine_key(str(target), torch.get_num_threads())}.json"
    path.parent.mkdir()
    stored = dataclasses.replace(REFERENCE, description="stored", calibrated=True)
    path.write_text(stored.to_json())
    monkeypatch.setattr(calibration, "_memo", {})
    monkeypatch.setattr(calibration, "calibrate", lambda *a, **k: pytest.fail("calibrated again"))
    assert machine_model(settings) == stored


def test_unreadable_calibration_is_measured_again(tmp_path, monkeypatch, caplog):
    settings = Settings(cache_dir=str(tmp_path)).resolved()
    target = host_target(torch.get_num_threads())
    path = tmp_path / "machines" / f"{machine_key(str(target), torch.get_num_threads())}.json"
    path.parent.mkdir()
    path.write_text("{not json")
    fresh = dataclasses.replace(REFERENCE, description="fresh", calibrated=True)
    monkeypatch.setattr(calibration, "_memo", {})
    monkeypatch.setattr(calibration, "calibrate", lambda *a, **k: fresh)
    with caplog.at_level(logging.WARNING, logger="sparsecc.planning.calibration"):
        assert machine_model(settings) == fresh
    assert "unreadable calibration" in caplog.text
    assert MachineModel.from_json(path.read_text()) == fresh


# ------------------------------------------------------------------------------------ measured planning


def test_finalists_always_include_dense_and_the_close_ones():
    from sparsecc.planning.pricing import MAX_FINALISTS, finalists

    predicted = {"dense": 100.0, "csr": 40.0, "bsr8x1": 30.0, "bsr16x1": 59.0, "bsr4x4": 61.0, "bsr1x4": 35.0}
    chosen = finalists(predicted)
    assert chosen[0] == "dense" and chosen[1:] == ["bsr8x1", "bsr1x4", "csr"][:MAX_FINALISTS]
    assert "bsr4x4" not in chosen  # predicted more than twice the best
    assert finalists({"dense": 5.0}) == ["dense"]


def test_measured_times_decide_over_predictions(reference_machine):
    w = weight_sparsity(make_weight(Layer(1024, 1024, 128, 0.97, "random")), 128, 2)
    predicted = choose_format(w, Settings(cost_model="calibrated"), reference_machine)
    assert predicted.candidate == "csr"
    asked = []

    def measure(names):  # a machine where CSR is slow and 8x1 blocks are fast
        asked.append(names)
        return {name: {"dense": 1e-3, "csr": 2e-3}.get(name, 4e-4) for name in names}

    choice = choose_format(w, Settings(cost_model="measured"), reference_machine, measure)
    assert asked and asked[0][0] == "dense" and "csr" in asked[0]
    assert choice.format is SparseFormat.BSR and choice.est_cost == pytest.approx(0.4)
    assert choice.measured["dense"] == 1000 and "measured at 0.40x dense" in choice.reason
    again = SparsePlan.from_json(SparsePlan({"w": choice}, {"w": w}).to_json())
    assert again.choices["w"].measured == choice.measured

    slow = choose_format(w, Settings(cost_model="measured"), reference_machine,
                         lambda names: {name: 1e-3 if name == "dense" else 2e-3 for name in names})
    assert slow.format is SparseFormat.DENSE and "no sparse format measured 1.05x faster than dense" in slow.reason
    # Near a tie dense wins: a sparse kernel measured 3 % faster is within its timings' scatter.
    tie = choose_format(w, Settings(cost_model="measured"), reference_machine,
                        lambda names: {name: 1e-3 if name == "dense" else 0.97e-3 for name in names})
    assert tie.format is SparseFormat.DENSE and tie.measured["csr"] == 970


@pytest.mark.slow  # needs this machine's calibration (measured once per session, about a minute)
def test_measured_plan_on_a_model_is_kept_in_the_tuning_database(calibrated_cache_dir, monkeypatch, no_fallback):
    from conftest import CompileWatch, compile_sparsecc

    from sparsecc.planning import candidate_timing
    from sparsecc.sparsify import prune_linears_
    from sparsecc.tolerances import TOLERANCES

    torch.manual_seed(0)
    model = prune_linears_(torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(),
                                               torch.nn.Linear(512, 256)), 0.95).eval()
    x = torch.randn(64, 256)
    # The default planner, as users get it: cost_model="measured".
    options = dict(cost_model="measured", cache_dir=str(calibrated_cache_dir), min_weight_numel=1)
    with torch.no_grad(), CompileWatch() as watch:
        torch.testing.assert_close(compile_sparsecc(model, **options)(x), model(x), **TOLERANCES[torch.float32])
    plan = watch.graphs[0].state.plan
    assert all(c.measured and "dense" in c.measured for c in plan.choices.values())
    # 95 % zeros at 64 tokens: a sparse kernel measures faster than PyTorch's GEMM here, and it is what ran.
    assert watch.sparse_ops == 2 and all(c.est_cost < 1 for c in plan.choices.values())

    def no_timing(*args, **kwargs):
        raise AssertionError("timed again instead of reading the tuning database")

    monkeypatch.setattr(candidate_timing.CandidateTimer, "_measure", no_timing)
    torch._dynamo.reset()
    with torch.no_grad(), CompileWatch() as again:
        torch.testing.assert_close(compile_sparsecc(model, **options)(x), model(x), **TOLERANCES[torch.float32])
    assert again.graphs[0].state.plan.choices.keys() == plan.choices.keys()
    assert [c.candidate for c in again.graphs[0].state.plan.choices.values()] == \
        [c.candidate for c in plan.choices.values()]


def test_failed_timing_falls_back_to_predictions(reference_machine):
    w = weight_sparsity(make_weight(Layer(1024, 1024, 128, 0.97, "random")), 128, 2)
    choice = choose_format(w, Settings(cost_model="measured"), reference_machine, lambda names: None)
    predicted = choose_format(w, Settings(cost_model="calibrated"), reference_machine)
    assert choice == predicted and not choice.measured and "predicted at" in choice.reason


def test_like_pruned_weights_share_a_timing_and_others_do_not(tmp_path, monkeypatch):
    from sparsecc.planning.candidate_timing import CandidateTimer

    timed = []
    monkeypatch.setattr(CandidateTimer, "_measure", lambda self, m, t, name: timed.append(name) or 1e-3)
    timer = CandidateTimer(Settings(cache_dir=str(tmp_path)), host_target(2), 2)
    first, second = (make_weight(Layer(768, 768, 128, 0.9, "random"), seed=s) for s in (1, 2))
    assert not torch.equal(first != 0, second != 0)
    timer.seconds(first, [128], ["dense", "csr", "bsr8x1"])
    count = len(timed)
    assert count >= 3
    timer.seconds(second, [128], ["dense", "csr", "bsr8x1"])  # another mask, the same work: read back
    assert len(timed) == count and timer.reused == 3
    timer.seconds(make_weight(Layer(768, 768, 128, 0.8, "random"), seed=3), [128], ["dense", "csr"])
    assert timed[count:].count("csr") >= 1 and "dense" not in timed[count:]  # twice the blocks: timed again


@pytest.mark.parametrize("right", [False, True])
def test_work_signature_from_analysis_equals_counting_again(right):
    from sparsecc.passes.analyze_weights import describe_weight
    from sparsecc.planning.candidate_timing import work_signature

    g = torch.Generator().manual_seed(3)
    w = torch.randn(96, 64, generator=g) * (torch.rand(96, 64, generator=g) < 0.2)
    w[5] = 0  # an empty row
    analysed = describe_weight("w", w.t().contiguous() if right else w, right, (), "strided", 2)
    for name in ("csr", "ell", "bsr4x1", "bsr1x4", "bsr8x8", "bsr16x1", "bsr2x2"):
        assert work_signature(w, name, 2, analysed) == work_signature(w, name, 2), name
