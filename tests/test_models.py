"""Whole models through torch.compile(backend="sparsecc"), each compared with eager PyTorch and each
checking that the sparse path actually ran (sparse ops in the graph, TVM regions built and called)."""

import gc

import pytest
import torch
import torch.nn as nn
import torch.nn.utils.prune as prune
from conftest import TEST_OPTIONS, CompileWatch, compile_sparsecc

import sparsecc
from sparsecc.sparsify import prune_linears_
from sparsecc.tolerances import TOLERANCES

FP32 = TOLERANCES[torch.float32]


def run_both(model, *inputs, **options):
    model.eval()
    compiled = compile_sparsecc(model, **options)
    with torch.no_grad(), CompileWatch() as watch:
        expected = model(*inputs)
        actual = compiled(*inputs)
    return actual, expected, watch, compiled


def sparse_kernel_names(watch):
    """The sparse kernels (TIR functions) of the first graph compiled, by name."""
    return [gv.name_hint for gv in watch.graphs[0].state.irmodule.functions if "linear" in gv.name_hint]


class OddMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(97, 211)
        self.fc2 = nn.Linear(211, 53, bias=False)
        self.fc3 = nn.Linear(53, 131)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.nn.functional.gelu(self.fc1(x)))))


def test_mlp_with_odd_sizes(no_fallback):
    model = prune_linears_(OddMLP(), 0.9)
    x = torch.randn(3, 5, 97)
    actual, expected, watch, _ = run_both(model, x, min_weight_numel=1)
    torch.testing.assert_close(actual, expected, **FP32)
    # GELU and ReLU fused into the sparse ops' epilogues, so the three layers form one TVM region.
    assert watch.sparse_ops == 3 and watch.regions == 1
    assert not {"aten.gelu.default", "aten.relu.default"} & outer_ops(watch)
    # fc1 and fc2 hand their outputs to the next sparse kernel in its token-tiled layout (no transpose there).
    kernels = sparse_kernel_names(watch)
    assert sum("y_tiled" in k for k in kernels) == 2 and sum("x_tiled" in k for k in kernels) == 2, kernels


class SharedHidden(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(40, 64)
        self.fc2 = nn.Linear(64, 24)

    def forward(self, x):
        hidden = self.fc1(x)
        return self.fc2(hidden), hidden * 2


def test_output_used_outside_the_next_kernel_stays_row_major(no_fallback):
    model = prune_linears_(SharedHidden(), 0.9)
    actual, expected, watch, _ = run_both(model, torch.randn(2, 9, 40), min_weight_numel=1)
    torch.testing.assert_close(actual, expected, **FP32)
    assert watch.sparse_ops == 2
    kernels = sparse_kernel_names(watch)
    assert len(kernels) == 2 and not any("tiled" in k for k in kernels), kernels


def test_second_input_shape_is_correct(no_fallback):
    model = prune_linears_(OddMLP(), 0.8).eval()
    compiled = compile_sparsecc(model, min_weight_numel=1)
    with torch.no_grad(), CompileWatch() as watch:
        for shape in [(3, 5, 97), (2, 11, 97), (1, 1, 97), (7, 97)]:
            x = torch.randn(*shape)
            torch.testing.assert_close(compiled(x), model(x), **FP32)
    assert watch.sparse_ops >= 3 and all(g.fallbacks == 0 for g in watch.graphs)


def tiny_bert():
    from transformers import BertConfig, BertModel

    config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=160,
                        vocab_size=120, max_position_embeddings=64)
    return BertModel(config)


def run_tiny_bert(*inputs, **options):
    """tiny_bert pruned to 90 %, compiled and checked against eager on both outputs; the CompileWatch."""
    model = prune_linears_(tiny_bert(), 0.9)
    actual, expected, watch, _ = run_both(model, *inputs, min_weight_numel=1, **options)
    torch.testing.assert_close(actual.last_hidden_state, expected.last_hidden_state, **FP32)
    torch.testing.assert_close(actual.pooler_output, expected.pooler_output, **FP32)
    return watch


def region_kernels(watch) -> list[str]:
    """The TIR functions of the first graph compiled, by name."""
    return [gv.name_hint for gv in watch.graphs[0].state.irmodule.functions]


def outer_ops(watch) -> set[str]:
    """The ops the first graph compiled still runs in PyTorch."""
    return {str(n.target) for n in watch.graphs[0].state.gm.graph.nodes if n.op == "call_function"}


