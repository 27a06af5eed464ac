"""sparsecc.load: an artifact directory -> an nn.Module, without pickle and without the model's Python code.

What runs: the outer graph's ATen ops (resolved by name in torch.ops) and the TVM library the user chose to load.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree

from sparsecc.artifact.graph_json import graph_from_json
from sparsecc.artifact.store import read_manifest
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
    incomplete, corrupt, of a newer format, or built for a CPU this machine is not."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    manifest = read_manifest(path)
    _check_target(manifest, path)
    try:
        weights = load_file(str(path / "weights.safetensors"))
        graph = json.loads((path / "graph.json").read_text())
    except (SafetensorError, ValueError, OSError) as exc:
        raise ArtifactError(f"{path} is corrupt: {exc}") from None
    root = torch.nn.Module()
    regions: dict[str, list[str]] = manifest.get("regions", {})
    for name, tensor in weights.items():
        region, _, attr = name.partition(".")
        if region not in regions:
            root.register_buffer(name, tensor, persistent=False)
    if regions:
        _add_regions(root, path, manifest, weights)
    try:
        gm = graph_from_json(graph, root)
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        raise ArtifactError(f"{path / 'graph.json'} does not describe a graph this sparsecc can rebuild: "
                            f"{type(exc).__name__}: {exc}") from None
    log.info("load: %s (%d regions, target %s)", path, len(regions), manifest["target"].get("mcpu"))
    return LoadedModel(gm, manifest, path)


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
    import tvm
    from tvm import relax

    from sparsecc.codegen.build import uses_openmp
    from sparsecc.codegen.executable import TvmRegion
    from sparsecc.codegen.openmp_pool import redirect_parallel_launch
    from sparsecc.codegen.targets import configure_threads
    from sparsecc.settings import Settings

    library = path / manifest["library"]
    options = manifest.get("options", {})
    # The build machine's cache_dir means nothing here: the launcher goes to this machine's cache.
    settings = Settings(num_threads=options.get("num_threads"),
                        thread_pool=options.get("thread_pool", "auto")).resolved()
    configure_threads(settings.threads)
    try:
        if library.suffix == ".tar":
            # TVM links a .tar next to itself; the artifact may be read-only, so link a copy elsewhere.
            work = Path(tempfile.mkdtemp(prefix="sparsecc-load-"))
            shutil.copy(library, work / library.name)
            module = tvm.runtime.load_module(str(work / library.name))
        else:
            module = tvm.runtime.load_module(str(library))
            if uses_openmp(settings):
                redirect_parallel_launch(library, settings.cache_dir)
        vm = relax.VirtualMachine(module, tvm.cpu())
    except Exception as exc:
        raise ArtifactError(f"{library} could not be loaded: {type(exc).__name__}: {exc}") from None
    vm_lock = threading.Lock()  # a VirtualMachine runs one call at a time (codegen/executable.py)
    for name, attrs in manifest["regions"].items():
        try:
            region_weights = {a: weights[f"{name}.{a}"] for a in attrs}
            function = vm[name]
        except (KeyError, AttributeError) as exc:
            raise ArtifactError(f"{path} is inconsistent: region {name} lacks {exc}") from None
        root.add_module(name, TvmRegion(function, name, region_weights, vm_lock))
