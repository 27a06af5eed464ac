"""Damaged and hostile artifacts. Every byte flip, truncation, extension, extra file, symlink, subdirectory or
removal of a small artifact is refused by sparsecc.load with ArtifactError (hypothesis properties over random
corruptions, derandomised: the same cases every run), and an artifact whose hashes were all rewritten to match, as an
attacker would, still cannot make the loader run code other than its kernel library: graph.json resolves ATen ops by
name and nothing else, and its names never reach Python source.

One artifact is built per module; each case damages a fresh copy of it in its own temporary directory and loads it
in this process, with tvm.runtime.load_module watched so that no library but the pinned one ever reaches dlopen.
"""

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn as nn
from conftest import TEST_OPTIONS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparsecc
from sparsecc.artifact import store
from sparsecc.errors import ArtifactError
from sparsecc.sparsify import magnitude_prune_

CASES = dict(derandomize=True, database=None, deadline=None, print_blob=True,
             suppress_health_check=[HealthCheck.too_slow])
# What an artifact of a model with TVM regions holds: the flip property runs over each (and fails when the layout
# gains a file, so that the new one is covered too).
LAYOUT = ("example_inputs.safetensors", "graph.json", "kernels.so", "manifest.json", "plan.json",
          "weights.safetensors")


@dataclasses.dataclass(frozen=True)
class Original:
    path: Path
    x: torch.Tensor
    expected: torch.Tensor
    manifest: dict
    library_sha256: str

    def size(self, name: str) -> int:
        return (self.path / name).stat().st_size


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> Original:
    torch.manual_seed(0)
    model = nn.Linear(128, 256).eval()
    magnitude_prune_(model.weight, 0.9)
    x = torch.randn(8, 128)
    path = sparsecc.export(model, (x,), tmp_path_factory.mktemp("corruption") / "linear", **TEST_OPTIONS)
    with torch.no_grad():
        expected = model(x)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["library"] == "kernels.so" and manifest["regions"], "the artifact must hold TVM kernels"
    return Original(path, x, expected, manifest, store.sha256(path / "kernels.so"))


@contextlib.contextmanager
def copy_of(original: Original):
    """A fresh copy of the artifact (hypothesis runs many cases per test, so no function-scoped tmp_path)."""
    with tempfile.TemporaryDirectory(prefix="sparsecc-corrupt-") as tmp:
        path = Path(tmp) / "artifact"
        shutil.copytree(original.path, path)
        yield path


@contextlib.contextmanager
def watched_library_loads(original: Original):
    """Fails the test if TVM is ever asked to load a library whose bytes are not the artifact's pinned kernels."""
    import tvm

    real = tvm.runtime.load_module

    def load_module(path, *args, **kwargs):
        assert store.sha256(Path(path)) == original.library_sha256, "dlopen of a library that is not the pinned one"
        return real(path, *args, **kwargs)

    with mock.patch.object(tvm.runtime, "load_module", load_module):
        yield


def check_refused_or_unchanged(path: Path, original: Original, damaged: str) -> None:
    """The artifact at `path`, whose file `damaged` was changed, is refused with an ArtifactError that says what to
    do (and names the file, unless it was the manifest, whose damage can surface as a wrong field: another file
    listed, a newer format); or, only when the damage left manifest.json's JSON content the same (whitespace), it
    loads and gives the original's outputs."""
    with watched_library_loads(original):
        try:
            model = sparsecc.load(path)
        except ArtifactError as exc:
            assert "build" in str(exc), f"no advice in: {exc}"
            assert damaged == "manifest.json" or damaged in str(exc), f"{damaged} not named in: {exc}"
            return
    assert damaged == "manifest.json", f"an artifact with a damaged {damaged} loaded"
    assert json.loads((path / "manifest.json").read_bytes()) == original.manifest, "a changed manifest loaded"
    torch.testing.assert_close(model(original.x), original.expected, rtol=1e-4, atol=1e-4)


def test_the_pristine_copy_loads_and_matches(original):
    with copy_of(original) as path:
        assert sorted(os.listdir(path)) == sorted(LAYOUT)
        with watched_library_loads(original):
            model = sparsecc.load(path)
        torch.testing.assert_close(model(original.x), original.expected, rtol=1e-4, atol=1e-4)
        assert model.region_calls == len(model.regions) == 1
    assert original.manifest["format"] == store.MANIFEST_FORMAT
    assert original.manifest[store.SELF_HASH] == store.manifest_digest(original.manifest)


