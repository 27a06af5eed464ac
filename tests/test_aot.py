"""Ahead-of-time artifacts: sparsecc.export writes them, sparsecc.load runs them in a process without the model."""

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from conftest import TEST_OPTIONS

import sparsecc
from sparsecc.artifact import exporter
from sparsecc.sparsify import block_prune_, magnitude_prune_, prune_linears_


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(128, 256)
        self.down = nn.Linear(256, 128)
        self.norm = nn.LayerNorm(128)

    def forward(self, x):
        return self.norm(x + self.down(torch.nn.functional.gelu(self.up(x))))


def pruned_mlp():
    model = MLP().eval()
    magnitude_prune_(model.up.weight, 0.9)
    block_prune_(model.down.weight, 0.9, (8, 1))
    return model


@pytest.fixture
def built(tmp_path):
    model, x = pruned_mlp(), torch.randn(8, 128)
    path = sparsecc.export(model, (x,), tmp_path / "mlp", **TEST_OPTIONS)
    return model, x, path


def test_artifact_runs_in_a_fresh_process_without_pickle(built, tmp_path):
    model, x, path = built
    with torch.no_grad():
        expected = model(x)
    save_file({"x": x, "expected": expected}, str(tmp_path / "io.safetensors"))
    # The child never imports this test module or defines MLP, and any attempt to unpickle fails it.
    script = textwrap.dedent(f"""
        import pickle, torch
        def refuse(*a, **k):
            raise AssertionError("loading an artifact unpickled something")
        pickle.load = pickle.loads = torch.load = refuse
        pickle.Unpickler = refuse
        import sparsecc
        from safetensors.torch import load_file
        io = load_file({str(tmp_path / 'io.safetensors')!r})
        model = sparsecc.load({str(path)!r})
        torch.testing.assert_close(model(io["x"]), io["expected"], rtol=1e-4, atol=1e-4)
        assert model.regions and model.region_calls == len(model.regions), model.region_calls
        print("ran", len(model.regions), "regions")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ran 1 regions" in done.stdout


def test_artifact_holds_plan_manifest_and_packed_weights(built):
    model, x, path = built
    manifest = json.loads((path / "manifest.json").read_text())
    plan = sparsecc.SparsePlan.from_json((path / "plan.json").read_text())
    formats = {plan.weights[k].name: c.format.value for k, c in plan.choices.items()}
    assert formats == {"up.weight": "csr", "down.weight": "bsr"}
    assert manifest["inputs"] == [{"shape": [8, 128], "dtype": "float32"}]
    assert manifest["outputs"] == [{"shape": [8, 128], "dtype": "float32"}]
    assert manifest["library"] == "kernels.so" and manifest["target"]["option"] == "host"
    assert {"sparsecc", "tvm", "torch"} <= set(manifest)
    assert set(manifest["files"]) == {"graph.json", "plan.json", "weights.safetensors", "kernels.so",
                                      "example_inputs.safetensors"}
    # Packed weights are stored instead of the dense ones: well under the dense bytes of the two Linears.
    dense_bytes = (model.up.weight.numel() + model.down.weight.numel()) * 4
    assert manifest["files"]["weights.safetensors"]["bytes"] < 0.5 * dense_bytes


def test_bert_style_model_from_an_exported_program(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(num_hidden_layers=2, hidden_size=128, intermediate_size=512,
                                     num_attention_heads=2, vocab_size=512)
    model = transformers.BertModel(config).eval()
    prune_linears_(model, 0.9)
    ids = torch.randint(0, 512, (1, 32))
    program = torch.export.export(model, (ids,))
    loaded = sparsecc.load(sparsecc.export(program, None, tmp_path / "bert", **TEST_OPTIONS))
    with torch.no_grad():
        expected = model(ids)
        actual = loaded(ids)
    torch.testing.assert_close(actual.last_hidden_state, expected.last_hidden_state, rtol=1e-4, atol=1e-4)
    # Six Linears per layer and the pooler's.
    assert len(loaded.manifest["sparse_weights"]) == 13 and loaded.region_calls > 0


def test_same_program_builds_byte_identical_artifacts(tmp_path):
    program = torch.export.export(pruned_mlp(), (torch.randn(8, 128),))
    first = sparsecc.export(program, None, tmp_path / "a", **TEST_OPTIONS)
    second = sparsecc.export(program, None, tmp_path / "b", **TEST_OPTIONS)
    for name in sorted(os.listdir(first)):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_interrupted_build_leaves_nothing_that_loads(tmp_path, monkeypatch):
    model, x = pruned_mlp(), torch.randn(8, 128)
    old = sparsecc.export(model, (x,), tmp_path / "art", **TEST_OPTIONS)
    before = (old / "manifest.json").read_bytes()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # what a kill during the library write looks like from Python

    import tvm

    monkeypatch.setattr(tvm.runtime.Executable, "export_library", killed)
    with pytest.raises(KeyboardInterrupt):
        sparsecc.export(model, (x,), tmp_path / "art", **TEST_OPTIONS)
    with pytest.raises(KeyboardInterrupt):
        sparsecc.export(model, (x,), tmp_path / "new", **TEST_OPTIONS)
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # no partial directories left behind
    assert (old / "manifest.json").read_bytes() == before
    sparsecc.load(old)
    # A directory a killed process left half written (no manifest) is refused.
    partial = tmp_path / ".art.partial-x"
    partial.mkdir()
    (partial / "graph.json").write_text("{}")
    with pytest.raises(sparsecc.ArtifactError, match="manifest.json is missing"):
        sparsecc.load(partial)


def test_cross_target_artifact_is_marked_and_refused_here(tmp_path):
    path = sparsecc.export(pruned_mlp(), (torch.randn(8, 128),), tmp_path / "arm", target="aarch64",
                           **TEST_OPTIONS)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["target"]["arch"] == "aarch64" and manifest["library"] == "kernels.tar"
    with pytest.raises(sparsecc.ArtifactError, match="built for aarch64"):
        sparsecc.load(path)


def test_artifact_needing_cpu_features_this_cpu_lacks_is_refused(built):
    _, _, path = built
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["target"]["features"].append("sve2")  # what an Arm build would need; no x86 CPU has it
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(sparsecc.ArtifactError, match="sve2"):
        sparsecc.load(path)


def test_gpu_target_is_refused_with_a_reason(tmp_path):
    with pytest.raises(sparsecc.OptionError, match="CPU"):
        sparsecc.export(pruned_mlp(), (torch.randn(8, 128),), tmp_path / "gpu", target='{"kind": "cuda"}',
                        **TEST_OPTIONS)


@pytest.mark.parametrize("damage, message", [
    ("missing", "does not exist"),
    ("file", "is a file"),
    ("no_manifest", "manifest.json is missing"),
    ("manifest_garbage", "corrupt"),
    ("newer_format", "newer than"),
    ("flipped_byte", "corrupt"),
    ("truncated", "truncated"),
    ("removed_library", "kernels.so is missing"),
])
def test_damaged_artifacts_give_clear_errors(built, tmp_path, damage, message):
    _, _, path = built
    if damage == "missing":
        path = tmp_path / "nothing-here"
    elif damage == "file":
        path = path / "graph.json"
    elif damage == "no_manifest":
        (path / "manifest.json").unlink()
    elif damage == "manifest_garbage":
        (path / "manifest.json").write_text("{not json")
    elif damage == "newer_format":
        manifest = json.loads((path / "manifest.json").read_text())
        manifest["format"] = 99
        (path / "manifest.json").write_text(json.dumps(manifest))
    elif damage == "flipped_byte":
        data = bytearray((path / "weights.safetensors").read_bytes())
        data[-5] ^= 0xFF
        (path / "weights.safetensors").write_bytes(bytes(data))
    elif damage == "truncated":
        data = (path / "kernels.so").read_bytes()
        (path / "kernels.so").write_bytes(data[: len(data) // 2])
    elif damage == "removed_library":
        (path / "kernels.so").unlink()
    with pytest.raises(sparsecc.ArtifactError, match=message):
        sparsecc.load(path)


def test_wrong_inputs_at_call_name_what_was_expected(built):
    _, x, path = built
    model = sparsecc.load(path)
    with pytest.raises(sparsecc.InputError, match=r"shape \[4, 128\].*built for shape \[8, 128\]"):
        model(torch.randn(4, 128))
    with pytest.raises(sparsecc.InputError, match="dtype float64"):
        model(x.double())
    with pytest.raises(sparsecc.InputError, match="takes 1 inputs, got 2"):
        model(x, x)


class WithCumsum(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(128, 128)
        self.b = nn.Linear(128, 128)

    def forward(self, x):
        return self.b(torch.cumsum(self.a(x), dim=-1))


def test_op_without_tvm_kernel_stays_in_pytorch(tmp_path):
    model = WithCumsum().eval()
    prune_linears_(model, 0.9)
    x = torch.randn(8, 128)
    loaded = sparsecc.load(sparsecc.export(model, (x,), tmp_path / "cumsum", **TEST_OPTIONS))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-4, atol=1e-4)
    graph = json.loads((loaded.path / "graph.json").read_text())
    assert "aten::cumsum.default" in {n.get("target") for n in graph["nodes"]}
    assert len(loaded.manifest["sparse_weights"]) == 2


def test_failing_stage_falls_back_to_a_pytorch_artifact_or_raises(tmp_path, monkeypatch):
    import sparsecc.codegen.importer as importer

    def broken(*args, **kwargs):
        raise RuntimeError("lowering exploded")

    monkeypatch.setattr(importer, "lower_graph", broken)
    model, x = pruned_mlp(), torch.randn(8, 128)
    with pytest.raises(sparsecc.StageError, match="stage 'lower'.*lowering exploded"):
        sparsecc.export(model, (x,), tmp_path / "raise", on_failure="raise", **TEST_OPTIONS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = sparsecc.export(model, (x,), tmp_path / "fallback", **TEST_OPTIONS)
    assert any(issubclass(w.category, sparsecc.SparseccFallbackWarning) for w in caught)
    loaded = sparsecc.load(path)
    assert loaded.manifest["library"] is None and loaded.manifest["stages"] == ["capture"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_op_from_another_library_is_named(tmp_path):
    lib = torch.library.Library("sparsecc_test_ext", "DEF")
    lib.define("twice(Tensor x) -> Tensor")
    lib.impl("twice", lambda x: x * 2, "CompositeExplicitAutograd")
    torch.library.register_fake("sparsecc_test_ext::twice", lambda x: torch.empty_like(x), lib=lib)

    class Ext(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(128, 128)

        def forward(self, x):
            return torch.ops.sparsecc_test_ext.twice(self.a(x))

    with pytest.raises(sparsecc.UnsupportedError, match="sparsecc_test_ext"):
        sparsecc.export(Ext().eval(), (torch.randn(8, 128),), tmp_path / "ext", **TEST_OPTIONS)
    assert not (tmp_path / "ext").exists()
