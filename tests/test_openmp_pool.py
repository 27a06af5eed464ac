"""TVM kernels on PyTorch's OpenMP threads (codegen/openmp_pool.py): results equal eager PyTorch's, the
launches really go through the OpenMP launcher with PyTorch's thread count, and where the launcher cannot be had
the kernels stay on TVM's pool and still agree."""

import pytest
import torch
from conftest import TEST_OPTIONS, CompileWatch, compile_sparsecc
from test_aot import pruned_mlp
from test_models import OddMLP, region_calls

import sparsecc
from sparsecc.codegen import openmp_pool, targets
from sparsecc.codegen.build import uses_openmp
from sparsecc.settings import Settings
from sparsecc.sparsify import prune_linears_
from sparsecc.tolerances import TOLERANCES

FP32 = TOLERANCES[torch.float32]


def run_counting_launches(compiled, model, x):
    before, _ = openmp_pool.launch_count()
    with torch.no_grad(), CompileWatch() as watch:
        torch.testing.assert_close(compiled(x), model(x), **FP32)
        compiled_launches = openmp_pool.launch_count()[0] - before
        for _ in range(3):
            torch.testing.assert_close(compiled(x), model(x), **FP32)
    launches, team = openmp_pool.launch_count()
    return launches - before - compiled_launches, team, watch


@pytest.fixture
def default_openmp(monkeypatch):
    """PyTorch's OpenMP threads as libgomp spins them by default, so "auto" picks them."""
    monkeypatch.setattr(targets, "OMP_SPINS", float("inf"))  # what omp_spins reads from an environment without either


def test_kernels_launch_on_pytorchs_openmp_threads(no_fallback, default_openmp):
    assert openmp_pool.available(), "this machine has a C compiler and PyTorch's libgomp"
    model = prune_linears_(OddMLP(), 0.9).eval()
    x = torch.randn(4, 97)
    launches, team, watch = run_counting_launches(compile_sparsecc(model, min_weight_numel=1), model, x)
    (graph,) = watch.graphs
    assert graph.state.sparse_ops == 3 and region_calls(graph.state) >= 3
    # One region of three kernels, three calls: each kernel made at least one launch per call.
    assert launches >= 9
    assert team == torch.get_num_threads()


def test_tvm_pool_when_asked(no_fallback, default_openmp):
    model = prune_linears_(OddMLP(), 0.9).eval()
    x = torch.randn(4, 97)
    launches, _, watch = run_counting_launches(compile_sparsecc(model, min_weight_numel=1, thread_pool="tvm"),
                                               model, x)
    assert launches == 0 and region_calls(watch.graphs[0].state) >= 3


def test_which_pool_auto_picks(default_openmp, monkeypatch):
    assert uses_openmp(Settings().resolved())
    assert not uses_openmp(Settings(thread_pool="tvm").resolved())
    assert not uses_openmp(Settings(num_threads=torch.get_num_threads() + 1).resolved())
    # PyTorch's threads sleep at once (GOMP_SPINCOUNT=1000 when torch loaded libgomp): TVM's spinning pool is better.
    monkeypatch.setattr(targets, "OMP_SPINS", 1000)
    assert not uses_openmp(Settings().resolved())
    assert uses_openmp(Settings(thread_pool="openmp").resolved())


def test_launcher_is_built_in_the_cache_dir_option(tmp_path):
    library = openmp_pool._built_shim(str(tmp_path / "cache"))
    assert library.parent == tmp_path / "cache" / "openmp" and library.is_file()


def test_without_an_openmp_runtime_kernels_stay_on_tvms_pool(no_fallback, default_openmp, monkeypatch):
    monkeypatch.setattr(openmp_pool, "loaded_openmp_library", lambda: None)
    openmp_pool._shim.cache_clear()
    try:
        assert not openmp_pool.available()
        model = prune_linears_(OddMLP(), 0.9).eval()
        x = torch.randn(4, 97)
        with torch.no_grad(), CompileWatch() as watch:
            torch.testing.assert_close(compile_sparsecc(model, min_weight_numel=1)(x), model(x), **FP32)
        assert region_calls(watch.graphs[0].state) >= 1
    finally:
        openmp_pool._shim.cache_clear()


def test_loaded_artifact_launches_on_openmp_threads(default_openmp, tmp_path):
    model, x = pruned_mlp(), torch.randn(8, 128)
    loaded = sparsecc.load(sparsecc.export(model, (x,), tmp_path / "mlp", **TEST_OPTIONS))
    before, _ = openmp_pool.launch_count()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), **FP32)
    assert openmp_pool.launch_count()[0] > before
