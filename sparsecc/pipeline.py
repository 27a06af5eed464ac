"""The pipeline: an explicit ordered tuple of stages, each a function from the previous stage's product to its own
(small frozen dataclasses; the FX graph inside is edited in place by the passes). A small runner logs each stage
and its time, lints the graph, wraps failures with the stage name, and stops after `stop_after`. What the run
produced is one frozen `PipelineResult`.

Settings are resolved once here (`Settings.resolved`: threads and cache directory) and every stage gets the same
resolved settings.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import threading
import time
from typing import Any, Callable, Sequence

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.fx.passes.shape_prop import ShapeProp

from sparsecc.capture import CapturedGraph, capture
from sparsecc.errors import InputError, SparseccError, StageError
from sparsecc.formats import SparsePlan
from sparsecc.ops import SPARSE_OPS
from sparsecc.passes.analyze_weights import analyze_weights, analysed_weights
from sparsecc.passes.fold_batch_norm import fold_batch_norm
from sparsecc.passes.fuse_attention import fuse_attention
from sparsecc.passes.drop_layout_copies import drop_layout_copies
from sparsecc.passes.fuse_epilogues import fuse_epilogues
from sparsecc.passes.pack_dense_convs import pack_dense_convs
from sparsecc.passes.simplify_max_pool import simplify_max_pool
from sparsecc.passes.partition_regions import partition_regions
from sparsecc.passes.plan_formats import plan_formats
from sparsecc.passes.prune_weights import prune_weights
from sparsecc.passes.remove_dead_channels import remove_dead_channels
from sparsecc.passes.rewrite_sparse import rewrite_sparse
from sparsecc.passes.runner import run_passes
from sparsecc.passes.simplify_layer_norm import simplify_layer_norm
from sparsecc.settings import STAGES, Settings
from sparsecc.tolerances import assert_outputs_close

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------------ products

@dataclasses.dataclass(frozen=True)
class Source:
    """The entry's product: the graph as dynamo (or the AOT entry) gave it, with its example inputs."""

    graph: fx.GraphModule
    example_inputs: tuple
    weight_names: dict[int, str] | None  # user names of weight inputs the graph does not carry (AOT)


@dataclasses.dataclass(frozen=True)
class Captured:
    captured: CapturedGraph
    gm: fx.GraphModule  # the canonical graph; later stages edit it in place
    inputs: tuple  # the example inputs that stay runtime inputs (the rewrite's shape propagation runs on them)
    weights: dict[str, torch.Tensor]  # user name -> the weight tensor given (what prune={"inplace": True} writes)


@dataclasses.dataclass(frozen=True)
class Analysed(Captured):
    """Each constant weight feeding a matrix product carries its WeightSparsity in node.meta."""


@dataclasses.dataclass(frozen=True)
class Pruned(Analysed):
    """With the `prune` option, the chosen weights are pruned (new constants) and analysed again."""

    pruning: Any  # sparsecc.pruning.PruneReport; None without the option
    reference: fx.GraphModule | None  # the pruned graph in PyTorch (what the compiled graph must match)
    # user name -> pruned value shaped like the user's weight (what other input shapes of the graph compile with)
    pruned_weights: dict[str, torch.Tensor] | None


@dataclasses.dataclass(frozen=True)
class Planned(Pruned):
    plan: SparsePlan


@dataclasses.dataclass(frozen=True)
class Rewritten(Planned):
    sparse_ops: int  # sparsecc:: ops in the rewritten graph


@dataclasses.dataclass(frozen=True)
class Partitioned(Rewritten):
    """`gm` now calls `sparsecc_region_<i>` submodules."""


@dataclasses.dataclass(frozen=True)
class Lowered(Partitioned):
    irmodule: Any  # tvm.IRModule of all regions
    tuning: Any  # codegen.tuning.TuningReport, with the `tune` option
    kernel_key: str | None  # the regions' key in the kernel cache (codegen/kernel_cache.py); None: not cached
    cached_library: bytes | None  # the library the kernel cache held for them (checked), to load instead of building


@dataclasses.dataclass(frozen=True)
class Built(Lowered):
    executable: Any  # tvm.runtime.Executable of all regions; None when there is no region
    target: Any  # the tvm.target.Target it was built for
    vm: Any  # tvm.relax.VirtualMachine; None when the target is not this machine
    regions: tuple[str, ...]  # names of the regions built by TVM