def test_bert_style_encoder(no_fallback):
    watch = run_tiny_bert(torch.randint(0, 120, (2, 24)))
    assert watch.sparse_ops == 2 * 6 + 1  # six Linears per layer and the pooler
    # By default attention and layer norm join the sparse ops' region (sparsecc's own kernels), so the encoder is
    # one region and the pooler another; the embeddings' adds stay in PyTorch.
    outer = outer_ops(watch)
    assert len(watch.graphs[0].state.regions) == 2 and not any("attention" in op or "layer_norm" in op for op in outer), outer
    assert "aten.add.Tensor" in outer
    kernels = region_kernels(watch)
    assert any(k.startswith("attention_2x24x4x16") for k in kernels)


def test_bert_encoder_hands_over_in_token_tiles(no_fallback):
    # One sequence of 40 tokens (the last tile padded): every kernel of the encoder region reads and writes the
    # token-tiled layout, except the first layer norm's input and the last one's output (the region's boundary).
    watch = run_tiny_bert(torch.randint(0, 120, (1, 40)))
    kernels = [k for k in region_kernels(watch) if not k.startswith("sparsecc_region")]
    encoder = [k for k in kernels if "_linear_40x" in k or k.startswith(("attention", "layer_norm"))]
    assert "attention_1x40x4x16_float32_tiled_q_k_v_out" in encoder, encoder
    assert {k for k in encoder if k.startswith("layer_norm")} == {
        "layer_norm_40x64_float32_y_tiled", "layer_norm_40x64_float32_x_tiled_y_tiled", "layer_norm_40x64_float32_x_tiled"}
    linears = [k for k in encoder if "_linear_" in k]
    assert linears and all("x_tiled_y_tiled" in k for k in linears), linears
    assert all("residual_tiled" in k for k in linears if "_residual" in k), linears


def test_bert_encoder_with_everything_offloaded_is_one_region(no_fallback):
    # offload="all": the embeddings' adds join too, so the embeddings' output on is one region; the pooler is a
    # second, after the first token's select (which has no converter).
    watch = run_tiny_bert(torch.randint(0, 120, (2, 24)), offload="all")
    state = watch.graphs[0].state
    outer = outer_ops(watch)
    assert not any("attention" in op or "layer_norm" in op or op == "aten.add.Tensor" for op in outer), outer
    assert len(state.regions) == 2 and "aten.select.int" in outer and watch.sparse_ops == 2 * 6 + 1
    kernels = region_kernels(watch)
    assert any(k.startswith("attention_2x24x4x16") for k in kernels)
    assert any(k.startswith("layer_norm_48x64") for k in kernels)


