"""Failure policy, stop_after and the entry point."""

import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn as nn
from conftest import CompileWatch, compile_sparsecc

from sparsecc.sparsify import prune_linears_

import sparsecc
import sparsecc.pipeline as pipeline
from sparsecc.settings import STAGES


def small_model():
    return prune_linears_(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16)), 0.9).eval()


@pytest.fixture
def broken_lowering(monkeypatch):
    def broken(product, settings):
        raise RuntimeError("simulated converter bug")

    stages = tuple((name, broken if name == "lower" else fn) for name, fn in pipeline.STAGE_FUNCS)
    monkeypatch.setattr(pipeline, "STAGE_FUNCS", stages)


def test_failing_stage_falls_back_with_one_warning(broken_lowering):
    model = small_model()
    compiled = compile_sparsecc(model, min_weight_numel=1)
    x = torch.randn(4, 32)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught, CompileWatch() as watch:
        warnings.simplefilter("always")
        torch.testing.assert_close(compiled(x), model(x))
        torch.testing.assert_close(compiled(x), model(x))
    ours = [w for w in caught if issubclass(w.category, sparsecc.SparseccFallbackWarning)]
    assert len(ours) == 1 and "stage 'lower'" in str(ours[0].message)
    assert watch.fallbacks == 1


def test_failing_stage_raises_when_asked(broken_lowering):
    compiled = compile_sparsecc(small_model(), min_weight_numel=1, on_failure="raise")
    with pytest.raises(Exception) as info:
        compiled(torch.randn(4, 32))
    inner = getattr(info.value, "inner_exception", info.value)
    assert isinstance(inner, sparsecc.StageError) and inner.stage == "lower"
    assert "simulated converter bug" in str(inner)


def test_stage_error_names_node_and_op(monkeypatch):
    from sparsecc.codegen import converters

    def broken_convert(ctx, node, args):
        raise ValueError("no luck")

    key = torch.ops.sparsecc.sparse_linear.default
    monkeypatch.setitem(converters.CONVERTERS, key, converters.Converter(broken_convert, converters.CONVERTERS[key].check))
    # Without the kernel cache: an earlier test's identical regions would skip lowering, where the fault is.
    compiled = compile_sparsecc(small_model(), min_weight_numel=1, on_failure="raise", cache_kernels=False)
    with pytest.raises(Exception) as info:
        compiled(torch.randn(4, 32))
    inner = getattr(info.value, "inner_exception", info.value)
    assert inner.stage == "lower" and inner.op == "sparsecc.sparse_linear.default" and inner.node


class Embedded(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.mlp = small_model()

    def forward(self, ids):
        return self.mlp(self.embed(ids))


def compiled_then_broken(monkeypatch, **options):
    """A compiled model whose compiled graph raises on every call after compiling, and a count of those calls."""
    model = Embedded().eval()
    compiled = compile_sparsecc(model, min_weight_numel=1, **options)
    ids = torch.randint(0, 50, (2, 5))
    with torch.no_grad(), CompileWatch() as watch:
        compiled(ids)
    state = watch.graphs[0].state
    assert state.regions
    calls = []

    def broken(*args):
        calls.append(1)
        raise RuntimeError("simulated kernel failure")

    monkeypatch.setattr(state.gm, "forward", broken)
    return model, compiled, ids, watch, calls


def test_failure_at_run_time_falls_back_once(monkeypatch):
    model, compiled, ids, watch, calls = compiled_then_broken(monkeypatch)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, second = compiled(ids), compiled(ids)
        expected = model(ids)
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(second, expected)
    ours = [w for w in caught if issubclass(w.category, sparsecc.SparseccFallbackWarning)]
    assert len(ours) == 1 and "simulated kernel failure" in str(ours[0].message)
    assert watch.fallbacks == 1 and len(calls) == 1  # the second call went straight to PyTorch


def test_input_error_plain_pytorch_shares_is_raised_and_the_graph_kept(monkeypatch):
    model, compiled, ids, watch, calls = compiled_then_broken(monkeypatch)
    with torch.no_grad(), pytest.raises(IndexError):
        model(ids + 50)  # plain PyTorch raises on an id past the table
    with torch.no_grad(), pytest.raises(IndexError):
        compiled(ids + 50)
    assert watch.fallbacks == 0 and len(calls) == 1


def test_failure_at_run_time_raises_when_asked(monkeypatch):
    _, compiled, ids, watch, _ = compiled_then_broken(monkeypatch, on_failure="raise")
    with torch.no_grad(), pytest.raises(RuntimeError, match="simulated kernel failure"):
        compiled(ids)
    assert watch.fallbacks == 0


@pytest.mark.parametrize("stage", STAGES)
def test_stop_after_each_stage_still_runs_correctly(stage):
    model = small_model()
    compiled = compile_sparsecc(model, min_weight_numel=1, stop_after=stage)
    x = torch.randn(3, 32)
    with torch.no_grad(), CompileWatch() as watch:
        torch.testing.assert_close(compiled(x), model(x))
    state = watch.graphs[0].state
    assert state.completed == STAGES[: STAGES.index(stage) + 1]
    assert (state.plan is not None) == (STAGES.index(stage) >= STAGES.index("plan"))
    assert (state.vm is not None) == (stage == "build")


def test_backend_by_name_in_a_fresh_process_without_import():
    script = textwrap.dedent("""
        import sys, torch
        m = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).eval()
        with torch.no_grad():
            for p in m.parameters():
                p[torch.rand_like(p) < 0.9] = 0
            x = torch.randn(5, 32)
            assert "sparsecc" not in sys.modules
            y = torch.compile(m, backend="sparsecc", options={"cost_model": "break-even", "min_weight_numel": 1})(x)
            torch.testing.assert_close(y, m(x))
        import sparsecc
        state = sparsecc.compiled_graphs()[-1].state
        print("sparse_ops", state.sparse_ops, "regions", len(state.regions))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "sparse_ops 2 regions 1" in out.stdout  # the ReLU between them is fused


def test_register_backend_after_import_is_idempotent():
    sparsecc.register_backend()
    sparsecc.register_backend()
    assert "sparsecc" in torch._dynamo.list_backends(exclude_tags=())