def _advance(product: Any, cls: type, **new: Any) -> Any:
    return cls(**{f.name: getattr(product, f.name) for f in dataclasses.fields(product)}, **new)


# -------------------------------------------------------------------------------------------------------- stages

def _capture(s: Source, settings: Settings) -> Captured:
    captured = capture(s.graph, s.example_inputs, settings, s.weight_names)
    return Captured(captured, captured.gm, tuple(s.example_inputs[i] for i in captured.input_positions),
                    {captured.weight_names[i]: s.example_inputs[i] for i in captured.weight_positions})


def _analysis(p: Captured, settings: Settings) -> Analysed:
    analyze_weights(p.gm, settings)
    return _advance(p, Analysed)


def _prune(p: Analysed, settings: Settings) -> Pruned:
    if settings.prune is None:
        return _advance(p, Pruned, pruning=None, reference=None, pruned_weights=None)
    from sparsecc.pruning.pruner import prune_graph
    from sparsecc.pruning.write_back import pruned_user_weights, write_back

    values, report = prune_graph(p.gm, p.inputs, p.captured.input_names, settings)
    originals = {attr: getattr(p.gm, attr) for attr in values}
    run_passes(p.gm, settings, (("prune_weights", lambda g, s: prune_weights(g, values)),))
    analyze_weights(p.gm, settings)
    user_values = pruned_user_weights(p.gm, originals, p.weights)
    if settings.prune.inplace:
        write_back(user_values, p.weights)
    if settings.prune.dead_channels:
        found = remove_dead_channels(p.gm, list(analysed_weights(p.gm)))
        if any(d.removed for d in found):
            p.gm.recompile()
            # The shrunk layers' shapes, for analysis's token counts and the passes after it.
            with torch.no_grad():
                FakeTensorProp(p.gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(*p.inputs)
            analyze_weights(p.gm, settings)
        report = dataclasses.replace(report, dead_channels=tuple(found))
    # Later stages edit the graph in place; the copy keeps what they must agree with, and what runs if they fail.
    reference = fx.GraphModule(p.gm, copy.deepcopy(p.gm.graph))
    return _advance(p, Pruned, pruning=report, reference=reference, pruned_weights=user_values)


def _plan(p: Pruned, settings: Settings) -> Planned:
    from sparsecc.planning.target_pricing import pricing_for

    # After pruning, so that pruning ranks and writes back the user's own convolution weights; analysis then sees
    # the folded ones, which are what runs.
    if run_passes(p.gm, settings, (("fold_batch_norm", fold_batch_norm),))["fold_batch_norm"]:
        analyze_weights(p.gm, settings)

    with pricing_for(settings) as pricing:
        return _advance(p, Planned, plan=plan_formats(p.gm, settings, pricing))


def _rewrite(p: Planned, settings: Settings) -> Rewritten:
    gm = p.gm
    run_passes(gm, settings, (("rewrite_sparse", lambda g, s: rewrite_sparse(g, s, p.plan)),
                              ("pack_dense_convs", pack_dense_convs), ("fuse_epilogues", fuse_epilogues),
                              ("drop_layout_copies", drop_layout_copies)))
    sparse_ops = sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in SPARSE_OPS)
    # Attention and layer norm as sparsecc's own kernels let a transformer encoder be one region (BERT-base at 90 %:
    # about 15 % faster than PyTorch's ops between regions, docs/benchmarks.md). Only beside sparse ops: without
    # those there is no region for them to join.
    if sparse_ops:
        run_passes(gm, settings, (("fuse_attention", fuse_attention), ("simplify_layer_norm", simplify_layer_norm),
                                  ("simplify_max_pool", simplify_max_pool)))
    # Records every node's shape for the later stages. In a fake mode of its own, with static shapes: left to find
    # one, ShapeProp takes dynamo's, whose shape environment then gets guards on symbols it never made.
    with torch.no_grad():
        ShapeProp(gm, fake_mode=FakeTensorMode(allow_non_fake_inputs=True)).propagate(*p.inputs)
    return _advance(p, Rewritten, sparse_ops=sparse_ops)