# -- random corruptions -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LAYOUT)
@settings(max_examples=25, **CASES)
@given(offset=st.floats(0, 1, exclude_max=True), mask=st.integers(1, 255))
def test_a_flipped_byte_anywhere_is_refused(original, name, offset, mask):
    with copy_of(original) as path:
        data = bytearray((path / name).read_bytes())
        data[int(offset * len(data))] ^= mask
        (path / name).write_bytes(bytes(data))
        check_refused_or_unchanged(path, original, name)


@settings(max_examples=30, **CASES)
@given(name=st.sampled_from(LAYOUT), keep=st.floats(0, 1, exclude_max=True))
def test_a_truncated_file_is_refused(original, name, keep):
    with copy_of(original) as path:
        data = (path / name).read_bytes()
        (path / name).write_bytes(data[: int(keep * len(data))])
        check_refused_or_unchanged(path, original, name)


@settings(max_examples=25, **CASES)
@given(name=st.sampled_from(LAYOUT), extra=st.binary(min_size=1, max_size=64) | st.sampled_from([b"\n", b" \t"]))
def test_bytes_appended_to_a_file_are_refused(original, name, extra):
    with copy_of(original) as path:
        with open(path / name, "ab") as f:
            f.write(extra)
        check_refused_or_unchanged(path, original, name)


EXTRA_NAMES = st.sampled_from(["kernels2.so", ".hidden", "libgomp.so.1", "kernels.so.bak", "manifest.json~",
                               "graph.json.orig", ".sparsecc-load", "README"]) | st.text(
    "abcdefghijklmnopqrstuvwxyz0123456789._-", min_size=1, max_size=16).filter(
    lambda n: n not in LAYOUT and n not in (".", ".."))


@settings(max_examples=25, **CASES)
@given(name=EXTRA_NAMES, content=st.binary(max_size=64) | st.just(None))
def test_an_extra_file_is_refused_and_named(original, name, content):
    with copy_of(original) as path:
        if content is None:
            shutil.copy(path / "kernels.so", path / name)  # a second library the dynamic loader could pick up
        else:
            (path / name).write_bytes(content)
        with pytest.raises(ArtifactError, match="does not list") as caught:
            sparsecc.load(path)
        assert name in str(caught.value)


@settings(max_examples=12, **CASES)
@given(name=st.sampled_from(LAYOUT))
def test_a_file_replaced_by_a_symlink_to_its_own_copy_is_refused(original, name):
    with copy_of(original) as path:
        elsewhere = path.parent / f"elsewhere-{name}"
        (path / name).rename(elsewhere)
        (path / name).symlink_to(elsewhere)
        with pytest.raises(ArtifactError, match="symlink") as caught:
            sparsecc.load(path)
        assert name in str(caught.value)


def test_an_artifact_directory_that_is_a_symlink_is_refused(original):
    with copy_of(original) as path:
        link = path.parent / "link"
        link.symlink_to(path, target_is_directory=True)
        sparsecc.load(path)  # the directory itself is fine
        with pytest.raises(ArtifactError, match="is a symlink.*load the directory it points to"):
            sparsecc.load(link)


@settings(max_examples=12, **CASES)
@given(name=st.sampled_from(LAYOUT), keep_inside=st.booleans())
def test_a_file_replaced_by_a_directory_is_refused(original, name, keep_inside):
    with copy_of(original) as path:
        moved = path.parent / name
        (path / name).rename(moved)
        (path / name).mkdir()
        if keep_inside:
            moved.rename(path / name / name)
        with pytest.raises(ArtifactError, match="is a directory") as caught:
            sparsecc.load(path)
        assert name in str(caught.value)


@settings(max_examples=10, **CASES)
@given(name=st.sampled_from(LAYOUT))
def test_a_removed_file_is_refused(original, name):
    with copy_of(original) as path:
        (path / name).unlink()
        with pytest.raises(ArtifactError, match=f"{name} is missing"):
            sparsecc.load(path)


