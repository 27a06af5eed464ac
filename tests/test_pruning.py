"""The `prune` option: methods, patterns, the budget allocator, calibration inputs, and pruned models through
torch.compile, export and the CLI, each compared with eager PyTorch on the pruned weights."""

import warnings

import pytest
import torch

import sparsecc
from conftest import TEST_OPTIONS, CompileWatch, compile_sparsecc
from sparsecc.pruning.allocation import Curve, first_reaching, greedy_sequence, last_within, sparsity_of
from sparsecc.pruning.methods import prune_matrix, relative_error
from sparsecc.pruning.patterns import Pattern
from sparsecc.tolerances import TOLERANCES

FP32 = TOLERANCES[torch.float32]


def correlated_rows(rows: int, features: int, seed: int = 0) -> torch.Tensor:
    """Inputs whose features are correlated and unequal in scale, as real activations are (what the
    activation-aware methods exploit)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(features // 4, features, generator=g)
    scale = torch.linspace(0.2, 3.0, features)
    mixed = torch.randn(rows, features // 4, generator=g) @ basis
    return (mixed + 0.3 * torch.randn(rows, features, generator=g)) * scale


class MLP(torch.nn.Module):
    def __init__(self, width=128, hidden=256):
        super().__init__()
        self.up = torch.nn.Linear(width, hidden)
        self.down = torch.nn.Linear(hidden, width)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


def batches(count=4, rows=64, features=128):
    return [correlated_rows(rows, features, seed=i) for i in range(count)]


def compiled_state(model, x, **prune):
    """Compile `model` with the prune option, run it once; (output, the graph's state). Through sparsecc.compile:
    torch.compile compares the options of two compiles of one model, which fails on lists of tensors."""
    watch = CompileWatch()
    with watch.__enter__():
        compiled = sparsecc.compile(model, options={**TEST_OPTIONS, "prune": prune, "min_weight_numel": 1})
        with torch.no_grad():
            out = compiled(x)
    return out, watch.graphs[0].state


# ------------------------------------------------------------------------------------------------ methods, patterns

@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("sparsity", [0.5, 0.8])
def test_methods_reach_the_sparsity_asked(method, sparsity):
    w = torch.randn(96, 128)
    x = correlated_rows(512, 128)
    pruned = prune_matrix(method, w, (x.T @ x).double(), sparsity, Pattern.parse("unstructured"))
    assert float((pruned == 0).float().mean()) == pytest.approx(sparsity, abs=0.01)
    assert torch.equal(w, w.clone())  # the input matrix is not modified
    assert (w != pruned).any()


def test_second_order_beats_wanda_beats_magnitude_on_correlated_inputs():
    w = torch.randn(96, 128)
    x = correlated_rows(1024, 128)
    gram = (x.T @ x).double()
    errors = {m: relative_error(w, prune_matrix(m, w, gram, 0.6, Pattern.parse("unstructured")), gram)
              for m in ("magnitude", "wanda", "sparsegpt")}
    assert errors["sparsegpt"] < 0.8 * errors["wanda"] and errors["wanda"] < errors["magnitude"], errors


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("text", ["2:4", "4:8"])
def test_n_m_pattern_keeps_n_of_every_m(method, text):
    pattern = Pattern.parse(text)
    w = torch.randn(64, 128)
    x = correlated_rows(256, 128)
    pruned = prune_matrix(method, w, (x.T @ x).double(), 0.0, pattern)
    per_group = (pruned != 0).reshape(64, 128 // pattern.m, pattern.m).sum(dim=2)
    assert int(per_group.max()) <= pattern.n and float((pruned == 0).float().mean()) == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_block_pattern_removes_whole_blocks(method):
    w = torch.randn(64, 128)
    x = correlated_rows(256, 128)
    pruned = prune_matrix(method, w, (x.T @ x).double(), 0.75, Pattern.parse("16x1"))
    blocks = (pruned != 0).reshape(4, 16, 128, 1)
    filled = blocks.sum(dim=(1, 3))
    assert bool(((filled == 0) | (filled == 16)).all())  # each 16x1 block is all zero or all kept
    assert float((filled == 0).float().mean()) == pytest.approx(0.75, abs=0.01)


@pytest.mark.parametrize("text", ["3:2", "0:4", "1x1", "diagonal", "4:4"])
def test_bad_pattern_is_an_option_error(text):
    with pytest.raises(sparsecc.OptionError, match="pattern"):
        sparsecc.Settings.from_options({"prune": {"pattern": text, "target_sparsity": 0.5}})


@pytest.mark.parametrize("prune, match", [
    ({}, "exactly one budget"),
    ({"target_sparsity": 0.5, "max_error": 0.1}, "not both"),
    ({"target_sparsity": 1.5}, "between 0 and 1"),
    ({"max_error": -1}, "> 0"),
    ({"target_sparsity": 0.5, "method": "optimal"}, "method"),
    ({"target_sparsity": 0.5, "metrc": "cosine"}, "Did you mean 'metric'"),
    ({"target_sparsity": 0.5, "include": 3}, "include"),
    ("0.5", "must be a dict"),
])
def test_bad_prune_option_is_an_option_error(prune, match):
    with pytest.raises(sparsecc.OptionError, match=match):
        sparsecc.Settings.from_options({"prune": prune})


# ---------------------------------------------------------------------------------------------------- allocation

def test_allocator_prunes_the_less_sensitive_layer_further():
    levels = (0.0, 0.25, 0.5, 0.75)
    robust = Curve(levels, (0.0, 0.001, 0.002, 0.004), tuple(lv * 100 for lv in levels), 100)
    fragile = Curve(levels, (0.0, 0.01, 0.05, 0.3), tuple(lv * 100 for lv in levels), 100)
    sequence = greedy_sequence([robust, fragile])
    allocation = first_reaching([robust, fragile], sequence, 0.5)
    assert allocation == (3, 1)  # 75 % and 25 %: half of all weights, the fragile layer spared
    assert sparsity_of([robust, fragile], allocation) == pytest.approx(0.5)


def test_allocator_jumps_to_where_a_layer_first_gains_speed():
    levels = (0.0, 0.3, 0.6, 0.9)
    # No gain before 60 % (below the sparse kernel's break-even): a single step would never start this layer.
    late = Curve(levels, (0.0, 0.01, 0.02, 0.04), (0.0, 0.0, 5.0, 9.0), 100)
    sequence = greedy_sequence([late])
    assert sequence == [(0,), (2,), (3,)]


def test_last_within_finds_the_largest_allocation_within_budget():
    errors = [0.0, 0.001, 0.003, 0.004, 0.02, 0.05, 0.2]
    index, measured = last_within(len(errors), lambda i: errors[i], 0.01)
    assert index == 3 and len(measured) < len(errors)


# ---------------------------------------------------------------------------------------------- through the compiler

def test_target_sparsity_through_torch_compile_matches_pruned_eager(no_fallback):
    model = MLP().eval()
    x = correlated_rows(64, 128, seed=9)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out, state = compiled_state(model, x, target_sparsity=0.9, calibration=batches())
    report = state.pruning
    assert report.sparsity == pytest.approx(0.9, abs=0.01) and len(report.layers) == 2
    # The user's module keeps its weights; the compiled graph runs the pruned ones, sparse.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert state.sparse_ops == 2
    with torch.no_grad():
        torch.testing.assert_close(out, state.reference(x)[0], **FP32)
        # The pruned weights, put into a copy of the eager model, give the same answer.
        pruned = MLP().eval()
        pruned.load_state_dict(model.state_dict())
        constants = {layer.name: layer for layer in report.layers}
        assert set(constants) == {"up.weight", "down.weight"}
        gm = state.reference
        for node in gm.graph.nodes:
            origin = node.meta.get("sparsecc_origin")
            if node.op == "get_attr" and origin in constants:
                value = getattr(gm, node.target)
                param = dict(pruned.named_parameters())[origin]
                param.copy_(value if value.shape == param.shape else value.t())
        torch.testing.assert_close(out, pruned(x), **FP32)


def test_inplace_writes_the_pruned_weights_into_the_model(no_fallback):
    model = MLP().eval()
    x = correlated_rows(64, 128, seed=9)
    out, state = compiled_state(model, x, target_sparsity=0.8, calibration=batches(), inplace=True)
    assert float((model.up.weight == 0).float().mean()) == pytest.approx(state.pruning.layers[0].density_before -
                                                                          state.pruning.layers[0].density, abs=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), **FP32)


def test_max_error_budget_is_kept_on_the_calibration_set(no_fallback):
    model = MLP().eval()
    calibration = batches()
    out, state = compiled_state(model, calibration[0], max_error=0.05, calibration=calibration,
                                metric="relative_l2")
    report = state.pruning
    assert 0 < report.model_error <= 0.05 and report.sparsity > 0.1
    # What the report says the error is, measured again here on the eager model with the pruned graph.
    with torch.no_grad():
        eager = [model(b) for b in calibration]
        pruned = [state.reference(b)[0] for b in calibration]
    diff = sum(float((p - e).square().sum()) for p, e in zip(pruned, eager))
    norm = sum(float(e.square().sum()) for e in eager)
    assert (diff / norm) ** 0.5 == pytest.approx(report.model_error, rel=1e-3)
    torch.testing.assert_close(out, pruned[0], **FP32)


def test_sensitivity_allocation_beats_uniform_when_layers_differ():
    class Uneven(torch.nn.Module):
        """The second layer's inputs are ten times larger than the first's: its weights matter more."""

        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(128, 128)
            self.b = torch.nn.Linear(128, 128)
            self.c = torch.nn.Linear(128, 128)

        def forward(self, x):
            return self.c(torch.relu(self.b(10 * torch.relu(self.a(x))))) + self.a(x)

    model = Uneven().eval()
    errors = {}
    for allocation in ("sensitivity", "uniform"):
        _, state = compiled_state(model, batches()[0], target_sparsity=0.6, calibration=batches(),
                                  method="wanda", allocation=allocation)
        errors[allocation] = state.pruning.model_error
        assert state.pruning.sparsity == pytest.approx(0.6, abs=0.02)
    assert errors["sensitivity"] < errors["uniform"], errors


def test_two_four_on_a_small_bert(no_fallback):
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                 vocab_size=120, max_position_embeddings=64)).eval()
    ids = torch.randint(0, 120, (2, 16))
    calibration = [torch.randint(0, 120, (2, 16)) for _ in range(3)]
    out, state = compiled_state(model, ids, pattern="2:4", calibration=calibration, include=["encoder.*"])
    report = state.pruning
    assert len(report.layers) == 12 and all(layer.density == pytest.approx(0.5) for layer in report.layers)
    assert any(name == "pooler.dense.weight" for name, _ in report.skipped)
    for layer in report.layers:
        assert state.plan.weights[next(k for k, w in state.plan.weights.items() if w.name == layer.name)].nm_label() \
            == "2:4"
    with torch.no_grad():
        expected = state.reference(ids)
    torch.testing.assert_close(out.last_hidden_state, expected[0], **FP32)


def test_without_the_option_nothing_is_pruned(no_fallback):
    model = MLP().eval()
    x = correlated_rows(64, 128)
    compiled = compile_sparsecc(model, min_weight_numel=1)
    watch = CompileWatch()
    with watch.__enter__(), torch.no_grad():
        out = compiled(x)
    state = watch.graphs[0].state
    assert state.pruning is None and state.reference is None and state.sparse_ops == 0
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), **FP32)


# ------------------------------------------------------------------------------------------------ calibration input

@pytest.mark.parametrize("calibration, match", [
    ([], "empty"),
    ([torch.randn(32, 128)], r"compiled for torch.float32 \(64, 128\)"),
    ([torch.randn(64, 128, dtype=torch.float64)], "torch.float64"),
    ([(torch.randn(64, 128), torch.randn(64, 128))], "has 2 inputs"),
    ([3.0], "batch 0 is a float"),
    ({"y": torch.randn(128, 128)}, "no tensor for input 'x'"),
    ({"x": torch.randn(100, 128)}, "multiple of 64"),
    ("missing.safetensors", "does not exist"),
])
def test_bad_calibration_input_is_a_clear_error(calibration, match):
    compiled = compile_sparsecc(MLP().eval(), prune={"target_sparsity": 0.5, "calibration": calibration})
    with pytest.raises(Exception) as info, torch.no_grad():
        compiled(torch.randn(64, 128))
    inner = getattr(info.value, "inner_exception", info.value)
    assert isinstance(inner, sparsecc.InputError), info.value
    assert __import__("re").search(match, str(inner)), str(inner)


def test_stacked_calibration_file_is_split_into_batches(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "calibration.safetensors"
    save_file({"x": torch.cat(batches())}, str(path))
    _, state = compiled_state(MLP().eval(), batches()[0], target_sparsity=0.5, calibration=str(path))
    assert state.pruning.calibration_batches == 4


def test_example_inputs_calibrate_with_a_warning():
    with pytest.warns(UserWarning, match="calibrating on the example inputs alone"):
        _, state = compiled_state(MLP().eval(), correlated_rows(64, 128), target_sparsity=0.5)
    assert state.pruning.calibration_batches == 1


# -------------------------------------------------------------------------------------------------- export and CLI

def test_export_prunes_and_the_loaded_artifact_runs_the_pruned_weights(tmp_path, no_fallback):
    import copy
    import json

    model = MLP().eval()
    pruned = copy.deepcopy(model)
    x = correlated_rows(64, 128, seed=5)
    path = sparsecc.export(pruned, (x,), tmp_path / "art", **TEST_OPTIONS, min_weight_numel=1,
                           prune={"target_sparsity": 0.9, "calibration": batches(), "inplace": True})
    assert float((pruned.up.weight == 0).float().mean()) == pytest.approx(0.9, abs=0.02)
    assert float((model.up.weight == 0).float().mean()) == 0.0
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["options"]["prune"]["target_sparsity"] == 0.9 and "calibration" not in manifest["options"]["prune"]
    assert len(manifest["sparse_weights"]) == 2
    loaded = sparsecc.load(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), pruned(x), **FP32)


def test_cli_prune_writes_a_pruned_program_and_analyze_shows_curves(tmp_path):
    import subprocess
    import sys

    from safetensors.torch import save_file

    model = MLP().eval()
    x = correlated_rows(64, 128)
    torch.export.save(torch.export.export(model, (x,)), str(tmp_path / "mlp.pt2"))
    save_file({"x": torch.cat(batches())}, str(tmp_path / "calibration.safetensors"))

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "sparsecc", *map(str, args), "-O", "cost_model=break-even"],
                              capture_output=True, text=True, cwd=tmp_path)

    done = cli("prune", "mlp.pt2", "--calibration", "calibration.safetensors", "--target-sparsity", "0.75",
               "--method", "wanda", "-o", "pruned.pt2", "--plot", "sens.png")
    assert done.returncode == 0, done.stderr
    assert "up.weight" in done.stdout and (tmp_path / "sens.png").stat().st_size > 0
    program = torch.export.load(str(tmp_path / "pruned.pt2"))
    zeros = float(sum((v == 0).sum() for k, v in program.state_dict.items() if k.endswith("weight"))) / (2 * 128 * 256)
    assert zeros == pytest.approx(0.75, abs=0.01)
    original = torch.export.load(str(tmp_path / "mlp.pt2"))
    assert all(bool((v != 0).all()) for k, v in original.state_dict.items() if k.endswith("weight"))
    with torch.no_grad():  # the pruned program agrees with the pruned weights put into the eager model
        model.load_state_dict({k: v for k, v in program.state_dict.items()})
        torch.testing.assert_close(program.module()(x), model(x), **FP32)

    shown = cli("analyze", "mlp.pt2", "--prunable", "--calibration", "calibration.safetensors")
    assert shown.returncode == 0, shown.stderr
    lines = [line for line in shown.stdout.splitlines() if line.startswith(("up.weight", "down.weight"))]
    assert len(lines) == 2 and all(len(line.split()) == 6 for line in lines)  # a name and five levels
    bad = cli("prune", "mlp.pt2", "-o", "x.pt2")
    assert bad.returncode == 1 and "give a budget" in bad.stderr


# ---------------------------------------------------------------------------------------------------- dead channels

class Block(torch.nn.Module):
    """3-D input like a transformer's feed-forward block; `residual` adds the up projection's output back."""

    def __init__(self, residual=False):
        super().__init__()
        self.up = torch.nn.Linear(128, 128 if residual else 256)
        self.down = torch.nn.Linear(128 if residual else 256, 128)
        self.residual = residual

    def forward(self, x):
        h = self.up(x)
        return self.down(torch.nn.functional.gelu(h)) + (h if self.residual else 0)


def test_dead_channels_leave_both_layers_and_the_answer_stays(no_fallback):
    import copy

    model = Block().eval()
    with torch.no_grad():
        model.up.weight[::4] = 0.0  # 64 dead channels given; pruning may add more
    pruned = copy.deepcopy(model)
    x = correlated_rows(64, 128, seed=3).reshape(4, 16, 128)
    calibration = [b.reshape(4, 16, 128) for b in batches()]
    out, state = compiled_state(pruned, x, target_sparsity=0.3, calibration=calibration, inplace=True)
    dead = {d.weight: d for d in state.pruning.dead_channels}
    assert dead["up.weight"].removed >= 64 and dead["up.weight"].into == "down.weight"
    kept = 256 - dead["up.weight"].removed
    shapes = {w.name: w.shape for w in state.plan.weights.values()}
    assert sorted(shapes["up.weight"]) == [128, kept] and sorted(shapes["down.weight"]) == [128, kept]
    with torch.no_grad():  # `pruned` holds the pruned weights at full size: the removal changed nothing else
        torch.testing.assert_close(out, pruned(x), **FP32)
    assert "removed with the matching inputs of down.weight" in state.pruning.table()


def test_dead_channels_feeding_a_residual_add_are_kept(no_fallback):
    model = Block(residual=True).eval()
    with torch.no_grad():
        model.up.weight[::4] = 0.0
    x = correlated_rows(64, 128, seed=3).reshape(4, 16, 128)
    out, state = compiled_state(model, x, target_sparsity=0.3, calibration=[x], dead_channels=True)
    dead = {d.weight: d for d in state.pruning.dead_channels}
    assert dead["up.weight"].removed == 0 and "users" in dead["up.weight"].note
    with torch.no_grad():
        torch.testing.assert_close(out, state.reference(x)[0], **FP32)


def test_a_second_input_shape_reuses_the_pruned_weights(no_fallback):
    import copy

    model = MLP().eval()
    pruned = copy.deepcopy(model)
    compiled = sparsecc.compile(pruned, options={**TEST_OPTIONS, "min_weight_numel": 1, "prune": {
        "target_sparsity": 0.9, "calibration": batches(), "inplace": True}})
    watch = CompileWatch()
    with watch.__enter__(), torch.no_grad():
        first = compiled(correlated_rows(64, 128, seed=1))
        x = correlated_rows(32, 128, seed=2)  # calibration batches are 64 rows: this shape must not calibrate again
        second = compiled(x)
        torch.testing.assert_close(second, pruned(x), **FP32)
    # dynamo makes a graph with a symbolic batch for the second shape; that graph too starts from the pruned weights.
    assert first.shape == (64, 128) and watch.fallbacks == 0 and watch.graphs[0].state.pruning is not None
    newest = watch.graphs[-1].state
    assert newest.pruning is None and newest.sparse_ops == 2  # compiled from the pruned weights, not pruned again


def test_a_second_input_shape_runs_the_pruned_weights_even_without_inplace(no_fallback):
    model = MLP().eval()
    compiled = sparsecc.compile(model, options={**TEST_OPTIONS, "min_weight_numel": 1, "prune": {
        "target_sparsity": 0.9, "calibration": batches()}})
    with torch.no_grad():
        compiled(correlated_rows(64, 128, seed=1))
        x = correlated_rows(32, 128, seed=2)
        second = compiled(x)
    first_state = sparsecc.compiled_graphs()[-2].state  # the first shape's graph, which pruned
    assert set(first_state.pruned_weights) == {"up.weight", "down.weight"}
    pruned = MLP().eval()
    pruned.load_state_dict({**model.state_dict(), **first_state.pruned_weights})
    with torch.no_grad():
        torch.testing.assert_close(second, pruned(x), **FP32)  # the same pruned weights at another shape
    assert bool((model.up.weight != 0).all())  # the user's module still holds its dense weights