def _partition(p: Rewritten, settings: Settings) -> Partitioned:
    from sparsecc.codegen.converters import LAYOUT_OPS, OWN_KERNEL_OPS, VIEW_OPS, can_lower

    if settings.offload == "all":
        supported, anchor = can_lower, can_lower
    else:
        def supported(node: fx.Node) -> bool:
            if node.target in LAYOUT_OPS:
                # A free view in PyTorch and a copy in TVM: it joins a region only to feed one (the phase split
                # before a direct convolution), never to end one (a channels-last output stays a view).
                return bool(node.users) and all(supported(u) for u in node.users) and can_lower(node)
            return (node.target in SPARSE_OPS or node.target in VIEW_OPS or node.target in OWN_KERNEL_OPS) \
                and can_lower(node)

        def anchor(node: fx.Node) -> bool:
            return node.target in SPARSE_OPS

    return dataclasses.replace(_advance(p, Partitioned), gm=partition_regions(p.gm, settings, supported, anchor))


def _lower(p: Partitioned, settings: Settings) -> Lowered:
    from sparsecc.codegen.importer import lower_graph

    tuning = None
    if settings.tune is not None:
        from sparsecc.codegen.tuning import tune_graph

        tuning = tune_graph(p.gm, settings)
    from sparsecc.codegen import kernel_cache

    key = _kernel_key(p.gm, settings)
    cached = kernel_cache.load(key, settings) if key is not None else None
    if cached is not None:
        return _advance(p, Lowered, irmodule=cached.irmodule, tuning=tuning, kernel_key=key,
                        cached_library=cached.library)
    return _advance(p, Lowered, irmodule=lower_graph(p.gm, settings), tuning=tuning, kernel_key=key,
                    cached_library=None)


def _kernel_key(gm: fx.GraphModule, settings: Settings) -> str | None:
    from sparsecc.codegen import kernel_cache
    from sparsecc.codegen.importer import region_nodes
    from sparsecc.codegen.targets import runs_here, target_of

    target = target_of(settings)
    if not region_nodes(gm) or not runs_here(target):
        return None
    return kernel_cache.region_key(gm, settings, target)


def _build(p: Lowered, settings: Settings) -> Built:
    from sparsecc.codegen import kernel_cache
    from sparsecc.codegen.build import build, virtual_machine
    from sparsecc.codegen.executable import TvmRegion
    from sparsecc.codegen.importer import region_nodes, region_weights
    from sparsecc.codegen.targets import runs_here

    regions = region_nodes(p.gm)
    if not regions:
        return _advance(p, Built, executable=None, target=None, vm=None, regions=())
    names = tuple(call.target for call in regions)
    if p.cached_library is not None:
        executable, target, vm = _cached_vm(p.cached_library, settings)
    else:
        executable, target = build(p.irmodule, settings)
        if not runs_here(target):
            log.info("build: target %s is not this machine; regions are built but not loaded", settings.target)
            return _advance(p, Built, executable=executable, target=target, vm=None, regions=names)
        keep = None if p.kernel_key is None else (
            lambda library: kernel_cache.store(p.kernel_key, settings, p.irmodule, library))
        vm = virtual_machine(executable, settings, keep)
    vm_lock = threading.Lock()
    for call in regions:
        sub = p.gm.get_submodule(call.target)
        weights = {name: getattr(sub, name) for name in region_weights(sub)}
        setattr(p.gm, call.target, TvmRegion(vm[call.target], call.target, weights, vm_lock))
    return _advance(p, Built, executable=executable, target=target, vm=vm, regions=names)


def _cached_vm(library: bytes, settings: Settings) -> tuple[Any, Any, Any]:
    """(module, target, VM) of a library from the kernel cache, loaded from this compile's own copy of it."""
    import tempfile
    from pathlib import Path

    from sparsecc.codegen import kernel_cache
    from sparsecc.codegen.build import library_vm
    from sparsecc.codegen.targets import configure_threads, target_of

    configure_threads(settings.threads)
    with tempfile.TemporaryDirectory(prefix="sparsecc-kernels-") as work:
        copy = Path(work) / kernel_cache.LIBRARY
        copy.write_bytes(library)
        module, vm = library_vm(copy, settings)
        return module, target_of(settings), vm


STAGE_FUNCS: tuple[tuple[str, Callable[[Any, Settings], Any]], ...] = (
    ("capture", _capture),
    ("analysis", _analysis),
    ("prune", _prune),
    ("plan", _plan),
    ("rewrite", _rewrite),
    ("partition", _partition),
    ("lower", _lower),
    ("build", _build),
)
assert tuple(name for name, _ in STAGE_FUNCS) == STAGES


# -------------------------------------------------------------------------------------------------------- result

