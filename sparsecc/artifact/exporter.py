"""sparsecc.export: a model or a torch.export program -> an artifact directory (layout in store.py)."""

from __future__ import annotations

import dataclasses
import logging
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.utils._pytree as pytree
from torch import fx
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind

from sparsecc.artifact.graph_json import graph_to_json
from sparsecc.artifact.store import write_atomically, write_json
from sparsecc.errors import InputError, SparseccError, SparseccFallbackWarning, StageError, UnsupportedError
from sparsecc.formats import SparsePlan
from sparsecc.pipeline import PipelineResult, run_pipeline
from sparsecc.settings import Settings

log = logging.getLogger(__name__)

WEIGHT_KINDS = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)


def as_program(model: torch.nn.Module | ExportedProgram, example_inputs: Sequence[Any] | None) -> ExportedProgram:
    if isinstance(model, ExportedProgram):
        return model
    if not isinstance(model, torch.nn.Module):
        raise UnsupportedError(f"sparsecc.export takes an nn.Module or a torch.export ExportedProgram, "
                               f"not {type(model).__name__}")
    if example_inputs is None:
        raise UnsupportedError("sparsecc.export(model, ...) needs example_inputs to trace the model with")
    with torch.no_grad():
        return torch.export.export(model.eval(), tuple(example_inputs))


def user_inputs(program: ExportedProgram, example_inputs: Sequence[Any] | None) -> list[torch.Tensor]:
    """The program's user inputs as a flat list; the program's own example inputs when none are given."""
    if example_inputs is None:
        if program.example_inputs is None:
            raise UnsupportedError("the program carries no example inputs; pass example_inputs")
        args, kwargs = program.example_inputs
        leaves = pytree.tree_leaves((args, kwargs))
    else:
        leaves = pytree.tree_leaves(tuple(example_inputs))
    expected = len(program.graph_signature.user_inputs)
    if len(leaves) != expected:
        raise UnsupportedError(f"the program takes {expected} inputs but {len(leaves)} example inputs were given")
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, torch.Tensor):
            raise UnsupportedError(f"input {i} is a {type(leaf).__name__}; sparsecc artifacts take tensor inputs only")
    return leaves


def lifted_inputs(program: ExportedProgram, inputs: Sequence[torch.Tensor]) -> tuple[list[Any], dict[int, str]]:
    """Every placeholder's value in the program's graph (weights first, as torch.export lifts them) and the
    user's name of each weight position (what tells capture which inputs are weights)."""
    values: list[Any] = []
    names: dict[int, str] = {}
    user = iter(inputs)
    constants = {**program.state_dict, **program.constants}
    for i, spec in enumerate(program.graph_signature.input_specs):
        if spec.kind == InputKind.USER_INPUT:
            values.append(next(user))
        elif spec.kind in WEIGHT_KINDS:
            tensor = constants[spec.target].detach()
            if spec.kind == InputKind.PARAMETER:  # folding prefers parameters when naming a folded weight
                tensor = torch.nn.Parameter(tensor, requires_grad=False)
            values.append(tensor)
            names[i] = spec.target
        else:
            raise UnsupportedError(f"program input '{spec.arg.name}' is a {spec.kind.name}; sparsecc takes "
                                   "programs whose inputs are tensors, parameters, buffers and constants")
    non_user = [s for s in program.graph_signature.output_specs if s.kind != OutputKind.USER_OUTPUT]
    if non_user:
        raise UnsupportedError(f"the program also writes {non_user[0].kind.name} '{non_user[0].target}'; export the "
                               "model in eval mode (sparsecc compiles inference graphs)")
    return values, names


def compile_program(program: ExportedProgram, inputs: Sequence[torch.Tensor], settings: Settings) -> PipelineResult:
    """The pipeline over an exported program. A failing stage falls back to the captured dense graph (with a
    SparseccFallbackWarning) unless on_failure="raise"."""
    values, names = lifted_inputs(program, inputs)
    source = program.graph_module

    def run(s: Settings) -> PipelineResult:
        # Always built: the artifact needs the executable itself, which a library from the kernel cache is not.
        return run_pipeline(source, values, dataclasses.replace(s, cache_kernels=False), names)

    try:
        return run(settings)
    except InputError:
        raise
    except SparseccError as exc:
        if settings.on_failure == "raise":
            raise
        if settings.prune is not None and not _failed_in(exc, ("capture", "analysis", "prune")):
            warnings.warn(f"{exc}. The artifact runs the pruned model in plain PyTorch instead "
                          "(on_failure='raise' raises instead).", SparseccFallbackWarning, stacklevel=3)
            return run(dataclasses.replace(settings, stop_after="prune"))
        warnings.warn(f"{exc}. The artifact runs this model in plain PyTorch instead "
                      "(on_failure='raise' raises instead).", SparseccFallbackWarning, stacklevel=3)
        return run(Settings.from_options({**settings_options(settings), "stop_after": "capture"}))


def _failed_in(exc: SparseccError, stages: Sequence[str]) -> bool:
    return isinstance(exc, StageError) and exc.stage in stages


def plan_program(program: ExportedProgram, options: Mapping[str, Any] | None = None,
                 example_inputs: Sequence[Any] | None = None) -> SparsePlan:
    """What sparsecc would choose for each weight of `program`, without building anything."""
    settings = Settings.from_options({**dict(options or {}), "stop_after": "plan", "verify": False,
                                      "on_failure": "raise"})
    return compile_program(program, user_inputs(program, example_inputs), settings).plan