def test_a_subdirectory_or_fifo_is_refused(original):
    with copy_of(original) as path:
        (path / "more").mkdir()
        with pytest.raises(ArtifactError, match="more is a directory the manifest does not list"):
            sparsecc.load(path)
    with copy_of(original) as path:
        (path / "graph.json").unlink()
        os.mkfifo(path / "graph.json")  # opening it for reading would block: it is refused before that
        with pytest.raises(ArtifactError, match="graph.json is not a plain file"):
            sparsecc.load(path)


# -- manifest content ---------------------------------------------------------------------------------------------


def edit_manifest(path: Path, edit, *, reseal: bool) -> None:
    """Change manifest.json as `edit` says; `reseal`: then rewrite its own hash to match, as an attacker would."""
    manifest = json.loads((path / "manifest.json").read_text())
    edit(manifest)
    if reseal:
        manifest[store.SELF_HASH] = store.manifest_digest(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_an_edited_manifest_is_refused_unless_its_hash_is_rewritten(original):
    def wider(manifest):
        manifest["inputs"][0]["shape"] = [8, 129]

    with copy_of(original) as path:
        edit_manifest(path, wider, reseal=False)
        with pytest.raises(ArtifactError, match="manifest.json is corrupt: its content does not match"):
            sparsecc.load(path)
        edit_manifest(path, wider, reseal=True)
        assert sparsecc.load(path).input_specs == [{"shape": [8, 129], "dtype": "float32"}]


def test_an_artifact_of_format_1_without_a_manifest_hash_still_loads(original):
    def as_format_1(manifest):
        del manifest[store.SELF_HASH]
        manifest["format"] = 1

    with copy_of(original) as path:
        edit_manifest(path, as_format_1, reseal=False)
        model = sparsecc.load(path)
        torch.testing.assert_close(model(original.x), original.expected, rtol=1e-4, atol=1e-4)
        edit_manifest(path, lambda m: m.update(format=2), reseal=False)  # format 2 must carry the hash
        with pytest.raises(ArtifactError, match="manifest_sha256"):
            sparsecc.load(path)


def _set(field, value):
    return lambda manifest: manifest.__setitem__(field, value)


def _set_file_entry(name, info):
    return lambda manifest: manifest["files"].__setitem__(name, info)


WRONG_MANIFESTS = {
    "regions a list": (_set("regions", ["sparsecc_region_0"]), "'regions' must be"),
    "inputs a dict": (_set("inputs", {"shape": [8, 128]}), "'inputs' must be"),
    "inputs missing": (lambda m: m.pop("inputs"), "no 'inputs'"),
    "a shape of strings": (_set("inputs", [{"shape": ["8", "128"], "dtype": "float32"}]), "'inputs' must be"),
    "files a list": (_set("files", ["graph.json"]), "'files' must be"),
    "bytes a string": (_set_file_entry("graph.json", {"bytes": "539", "sha256": "0" * 64}), "'files' must be"),
    "target a string": (_set("target", "host"), "'target' must be"),
    "features a string": (lambda m: m["target"].__setitem__("features", "avx2"), "'target' must be"),
    "num_threads a string": (_set("options", {"num_threads": "2"}), "'options' must be"),
    "num_threads zero": (_set("options", {"num_threads": 0}), "options this sparsecc does not take"),
    "thread_pool unknown": (_set("options", {"thread_pool": "fork"}), "options this sparsecc does not take"),
    "format a bool": (_set("format", True), "no format version"),
    "format zero": (_set("format", 0), "which no sparsecc writes"),
    "output_tree a list": (_set("output_tree", [1]), "'output_tree' must be"),
    "a region name with a dot": (lambda m: m.update(regions={"a.b": []}), "'regions' must be"),
    "a region that is an nn.Module method": (lambda m: m["regions"].update(forward=[]), "region forward"),
    "the manifest a list": (None, "no format version"),
    "a duplicate key": (None, "a key appears twice"),
    "a deep nest": (None, "corrupt"),
}


@pytest.mark.parametrize("case", WRONG_MANIFESTS)
def test_manifest_fields_of_the_wrong_type_are_artifact_errors(original, case):
    edit, message = WRONG_MANIFESTS[case]
    with copy_of(original) as path:
        if case == "the manifest a list":
            (path / "manifest.json").write_text("[1, 2]")
        elif case == "a duplicate key":
            text = (path / "manifest.json").read_text()
            (path / "manifest.json").write_text(text.replace('"format"', '"library": "plan.json",\n "format"', 1))
        elif case == "a deep nest":
            (path / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
        else:
            edit_manifest(path, edit, reseal=True)
        with watched_library_loads(original), pytest.raises(ArtifactError, match=message):
            sparsecc.load(path)


# -- hostile content with every hash rewritten --------------------------------------------------------------------


def reseal(path: Path) -> None:
    """Rewrite the manifest's file table and its own hash to match the directory: what someone who edits an
    artifact and wants it to load would do."""
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"] = {f.name: {"bytes": f.stat().st_size, "sha256": store.sha256(f)}
                         for f in sorted(path.iterdir()) if f.name != "manifest.json"}
    manifest[store.SELF_HASH] = store.manifest_digest(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def edit_graph(path: Path, edit) -> None:
    graph = json.loads((path / "graph.json").read_text())
    edit(graph["nodes"])
    (path / "graph.json").write_text(json.dumps(graph))
    reseal(path)


def touch_code(marker: Path) -> str:
    return f"__import__('pathlib').Path({str(marker)!r}).touch()"


def call_before_output(target, args, kwargs=None, name="hostile"):
    def edit(nodes):
        node = {"name": name, "op": "call_function", "target": target, "args": args}
        if kwargs is not None:
            node["kwargs"] = kwargs
        nodes.insert(len(nodes) - 1, node)

    return edit


def rename_placeholder(new):
    def edit(nodes):
        old = nodes[0]["name"]
        text = json.dumps(nodes).replace(json.dumps(old), json.dumps(new))
        nodes[:] = json.loads(text)

    return edit


def node_field(index, field, value):
    return lambda nodes: nodes[index].__setitem__(field, value)


# Each gets the marker file it would create if anything in it ran.
HOSTILE_GRAPHS = {
    "builtins.eval": lambda m: call_before_output("builtins.eval", [touch_code(m)]),
    "os.system": lambda m: call_before_output("os.system", [f"touch {m}"]),
    "builtin::eval": lambda m: call_before_output("builtin::eval", [touch_code(m)]),
    "aten::eval": lambda m: call_before_output("aten::eval", [touch_code(m)]),
    "a python getattr path": lambda m: call_before_output("aten::__class__.__init__", [touch_code(m)]),
    "a namespace attribute": lambda m: call_before_output("aten::name.format", [touch_code(m)]),
    "a packet method": lambda m: call_before_output("aten::add.__call__", [touch_code(m)]),
    "a dotted overload": lambda m: call_before_output("aten::add.Tensor.__call__", [touch_code(m)]),
    "torch.ops.load_library": lambda m: call_before_output("torch::ops.load_library", [str(m)]),
    "an op of another library": lambda m: call_before_output("sparsecc_test_ext::twice.default", [1]),
    "a placeholder name with a default": lambda m: rename_placeholder(f"x={touch_code(m)}"),
    "a node name with a statement": lambda m: node_field(2, "name", f"getitem\n    {touch_code(m)}\n    y"),
    "a keyword argument name": lambda m: call_before_output(
        "aten::add.Tensor", [{"node": "getitem"}, 1.0], {f"alpha={touch_code(m)},beta": 1}),
    "a get_attr path to module globals": lambda m: _with_get_attr("__class__.__init__.__globals__"),
    "a get_attr target with a quote": lambda m: _with_get_attr(f'x") or {touch_code(m)} or getattr(self, "y'),
    "a call_module that is a method": lambda m: node_field(1, "target", "register_buffer"),
    "a call_module path": lambda m: node_field(1, "target", "__class__.__init__.__globals__.clear"),
    "an argument that is not a tagged value": lambda m: call_before_output(
        "aten::add.Tensor", [{"node": "getitem"}, {"eval": touch_code(m)}]),
    "a reference to a later node": lambda m: node_field(1, "args", [{"node": "getitem"}]),
    "an output without arguments": lambda m: node_field(3, "args", []),
    "nodes after the output": lambda m: lambda nodes: nodes.append(dict(nodes[0], name="late")),
    "no nodes": lambda m: lambda nodes: nodes.clear(),
}


def _with_get_attr(target):
    def edit(nodes):
        nodes.insert(1, {"name": "sneaky", "op": "get_attr", "target": target})

    return edit


@pytest.mark.parametrize("case", HOSTILE_GRAPHS)
def test_graph_json_cannot_name_anything_but_aten_ops(original, case):
    with copy_of(original) as path:
        marker = path.parent / "ran"
        edit_graph(path, HOSTILE_GRAPHS[case](marker))
        with pytest.raises(ArtifactError, match="graph.json"):
            model = sparsecc.load(path)
            model(original.x)  # nothing above raised: whatever it holds would run now
        assert not marker.exists(), "content of graph.json ran"


def test_a_weight_name_cannot_reach_python_source(original):
    from safetensors.torch import load_file, save_file

    with copy_of(original) as path:
        marker = path.parent / "ran"
        weights = load_file(str(path / "weights.safetensors"))
        weights[f'w") or {touch_code(marker)} or ("'] = torch.zeros(1)
        weights["__class__"] = torch.zeros(1)  # shadows an attribute of nn.Module
        save_file(weights, str(path / "weights.safetensors"))
        reseal(path)
        with pytest.raises(ArtifactError, match="weights.safetensors"):
            sparsecc.load(path)
        assert not marker.exists()


@pytest.mark.parametrize("library, message", [
    ("../kernels.so", "'library' must be"),
    ("/tmp/kernels.so", "'library' must be"),
    ("graph.json", "'library' must be"),
    ("other.so", "not one of the files it lists"),
])
def test_the_library_is_a_listed_plain_file(original, library, message):
    with copy_of(original) as path:
        edit_manifest(path, _set("library", library), reseal=True)
        with watched_library_loads(original), pytest.raises(ArtifactError, match=message):
            sparsecc.load(path)


@pytest.mark.parametrize("name", ["../escape.txt", "/etc/hostname", "sub/graph.json", ".", ""])
def test_file_table_names_are_plain(original, name):
    with copy_of(original) as path:
        edit_manifest(path, _set_file_entry(name, {"bytes": 0, "sha256": hashlib.sha256(b"").hexdigest()}),
                      reseal=True)
        with pytest.raises(ArtifactError, match="'files' must be a table of plain file names"):
            sparsecc.load(path)


def test_a_kernel_tar_with_a_link_is_refused_before_tvm_sees_it(original):
    with copy_of(original) as path:
        link = tarfile.TarInfo("lib0.o")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        with tarfile.open(path / "kernels.tar", "w") as tar:
            tar.addfile(link)
        (path / "kernels.so").unlink()
        edit_manifest(path, _set("library", "kernels.tar"), reseal=False)
        reseal(path)
        with watched_library_loads(original), pytest.raises(ArtifactError, match="not a plain object file"):
            sparsecc.load(path)


def test_a_library_changed_after_its_check_is_not_the_one_loaded(original):
    import tvm

    real = tvm.runtime.load_module
    seen = []

    def swap_then_load(library_path, *args, **kwargs):
        # Someone replaces the artifact's library between the hash check and the load: what TVM is handed must
        # still be the checked bytes (a private copy), never the artifact's file.
        (path / "kernels.so").write_bytes(b"\0" * original.size("kernels.so"))
        seen.append((Path(library_path).parent != path, store.sha256(Path(library_path))))
        return real(library_path, *args, **kwargs)

    with copy_of(original) as path, mock.patch.object(tvm.runtime, "load_module", swap_then_load):
        model = sparsecc.load(path)
        torch.testing.assert_close(model(original.x), original.expected, rtol=1e-4, atol=1e-4)
    assert seen == [(True, original.library_sha256)]


def test_rebuilding_at_the_same_path_loads_the_new_kernels_in_the_same_process(original, tmp_path):
    # dlopen of a path already loaded returns the library loaded first, whatever the file now holds: loading the
    # artifact's own kernels.so, the second load ran the first build's kernels (a shape mismatch in TVM here).
    path = tmp_path / "rebuilt"
    shutil.copytree(original.path, path)
    torch.testing.assert_close(sparsecc.load(path)(original.x), original.expected, rtol=1e-4, atol=1e-4)
    other = nn.Linear(128, 64).eval()
    magnitude_prune_(other.weight, 0.9)
    sparsecc.export(other, (original.x,), path, **TEST_OPTIONS)
    with torch.no_grad():
        torch.testing.assert_close(sparsecc.load(path)(original.x), other(original.x), rtol=1e-4, atol=1e-4)