class HeadsAveraged(nn.Module):
    """Attention whose per-head output is read as such (averaged over heads), not merged back."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = (f(x).view(b, s, 4, 8).transpose(1, 2) for f in (self.q, self.k, self.v))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v).mean(1)


def test_attention_output_read_per_head(no_fallback):
    model = prune_linears_(HeadsAveraged(), 0.9)
    x = torch.randn(2, 12, 32)
    actual, expected, watch, _ = run_both(model, x, min_weight_numel=1, offload="all")
    torch.testing.assert_close(actual, expected, **FP32)
    assert any(k.startswith("attention_2x12x4x8") for k in region_kernels(watch)) and watch.sparse_ops == 3


def test_attention_with_a_mask_stays_in_pytorch(no_fallback):
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, 20:] = 0  # padding: a mask the fused kernel does not take
    watch = run_tiny_bert(torch.randint(0, 120, (2, 24)), mask, offload="all")
    assert not any(k.startswith("attention") for k in region_kernels(watch))
    assert watch.sparse_ops == 2 * 6 + 1


def test_gpt2_style_decoder_conv1d_weights(no_fallback):
    from transformers import GPT2Config, GPT2Model

    model = GPT2Model(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=120, n_positions=64,
                                 bos_token_id=0, eos_token_id=0))
    prune_linears_(model, 0.85)
    ids = torch.randint(0, 120, (1, 20))
    actual, expected, watch, _ = run_both(model, ids, min_weight_numel=1)
    torch.testing.assert_close(actual.last_hidden_state, expected.last_hidden_state, **FP32)
    plan = watch.graphs[0].state.plan
    conv1d = [w for w in plan.weights.values() if w.name.endswith("c_fc.weight")]
    # Conv1D keeps its weight as (in, out) and multiplies it on the right of addmm, unfolded.
    assert conv1d and conv1d[0].shape == (64, 256) and conv1d[0].uses[0].operand == 2
    assert watch.sparse_ops == 2 * 4


def test_t5_encoder_relative_position_buckets(no_fallback):
    # T5 computes its position buckets from constants with an in-place add; folded without functionalizing, that
    # add wrote into a folded constant on every call until the bucket ids ran past the embedding (IndexError).
    from transformers import T5Config, T5EncoderModel

    model = T5EncoderModel(T5Config(d_model=128, num_layers=2, num_heads=4, d_kv=32, d_ff=256, vocab_size=500))
    prune_linears_(model, 0.8)
    ids = torch.randint(0, 500, (2, 16))
    actual, expected, watch, compiled = run_both(model, ids, min_weight_numel=1)
    torch.testing.assert_close(actual.last_hidden_state, expected.last_hidden_state, **FP32)
    with torch.no_grad():
        again = compiled(ids)
    torch.testing.assert_close(again.last_hidden_state, expected.last_hidden_state, **FP32)
    assert watch.sparse_ops == 2 * 6  # q, k, v, o and the two feed-forward Linears of each block
    assert watch.graphs[0].state.regions


class ScalesItsInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = prune_linears_(nn.Linear(32, 64), 0.9)

    def forward(self, x):
        x.mul_(2)
        return self.fc(x)


def test_graph_writing_its_input_writes_it_once(no_fallback):
    # Compiling runs the graph several times (tracing, verifying, timing); none of that may reach the caller's input.
    model = ScalesItsInput().eval()
    compiled = compile_sparsecc(model, min_weight_numel=1)
    x = torch.randn(4, 32)
    eager_x, compiled_x = x.clone(), x.clone()
    with torch.no_grad(), CompileWatch() as watch:
        expected = model(eager_x)
        actual = compiled(compiled_x)
    torch.testing.assert_close(actual, expected, **FP32)
    torch.testing.assert_close(compiled_x, eager_x)
    assert watch.sparse_ops == 1 and watch.regions == 1


def test_model_without_zeros_stays_dense_and_correct(no_fallback):
    model = OddMLP()
    x = torch.randn(4, 97)
    actual, expected, watch, _ = run_both(model, x, min_weight_numel=1)
    torch.testing.assert_close(actual, expected, **FP32)
    plan = watch.graphs[0].state.plan
    assert watch.sparse_ops == 0 and watch.regions == 0
    assert all(c.format is sparsecc.SparseFormat.DENSE for c in plan.choices.values())
    assert all("density 1.000: no sparse format predicted faster than dense" in c.reason
               for c in plan.choices.values())
    assert watch.graphs[0].state.dense_backend in ("eager", "inductor")  # timed both, kept the faster


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_dense_graph_backend_can_be_forced(no_fallback, backend):
    model = OddMLP()
    x = torch.randn(3, 97)
    actual, expected, watch, _ = run_both(model, x, dense_backend=backend)
    torch.testing.assert_close(actual, expected, **FP32)
    assert watch.graphs[0].state.dense_backend == backend


def test_model_pruned_with_torch_nn_utils_prune(no_fallback):
    model = OddMLP()
    for layer in (model.fc1, model.fc2, model.fc3):
        prune.l1_unstructured(layer, "weight", amount=0.9)
    x = torch.randn(6, 97)
    actual, expected, watch, _ = run_both(model, x, min_weight_numel=1)
    torch.testing.assert_close(actual, expected, **FP32)
    # The zeros live in weight_mask, applied in forward: only folding makes them visible.
    weights = watch.graphs[0].state.plan.weights.values()
    assert {w.name for w in weights} == {"fc1.weight_orig", "fc2.weight_orig", "fc3.weight_orig"}
    assert all(abs(w.density - 0.1) < 0.01 for w in weights)
    assert watch.sparse_ops == 3


class WithGraphBreak(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 128)
        self.b = nn.Linear(128, 32)

    def forward(self, x):
        h = torch.relu(self.a(x))
        torch._dynamo.graph_break()
        return self.b(h)


def test_model_with_graph_break(no_fallback):
    model = prune_linears_(WithGraphBreak(), 0.9)
    x = torch.randn(8, 64)
    actual, expected, watch, _ = run_both(model, x, min_weight_numel=1)
    torch.testing.assert_close(actual, expected, **FP32)
    assert len(watch.graphs) == 2 and watch.sparse_ops == 2


class WithCumsum(nn.Module):
    """cumsum has no TVM converter in sparsecc, so it must stay in PyTorch between two regions."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(48, 96)
        self.b = nn.Linear(96, 40)

    def forward(self, x):
        h = self.a(x)
        h = torch.cumsum(h, dim=-1) * 0.01 + torch.relu(h)
        return self.b(h) + self.a(x).sum(-1, keepdim=True)