@dataclasses.dataclass(frozen=True)
class PipelineResult:
    """What a pipeline run produced, as far as it went (`completed`). It holds no example inputs: they would keep
    the weights among them alive, and with them the compiled variant (CompiledGraph releases one when its weights
    are freed)."""

    settings: Settings  # resolved
    source: fx.GraphModule  # the graph as dynamo (or the AOT entry) gave it
    completed: tuple[str, ...]
    seconds: dict[str, float]
    captured: CapturedGraph | None = None
    gm: fx.GraphModule | None = None  # the current canonical graph
    pruning: Any = None  # sparsecc.pruning.PruneReport, with the `prune` option
    reference: fx.GraphModule | None = None  # the pruned graph in PyTorch, on the runtime inputs
    pruned_weights: dict[str, torch.Tensor] | None = None  # user name -> pruned value, shaped like the user's weight
    plan: SparsePlan | None = None
    sparse_ops: int = 0
    irmodule: Any = None
    tuning: Any = None
    kernels_from_cache: bool = False  # lowering and the build skipped (codegen/kernel_cache.py)
    executable: Any = None
    target: Any = None
    vm: Any = None
    regions: tuple[str, ...] = ()
    dense_backend: str | None = None  # where a graph without regions runs ("eager" | "inductor"), set by the runtime

    @classmethod
    def of(cls, product: Any, source: fx.GraphModule, settings: Settings, completed: Sequence[str],
           seconds: dict[str, float]) -> "PipelineResult":
        """The result after the stage that made `product`, with what that product and those before it hold."""
        kept = {f.name for f in dataclasses.fields(cls)}
        fields = {f.name: getattr(product, f.name) for f in dataclasses.fields(product) if f.name in kept}
        return cls(settings=settings, source=source, completed=tuple(completed), seconds=seconds,
                   kernels_from_cache=getattr(product, "cached_library", None) is not None, **fields)

    def runtime_inputs(self, args: Sequence[Any]) -> list[Any]:
        return [args[i] for i in self.captured.input_positions]

    def run(self, args: Sequence[Any]) -> Any:
        """Run what the pipeline produced on the source graph's full argument list."""
        if self.gm is None:
            return self.source(*args)
        # forward rather than __call__: nothing hooks this internal module, and the dispatch costs a few us a call.
        if torch.is_grad_enabled():
            with torch.no_grad():
                return self.gm.forward(*self.runtime_inputs(args))
        return self.gm.forward(*self.runtime_inputs(args))


def run_pipeline(source: fx.GraphModule, example_inputs: Sequence[Any], settings: Settings,
                 weight_names: dict[int, str] | None = None) -> PipelineResult:
    settings = settings.resolved()
    product: Any = Source(source, tuple(example_inputs), weight_names)
    completed: list[str] = []
    seconds: dict[str, float] = {}
    for number, (name, stage) in enumerate(STAGE_FUNCS, 1):
        start = time.perf_counter()
        try:
            product = stage(product, settings)
            product.gm.graph.lint()
        except (StageError, InputError):
            raise
        except SparseccError as exc:
            raise StageError(name, str(exc)) from exc
        except Exception as exc:
            raise StageError(name, f"{type(exc).__name__}: {exc}") from exc
        completed.append(name)
        seconds[name] = time.perf_counter() - start
        log.info("sparsecc: [%d/%d] %s done in %.2f s", number, len(STAGE_FUNCS), name, seconds[name])
        if settings.stop_after == name:
            break
    result = PipelineResult.of(product, source, settings, completed, seconds)
    if settings.verify and (result.executable is None or result.vm is not None):
        _verify(result, example_inputs)
    return result


def _verify(result: PipelineResult, example_inputs: Sequence[Any]) -> None:
    # Each run on its own copy of the runtime inputs: a graph may write into them.
    def inputs() -> list[Any]:
        runtime = set(result.captured.input_positions)
        return [a.clone() if i in runtime and isinstance(a, torch.Tensor) else a for i, a in enumerate(example_inputs)]

    with torch.no_grad():
        expected = result.source(*inputs()) if result.reference is None else \
            result.reference(*result.runtime_inputs(inputs()))
        actual = result.run(inputs())
    try:
        assert_outputs_close(actual, expected)
    except AssertionError as exc:
        raise StageError("verify", f"compiled graph disagrees with PyTorch on the example inputs: {exc}") from exc
