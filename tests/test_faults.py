"""Injected faults below the pipeline: TVM failing to build, a kernel library failing to load, an LLVM that does not
know this CPU. Each time the model still gives eager PyTorch's answer, with one warning (or, where the fault costs
only speed, one log line) saying what happened."""

import logging
import warnings

import pytest
import torch
import torch.nn as nn
import tvm
from conftest import CompileWatch, compile_sparsecc

import sparsecc
from sparsecc.codegen import targets
from sparsecc.sparsify import prune_linears_


def small_model():
    return prune_linears_(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16)), 0.9).eval()


def run_with_fault(**options):
    """Compile and call twice; the outputs, eager's, the fallback warnings and the CompileWatch."""
    model = small_model()
    compiled = compile_sparsecc(model, min_weight_numel=1, **options)
    x = torch.randn(4, 32)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught, CompileWatch() as watch:
        warnings.simplefilter("always")
        outputs = [compiled(x), compiled(x)]
        expected = model(x)
    ours = [str(w.message) for w in caught if issubclass(w.category, sparsecc.SparseccFallbackWarning)]
    return outputs, expected, ours, watch


def test_tvm_build_failure_falls_back_with_one_warning(monkeypatch):
    def failing_compile(*args, **kwargs):
        raise tvm.error.InternalError("simulated LLVM codegen failure")

    monkeypatch.setattr(tvm, "compile", failing_compile)
    outputs, expected, warned, watch = run_with_fault(cache_kernels=False)  # a cached library would skip the build
    for out in outputs:
        torch.testing.assert_close(out, expected)
    assert len(warned) == 1 and "stage 'build'" in warned[0] and "simulated LLVM codegen failure" in warned[0]
    assert watch.fallbacks == 1


def test_kernel_library_failing_to_load_falls_back_with_one_warning(monkeypatch):
    # A library that crashes the process inside dlopen cannot be caught in-process; what can happen without a crash
    # is a load that fails (a missing symbol, an unloadable object), simulated here where the VM is created.
    def failing_vm(*args, **kwargs):
        raise RuntimeError("simulated failure loading the kernel library")

    monkeypatch.setattr(tvm.relax, "VirtualMachine", failing_vm)
    outputs, expected, warned, watch = run_with_fault()
    for out in outputs:
        torch.testing.assert_close(out, expected)
    assert len(warned) == 1 and "simulated failure loading the kernel library" in warned[0]
    assert watch.fallbacks == 1


@pytest.fixture
def cpu_unknown_to_llvm(monkeypatch):
    """This host's CPU reported under a name TVM's LLVM does not know, as a CPU newer than the LLVM would be."""
    monkeypatch.setattr(tvm.target.codegen, "llvm_get_system_cpu", lambda: "futurecpu9")
    caches = (targets.host_cpu, targets.parse_target, targets.host_features)
    for cache in caches:
        cache.cache_clear()
    yield
    monkeypatch.undo()
    for cache in caches:
        cache.cache_clear()


def test_cpu_unknown_to_llvm_builds_for_a_generic_cpu(cpu_unknown_to_llvm, caplog):
    with caplog.at_level(logging.WARNING, logger="sparsecc.codegen.targets"):
        outputs, expected, warned, watch = run_with_fault()
    for out in outputs:
        torch.testing.assert_close(out, expected)
    assert not warned and watch.fallbacks == 0 and watch.sparse_ops == 2  # still sparse, only slower
    assert str(watch.graphs[0].state.target.attrs["mcpu"]) == "generic"
    assert [r for r in caplog.records if "futurecpu9" in r.getMessage() and "generic" in r.getMessage()]