@pytest.mark.parametrize("offload", ["sparse", "all"])
def test_model_with_op_tvm_lacks(no_fallback, offload):
    model = prune_linears_(WithCumsum(), 0.9)
    x = torch.randn(5, 48)
    actual, expected, watch, _ = run_both(model, x, min_weight_numel=1, offload=offload)
    torch.testing.assert_close(actual, expected, **FP32)
    assert "aten.cumsum.default" in outer_ops(watch)
    assert watch.sparse_ops >= 2 and len(watch.graphs[0].state.regions) >= 2


def test_weights_changed_after_compiling_are_never_stale(no_fallback):
    model = prune_linears_(OddMLP(), 0.9).eval()
    compiled = compile_sparsecc(model, min_weight_numel=1)
    x = torch.randn(4, 97)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), **FP32)
        model.fc1.weight.mul_(2.0)  # in place
        torch.testing.assert_close(compiled(x), model(x), **FP32)
        model.fc2.weight.data = torch.zeros_like(model.fc2.weight)  # .data =
        torch.testing.assert_close(compiled(x), model(x), **FP32)
        graph = sparsecc.compiled_graphs()[-1]
        assert graph.compiles == 3 and len(graph.states) == 1  # old variants (and their kernels) released
        other = prune_linears_(OddMLP(), 0.5)
        model.load_state_dict(other.state_dict())  # load_state_dict
        torch.testing.assert_close(compiled(x), model(x), **FP32)


def region_calls(state) -> int:
    from sparsecc.codegen.executable import TvmRegion

    return sum(m.calls for m in state.gm.modules() if isinstance(m, TvmRegion))


def call_in_turn(models, compiled, x, rounds: int) -> None:
    """Each compiled model on x in turn, `rounds` times, each against its own eager output."""
    with torch.no_grad():
        for _ in range(rounds):
            for model, fn in zip(models, compiled):
                torch.testing.assert_close(fn(x), model(x), **FP32)


def compile_and_call_in_turn(models, x, rounds: int):
    """Compile each model (one class: they share dynamo's graph), call them in turn; that graph and the
    compiled models."""
    with CompileWatch() as watch:
        compiled = [compile_sparsecc(m, min_weight_numel=1) for m in models]
        call_in_turn(models, compiled, x, rounds)
    (graph,) = watch.graphs
    return graph, compiled


def test_instances_of_one_model_keep_their_own_kernels(no_fallback):
    # Two instances of one class share dynamo's graph, each passing its own weights: each is compiled once, not
    # again at every switch, and each is answered from its own weights.
    models = [prune_linears_(OddMLP(), 0.9).eval() for _ in range(2)]
    x = torch.randn(4, 97)
    graph, compiled = compile_and_call_in_turn(models, x, rounds=3)
    assert graph.compiles == 2 and len(graph.states) == 2
    assert all(state.sparse_ops == 3 and region_calls(state) >= 3 for state in graph.states)

    # An in-place edit of one instance recompiles that instance only.
    with torch.no_grad():
        models[0].fc1.weight.mul_(2.0)
    call_in_turn(models, compiled, x, rounds=1)
    assert graph.compiles == 3 and len(graph.states) == 2

    # Freeing an instance releases its kernels.
    del models[1], compiled[1]
    gc.collect()
    assert len(graph.states) == 1


def test_more_instances_than_kept_are_recompiled_not_stale(no_fallback, monkeypatch):
    monkeypatch.setattr(sparsecc.runtime.compiled, "MAX_WEIGHT_SETS", 2)
    models = [prune_linears_(OddMLP(), 0.9).eval() for _ in range(3)]
    graph, _ = compile_and_call_in_turn(models, torch.randn(4, 97), rounds=2)
    # Three instances in turn with room for two: every call after the first round finds its set released.
    assert graph.compiles == 6 and len(graph.states) == 2


def test_weight_change_can_raise():
    model = prune_linears_(OddMLP(), 0.9).eval()
    compiled = compile_sparsecc(model, min_weight_numel=1, on_weight_change="raise")
    x = torch.randn(4, 97)
    with torch.no_grad():
        compiled(x)
        model.fc3.weight.add_(1.0)
        with pytest.raises(Exception) as info:
            compiled(x)
    assert isinstance(info.value, sparsecc.WeightChangedError) or isinstance(
        getattr(info.value, "inner_exception", None), sparsecc.WeightChangedError)


