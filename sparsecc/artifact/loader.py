"""sparsecc.load: an artifact directory -> an nn.Module, without pickle and without the model's Python code.

What runs: the outer graph's ATen ops (resolved by name in torch.ops, nothing else: graph_json.py) and the TVM
library the manifest names, loaded only after its bytes matched the sha256 the manifest records. Anything else a
damaged or inconsistent artifact makes fail while loading is raised as ArtifactError.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tarfile
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.utils._pytree as pytree

from sparsecc.artifact.graph_json import graph_from_json
from sparsecc.artifact.store import REBUILD, is_plain_name, parse_manifest, read_checked, verify_artifact
from sparsecc.errors import ArtifactError, InputError

log = logging.getLogger(__name__)


class LoadedModel(torch.nn.Module):
    """A loaded artifact. Call it like the model it was built from, with inputs of the shapes and dtypes it was
    built for (`input_specs`)."""

    def __init__(self, gm: torch.fx.GraphModule, manifest: dict[str, Any], path: Path):
        super().__init__()
        self.graph_module = gm
        self.manifest = manifest
        self.path = path
        self.input_specs = manifest["inputs"]
        self._out_spec = _output_structure(manifest.get("output_tree"))

    @property
    def regions(self) -> list[str]:
        return list(self.manifest.get("regions", {}))

    @property
    def region_calls(self) -> int:
        """How many times the artifact's TVM regions have run (0 would mean the sparse path was never taken)."""
        return sum(self.graph_module.get_submodule(name).calls for name in self.regions)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        inputs = pytree.tree_leaves((args, kwargs))
        self._check(inputs)
        with torch.no_grad():
            outputs = self.graph_module(*inputs)
        outputs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
        if self._out_spec is not None:
            return pytree.tree_unflatten(outputs, self._out_spec)
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def _check(self, inputs: list[Any]) -> None:
        if len(inputs) != len(self.input_specs):
            raise InputError(f"the artifact at {self.path} takes {len(self.input_specs)} inputs, got {len(inputs)}")
        for i, (value, spec) in enumerate(zip(inputs, self.input_specs)):
            if not isinstance(value, torch.Tensor):
                raise InputError(f"input {i} must be a tensor of shape {spec['shape']} and dtype {spec['dtype']}, "
                                 f"got {type(value).__name__}")
            shape, dtype = list(value.shape), str(value.dtype).removeprefix("torch.")
            if shape != spec["shape"] or dtype != spec["dtype"]:
                raise InputError(f"input {i} has shape {shape} and dtype {dtype}; the artifact at {self.path} was "
                                 f"built for shape {spec['shape']} and dtype {spec['dtype']} (rebuild it for others)")
            if value.device.type != "cpu":
                raise InputError(f"input {i} is on {value.device}; the artifact runs on the CPU")


def _output_structure(tree: str | None) -> pytree.TreeSpec | None:
    if not tree:
        return None
    try:
        return pytree.treespec_loads(tree)
    except Exception as exc:  # a container class whose module this process has not imported (e.g. transformers)
        log.warning("load: the model's output structure needs a class this process does not know (%s); outputs "
                    "come as a tuple", exc)
        return None


def load(path: str | Path) -> LoadedModel:
    """Load an artifact written by sparsecc.export or `sparsecc build`. Raises ArtifactError when it is missing,
    incomplete, corrupt, changed since the build, of a newer format, or built for a CPU this machine is not."""
    path = Path(path)
    manifest = parse_manifest(path)
    # Before the integrity check: refusing needs no trust, and an artifact for another CPU is best told as such.
    _check_target(manifest, path)
    verify_artifact(path, manifest)
    weights = _load_weights(path, manifest)
    graph = _load_graph_json(path, manifest)
    root = torch.nn.Module()
    regions: dict[str, list[str]] = manifest.get("regions", {})
    _add_constants(root, path, weights, regions)
    if regions:
        _add_regions(root, path, manifest, weights)
    with _inconsistent(path / "graph.json", "does not describe a graph this sparsecc can rebuild"):
        gm = graph_from_json(graph, root)
    _check_arity(gm, manifest, path)
    log.info("load: %s (%d regions, target %s)", path, len(regions), manifest.get("target", {}).get("mcpu"))
    return LoadedModel(gm, manifest, path)


@contextmanager
def _inconsistent(where: Path, what: str) -> Iterator[None]:
    """Whatever fails inside, for content that matched its hash but not what this sparsecc builds, becomes an
    ArtifactError naming the file: a caller of load sees one kind of error for every bad artifact."""
    try:
        yield
    except ArtifactError as exc:
        raise ArtifactError(f"{where} {what}: {exc}; {REBUILD}") from None
    except Exception as exc:
        raise ArtifactError(f"{where} {what}: {type(exc).__name__}: {exc}; {REBUILD}") from exc