def settings_options(settings: Settings) -> dict[str, Any]:
    """The options that differ from the defaults (what the manifest records)."""
    default = Settings()
    return {k: v.to_option() if hasattr(v, "to_option") else dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
            for k, v in vars(settings).items() if getattr(default, k) != v}


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def export(model: torch.nn.Module | ExportedProgram, example_inputs: Sequence[Any] | None, path: str | Path, *,
           source_file: str | Path | None = None, **options: Any) -> Path:
    """Compile `model` ahead of time and write an artifact directory at `path` that `sparsecc.load` runs in a
    process that never saw the model's code. Options are those of torch.compile(backend="sparsecc").
    `source_file`: the .pt2 the program came from, recorded (name and hash) so `sparsecc bench` can find it."""
    import tvm

    settings = Settings.from_options(options)
    program = as_program(model, example_inputs)
    inputs = user_inputs(program, example_inputs)
    state = compile_program(program, inputs, settings)
    gm = state.gm if state.gm is not None else state.captured.gm
    graph = graph_to_json(gm)  # before writing anything: an op an artifact cannot hold fails here
    constants, regions = _collect_weights(gm)
    with torch.no_grad():
        outputs = pytree.tree_leaves(gm(*inputs))

    def fill(tmp: Path) -> dict[str, Any]:
        from safetensors.torch import save_file

        write_json(tmp / "graph.json", graph)
        save_file(_unshared(constants), str(tmp / "weights.safetensors"))
        save_file({f"input_{i}": t.contiguous() for i, t in enumerate(inputs)}, str(tmp / "example_inputs.safetensors"))
        if state.plan is not None:
            (tmp / "plan.json").write_text(state.plan.to_json() + "\n")
        library = None
        if state.executable is not None:
            library = "kernels.so" if state.vm is not None else "kernels.tar"
            state.executable.export_library(str(tmp / library),
                                            fcompile=None if library.endswith(".so") else _reproducible_tar)
        return {
            "sparsecc": package_version("sparsecc"), "tvm": tvm.__version__, "torch": torch.__version__.split("+")[0],
            "target": _target_record(state), "library": library, "regions": regions,
            "inputs": [_spec(t) for t in inputs], "outputs": [_spec(t) for t in outputs],
            "output_tree": _out_tree(program), "options": settings_options(settings),
            "stages": list(state.completed), "source": _source_record(source_file),
            "sparse_weights": state.plan.sparse_weights() if state.plan else [],
        }

    path = write_atomically(path, fill)
    log.info("export: wrote %s (%d regions, %d sparse weights)", path, len(regions),
             len(state.plan.sparse_weights()) if state.plan else 0)
    return path


def _collect_weights(gm: fx.GraphModule) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """Every constant the artifact stores: `attr` for the outer graph's, `region.attr` for a region's, plus each
    region's weight order (its function's trailing parameters)."""
    from sparsecc.codegen.executable import TvmRegion
    from sparsecc.codegen.importer import region_nodes, region_weights

    constants = {str(n.target): getattr(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    regions: dict[str, list[str]] = {}
    for call in region_nodes(gm):
        module = gm.get_submodule(call.target)
        weights = module.weights if isinstance(module, TvmRegion) else {
            name: getattr(module, name) for name in region_weights(module)}
        regions[str(call.target)] = list(weights)
        constants.update({f"{call.target}.{k}": v for k, v in weights.items()})
    return constants, regions


def _unshared(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors sharing memory (tied weights); each gets its own copy.
    seen: set[int] = set()
    out = {}
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous()
        if t.untyped_storage().data_ptr() in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def _source_record(source_file: str | Path | None) -> dict[str, str] | None:
    from sparsecc.artifact.store import sha256

    if source_file is None:
        return None
    return {"file": Path(source_file).name, "sha256": sha256(Path(source_file))}


def _reproducible_tar(output: str, files: list[str], **_: Any) -> None:
    """TVM's own .tar records file times and owners, so two builds of one model would differ; this one does not."""
    import tarfile

    with tarfile.open(output, "w", format=tarfile.USTAR_FORMAT) as tar:
        for f in sorted(files, key=lambda p: Path(p).name):
            info = tar.gettarinfo(f, arcname=Path(f).name)
            info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode = 0, 0, 0, "", "", 0o644
            with open(f, "rb") as handle:
                tar.addfile(info, handle)


_reproducible_tar.output_format = "tar"


def _spec(t: torch.Tensor) -> dict[str, Any]:
    return {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}


def _out_tree(program: ExportedProgram) -> str | None:
    try:
        return pytree.treespec_dumps(program.call_spec.out_spec)
    except Exception as exc:  # a container type pytree cannot name (e.g. a model's output class)
        log.warning("export: output structure %s cannot be stored (%s); the loaded model returns a tuple",
                    program.call_spec.out_spec, exc)
        return None


def _target_record(state: PipelineResult) -> dict[str, Any]:
    from sparsecc.codegen.targets import cpu_features, target_arch, target_of

    target = state.target or target_of(state.settings)
    return {"option": state.settings.target, "arch": target_arch(target),
            "mtriple": str(target.attrs.get("mtriple", "")), "mcpu": str(target.attrs.get("mcpu", "")),
            "features": cpu_features(target)}