def test_sparse_layout_weights_through_sparsecc_compile(no_fallback):
    model = OddMLP().eval()
    prune_linears_(model, 0.9)
    dense_reference = OddMLP().eval()
    dense_reference.load_state_dict(model.state_dict())
    model.fc1.weight = nn.Parameter(model.fc1.weight.detach().to_sparse_csr(), requires_grad=False)
    model.fc2.weight = nn.Parameter(model.fc2.weight.detach().to_sparse_bsr((1, 1)), requires_grad=False)
    model.fc3.weight = nn.Parameter(model.fc3.weight.detach().to_sparse_coo(), requires_grad=False)
    compiled = sparsecc.compile(model, options={**TEST_OPTIONS, "min_weight_numel": 1})
    x = torch.randn(3, 97)
    with torch.no_grad(), CompileWatch() as watch:
        torch.testing.assert_close(compiled(x), dense_reference(x), **FP32)
    layouts = {w.name: w.source_layout for w in watch.graphs[0].state.plan.weights.values()}
    assert layouts == {"fc1.weight": "sparse_csr", "fc2.weight": "sparse_bsr", "fc3.weight": "sparse_coo"}
    assert watch.sparse_ops == 3


def block_pruned_mlp() -> OddMLP:
    """fc1 (208 x 96) keeps 10 % of its 16 x 1 blocks; fc2 stays dense."""
    model = OddMLP()
    model.fc1 = nn.Linear(96, 208)
    model.fc2 = nn.Linear(208, 53, bias=False)
    with torch.no_grad():
        occupied = torch.rand(208 // 16, 96) < 0.1
        model.fc1.weight.mul_(occupied.repeat_interleave(16, 0))
    return model


def test_block_pruned_model_uses_bsr(no_fallback):
    model = block_pruned_mlp()
    x = torch.randn(2, 9, 96)
    actual, expected, watch, _ = run_both(model, x, min_weight_numel=1)
    torch.testing.assert_close(actual, expected, **FP32)
    choice = watch.graphs[0].state.plan.choices
    chosen = {watch.graphs[0].state.plan.weights[k].name: (c.format.value, c.block) for k, c in choice.items()}
    assert chosen["fc1.weight"] == ("bsr", (8, 1))  # 16 x 1 blocks are 8 x 1 blocks, the faster kernel
    assert watch.sparse_ops == 1 and watch.regions == 1


def test_formats_option_picks_what_runs(no_fallback):
    model = block_pruned_mlp()
    x = torch.randn(2, 9, 96)
    actual, expected, watch, _ = run_both(model, x, min_weight_numel=1, formats=["dense", "csr"])
    torch.testing.assert_close(actual, expected, **FP32)
    plan = watch.graphs[0].state.plan
    chosen = {plan.weights[k].name: c.format.value for k, c in plan.choices.items()}
    assert chosen["fc1.weight"] == "csr" and watch.sparse_ops == 1  # 8x1 blocks would win, but are not allowed
    torch._dynamo.reset()
    actual, expected, watch, _ = run_both(model, x, min_weight_numel=1, formats=["dense"])
    torch.testing.assert_close(actual, expected, **FP32)
    assert watch.sparse_ops == 0


def two_layers() -> nn.Module:
    return nn.Sequential(nn.Linear(128, 96), nn.ReLU(), nn.Linear(96, 64))


def test_nm_pruned_rows_run_with_a_constant_length(no_fallback):
    """1:4 pruning leaves every row the same length: the CSR kernels take it as a constant (named _ell<length>)."""
    model = prune_linears_(two_layers(), 0.0, nm=(1, 4))
    x = torch.randn(3, 7, 128)
    actual, expected, watch, _ = run_both(model, x, min_weight_numel=1, formats=["dense", "csr"])
    torch.testing.assert_close(actual, expected, **FP32)
    assert watch.sparse_ops == 2
    kernels = sparse_kernel_names(watch)
    assert any(k.startswith("csr_ell32_") for k in kernels) and any(k.startswith("csr_ell24_") for k in kernels)


def test_ell_format_pads_uneven_rows(no_fallback):
    model = prune_linears_(two_layers(), 0.9)
    x = torch.randn(3, 7, 128)
    actual, expected, watch, _ = run_both(model, x, min_weight_numel=1, formats=["ell"])
    torch.testing.assert_close(actual, expected, **FP32)
    plan = watch.graphs[0].state.plan
    assert {c.format for c in plan.choices.values()} == {sparsecc.SparseFormat.ELL} and watch.sparse_ops == 2
    widths = {plan.weights[k].name: plan.weights[k].row_max for k in plan.choices}
    kernels = sparse_kernel_names(watch)
    assert all(any(k.startswith(f"csr_ell{w}_") for k in kernels) for w in widths.values()), (widths, kernels)