def _load_weights(path: Path, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if "weights.safetensors" not in manifest["files"]:
        raise ArtifactError(f"{path} is incomplete: its manifest does not list weights.safetensors; {REBUILD}")
    # Read again by path (memory-mapped: weights can be large) after verify_artifact hashed it, so a process that
    # can write the directory could swap it in between. That changes data the safetensors parser reads, never code.
    with _inconsistent(path / "weights.safetensors", "is corrupt"):
        return load_file(str(path / "weights.safetensors"))


def _load_graph_json(path: Path, manifest: dict[str, Any]) -> Any:
    data = read_checked(path, "graph.json", manifest)
    with _inconsistent(path / "graph.json", "is corrupt"):
        return json.loads(data.decode("utf-8"))


def _add_constants(root: torch.nn.Module, path: Path, weights: dict[str, torch.Tensor],
                   regions: dict[str, list[str]]) -> None:
    with _inconsistent(path / "weights.safetensors", "holds a tensor the graph cannot hold as a constant"):
        for name, tensor in weights.items():
            region, _, attr = name.partition(".")
            if region not in regions:
                root.register_buffer(name, tensor, persistent=False)


def _check_arity(gm: torch.fx.GraphModule, manifest: dict[str, Any], path: Path) -> None:
    placeholders = sum(node.op == "placeholder" for node in gm.graph.nodes)
    if placeholders != len(manifest["inputs"]):
        raise ArtifactError(f"{path} is inconsistent: graph.json takes {placeholders} inputs, the manifest lists "
                            f"{len(manifest['inputs'])}; {REBUILD}")


def _check_target(manifest: dict[str, Any], path: Path) -> None:
    from sparsecc.codegen.targets import host_arch, host_features

    target = manifest.get("target", {})
    if not manifest.get("library"):
        return  # no kernels: the graph runs in PyTorch anywhere
    if target.get("arch") != host_arch():
        raise ArtifactError(f"{path} was built for {target.get('arch')} ({target.get('mtriple')}, "
                            f"cpu {target.get('mcpu')}); this machine is {host_arch()}. Build it with --target host "
                            "here, or run it on a matching machine")
    missing = sorted(set(target.get("features", ())) - host_features())
    if missing:
        raise ArtifactError(f"{path} was built for cpu {target.get('mcpu')}, whose instructions "
                            f"{', '.join(missing)} this CPU lacks; rebuild with target 'host' or 'x86_64'")


def _add_regions(root: torch.nn.Module, path: Path, manifest: dict[str, Any], weights: dict[str, torch.Tensor]) -> None:
    from sparsecc.codegen.executable import TvmRegion

    vm = _load_library(path, manifest)
    vm_lock = threading.Lock()  # a VirtualMachine runs one call at a time (codegen/executable.py)
    for name, attrs in manifest["regions"].items():
        try:
            region_weights = {a: weights[f"{name}.{a}"] for a in attrs}
            function = vm[name]
        except Exception as exc:  # a missing weight (KeyError) or function (TVM's own error)
            raise ArtifactError(f"{path} is inconsistent: region {name} lacks {exc}; {REBUILD}") from None
        with _inconsistent(path, f"cannot hold region {name}"):
            root.add_module(name, TvmRegion(function, name, region_weights, vm_lock))


def _load_settings(manifest: dict[str, Any], path: Path) -> Any:
    from sparsecc.codegen.targets import configure_threads
    from sparsecc.settings import Settings

    options = manifest.get("options", {})
    # The build machine's cache_dir means nothing here: the launcher goes to this machine's cache.
    with _inconsistent(path / "manifest.json", "has options this sparsecc does not take"):
        settings = Settings(num_threads=options.get("num_threads"),
                            thread_pool=options.get("thread_pool", "auto")).resolved()
    configure_threads(settings.threads)
    return settings


def _load_library(path: Path, manifest: dict[str, Any]) -> Any:
    """The library's relax VM. The library is loaded from a private copy of the bytes whose sha256 was just
    checked, so a change to the artifact after the check cannot reach the dynamic loader, and the path dlopen sees
    is new each time (the same path twice in one process would get the first library back, even after a rebuild).
    The copy goes to the temporary directory: one mounted noexec needs TMPDIR set to another."""
    import tvm
    from tvm import relax

    from sparsecc.codegen.build import uses_openmp
    from sparsecc.codegen.openmp_pool import redirect_parallel_launch

    name = manifest["library"]
    settings = _load_settings(manifest, path)
    data = read_checked(path, name, manifest)
    work = Path(os.path.realpath(tempfile.mkdtemp(prefix="sparsecc-load-")))
    try:
        library = work / name
        library.write_bytes(data)
        if library.suffix == ".tar":
            _check_tar_members(library, path / name)  # TVM untars it next to itself and links what it finds
        module = tvm.runtime.load_module(str(library))
        if library.suffix == ".so" and uses_openmp(settings):
            redirect_parallel_launch(library, settings.cache_dir)
        return relax.VirtualMachine(module, tvm.cpu())
    except ArtifactError:
        raise
    except Exception as exc:
        raise ArtifactError(f"{path / name} matches its hash but could not be loaded ({type(exc).__name__}: {exc}). "
                            f"If {tempfile.gettempdir()} is mounted noexec, set TMPDIR to a directory that is not; "
                            f"else {REBUILD} with this sparsecc and TVM") from None
    finally:
        # Unlinking a loaded library is fine: its mapping stays until the process exits.
        shutil.rmtree(work, ignore_errors=True)


def _check_tar_members(copy: Path, original: Path) -> None:
    # Only plain object files: a link, a path out of the directory or a name the linker reads as an option would
    # be more than "the library whose hash the manifest pins".
    try:
        with tarfile.open(copy) as tar:
            members = tar.getmembers()
    except (tarfile.TarError, OSError) as exc:
        raise ArtifactError(f"{original} is not a readable tar: {exc}; {REBUILD}") from None
    for member in members:
        if not member.isreg() or not is_plain_name(member.name) or member.name.startswith(("-", ".")):
            raise ArtifactError(f"{original} holds {member.name!r}, which is not a plain object file; {REBUILD}")
