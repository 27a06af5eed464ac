"""The kernel cache (codegen/kernel_cache.py): a second compile of the same regions loads the library the first
built; anything that changes the regions builds again; a damaged entry is removed with one warning and rebuilt; an
unwritable cache only costs the build."""

import os
import warnings
from pathlib import Path

import pytest
import torch
import torch._dynamo
import torch.nn as nn
from conftest import CompileWatch, compile_sparsecc

import sparsecc
from sparsecc.codegen import kernel_cache
from sparsecc.sparsify import prune_linears_


def pruned_mlp(seed=0):
    torch.manual_seed(seed)
    return prune_linears_(nn.Sequential(nn.Linear(48, 96), nn.GELU(), nn.Linear(96, 40)), 0.9).eval()


def compile_and_check(model, cache_dir, **options):
    """Compile in a fresh dynamo, call on new inputs, compare with eager; the state and the warnings."""
    torch._dynamo.reset()
    compiled = compile_sparsecc(model, min_weight_numel=1, cache_dir=str(cache_dir), **options)
    x = torch.randn(5, 48)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught, CompileWatch() as watch:
        warnings.simplefilter("always")
        compiled(torch.randn(5, 48))
        torch.testing.assert_close(compiled(x), model(x))
    (graph,) = watch.graphs
    assert graph.fallbacks == 0 and graph.state.sparse_ops == 2 and graph.state.regions
    region = graph.state.gm.get_submodule(graph.state.regions[0])
    assert region.calls >= 2  # the sparse path ran, from the cached library as from a fresh build
    return graph.state, [str(w.message) for w in caught]


def entries(cache_dir: Path) -> list[Path]:
    root = cache_dir / kernel_cache.DIRECTORY
    return sorted(p for p in root.iterdir() if not p.name.startswith(".")) if root.exists() else []


def test_second_compile_loads_the_built_regions(tmp_path):
    first, _ = compile_and_check(pruned_mlp(), tmp_path)
    assert not first.kernels_from_cache and len(entries(tmp_path)) == 1
    second, warned = compile_and_check(pruned_mlp(), tmp_path)
    assert second.kernels_from_cache and not warned
    # The cached IRModule is the one lowering made: reports and `sparsecc inspect` see the same kernels.
    assert sorted(gv.name_hint for gv in second.irmodule.functions) == sorted(
        gv.name_hint for gv in first.irmodule.functions)


def test_other_weights_or_options_build_again(tmp_path):
    compile_and_check(pruned_mlp(seed=0), tmp_path)
    other_weights, _ = compile_and_check(pruned_mlp(seed=1), tmp_path)
    other_options, _ = compile_and_check(pruned_mlp(seed=0), tmp_path, formats=("ell",))
    assert not other_weights.kernels_from_cache and not other_options.kernels_from_cache
    assert len(entries(tmp_path)) == 3


def test_cache_kernels_false_neither_reads_nor_writes(tmp_path):
    state, _ = compile_and_check(pruned_mlp(), tmp_path, cache_kernels=False)
    assert not state.kernels_from_cache and not entries(tmp_path)


@pytest.mark.parametrize("damage", ["library_byte", "library_truncated", "irmodule_garbage", "entry_garbage",
                                    "entry_missing_file"])
def test_damaged_entry_is_removed_with_one_warning_and_rebuilt(tmp_path, damage):
    compile_and_check(pruned_mlp(), tmp_path)
    (entry,) = entries(tmp_path)
    library, irmodule, record = (entry / kernel_cache.LIBRARY, entry / kernel_cache.IRMODULE,
                                 entry / kernel_cache.ENTRY)
    if damage == "library_byte":
        data = bytearray(library.read_bytes())
        data[len(data) // 2] ^= 0x40
        library.write_bytes(bytes(data))
    elif damage == "library_truncated":
        library.write_bytes(library.read_bytes()[:1000])
    elif damage == "irmodule_garbage":
        irmodule.write_text("{not json")
    elif damage == "entry_garbage":
        record.write_text("\x00\x01")
    else:
        library.unlink()
    state, warned = compile_and_check(pruned_mlp(), tmp_path)
    assert not state.kernels_from_cache
    ours = [w for w in warned if "kernel cache entry" in w]
    assert len(ours) == 1 and str(entry) in ours[0]
    (rebuilt,) = entries(tmp_path)  # stored again by the rebuild
    again, _ = compile_and_check(pruned_mlp(), tmp_path)
    assert rebuilt == entry and again.kernels_from_cache


def test_unwritable_cache_builds_with_one_warning(tmp_path, monkeypatch):
    # Tests run as root, whom a read-only directory does not stop: the failure to create the entry is simulated.
    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(kernel_cache, "_partial_entry", no_space)
    monkeypatch.setattr(kernel_cache, "_warned", set())
    _, first = compile_and_check(pruned_mlp(), tmp_path)
    state, second = compile_and_check(pruned_mlp(), tmp_path)
    assert not state.kernels_from_cache and not entries(tmp_path)
    assert [w for w in first if "cannot store built kernels" in w and "No space left" in w]
    assert not [w for w in second if "cannot store built kernels" in w]  # once per directory and process


def test_export_builds_its_own_library(tmp_path):
    model = pruned_mlp()
    compile_and_check(model, tmp_path)
    path = sparsecc.export(model, (torch.randn(5, 48),), tmp_path / "artifact", min_weight_numel=1,
                           cost_model="break-even", cache_dir=str(tmp_path))
    loaded = sparsecc.load(path)
    x = torch.randn(5, 48)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert loaded.region_calls == 1


def test_least_recently_used_entries_are_evicted(tmp_path, monkeypatch):
    monkeypatch.setattr(kernel_cache, "MAX_ENTRIES", 2)
    for seed in (0, 1):
        compile_and_check(pruned_mlp(seed), tmp_path)
    first, second = sorted(entries(tmp_path), key=lambda e: e.stat().st_mtime)
    os.utime(first, (second.stat().st_mtime + 1,) * 2)  # seed 0's entry used last
    compile_and_check(pruned_mlp(2), tmp_path)
    left = entries(tmp_path)
    assert len(left) == 2 and first in left and second not in left
