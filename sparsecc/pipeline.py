"""The pipeline: an explicit ordered tuple of stages, run by a small runner that logs, lints and wraps
failures with the stage name. Each stage reads the previous stage's product from the state and adds its own.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Sequence

import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp

from sparsecc.capture import CapturedGraph, capture
from sparsecc.errors import SparseccError, StageError
from sparsecc.formats import SparsePlan
from sparsecc.ops import SPARSE_OPS
from sparsecc.passes.analyze_weights import analyze_weights
from sparsecc.passes.fuse_attention import fuse_attention
from sparsecc.passes.fuse_epilogues import fuse_epilogues
from sparsecc.passes.partition_regions import partition_regions
from sparsecc.passes.plan_formats import plan_formats
from sparsecc.passes.rewrite_sparse import rewrite_sparse
from sparsecc.passes.simplify_layer_norm import simplify_layer_norm
from sparsecc.settings import STAGES, Settings
from sparsecc.tolerances import assert_outputs_close

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PipelineState:
    settings: Settings
    source: fx.GraphModule  # the graph as dynamo (or the AOT entry) gave it
    example_inputs: Sequence[Any]
    weight_names: dict[int, str] | None = None  # user names of weight inputs the graph does not carry (AOT)
    captured: CapturedGraph | None = None
    gm: fx.GraphModule | None = None  # the current canonical graph
    plan: SparsePlan | None = None
    irmodule: Any = None  # tvm.IRModule
    executable: Any = None  # tvm.runtime.Executable of all regions
    target: Any = None  # the tvm.target.Target it was built for
    vm: Any = None  # tvm.relax.VirtualMachine; None when the target is not this machine
    sparse_ops: int = 0  # sparsecc:: ops in the rewritten graph
    regions: tuple[str, ...] = ()  # names of the regions built by TVM
    dense_backend: str | None = None  # where a graph without regions runs: "eager" or "inductor"
    tuning: Any = None  # codegen.tuning.TuningReport, with the `tune` option
    completed: list[str] = dataclasses.field(default_factory=list)
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)

    def runtime_inputs(self, args: Sequence[Any]) -> list[Any]:
        return [args[i] for i in self.captured.input_positions]

    def run(self, args: Sequence[Any]) -> Any:
        """Run what the pipeline produced so far on the source graph's full argument list."""
        if self.gm is None:
            return self.source(*args)
        # forward rather than __call__: nothing hooks this internal module, and the dispatch costs a few us a call.
        if torch.is_grad_enabled():
            with torch.no_grad():
                return self.gm.forward(*self.runtime_inputs(args))
        return self.gm.forward(*self.runtime_inputs(args))


def _capture(s: PipelineState) -> None:
    s.captured = capture(s.source, s.example_inputs, s.settings, s.weight_names)
    s.gm = s.captured.gm


def _analysis(s: PipelineState) -> None:
    analyze_weights(s.gm, s.settings)


def _plan(s: PipelineState) -> None:
    s.plan = plan_formats(s.gm, s.settings)


def _rewrite(s: PipelineState) -> None:
    rewrite_sparse(s.gm, s.settings, s.plan)
    fuse_epilogues(s.gm, s.settings)
    s.sparse_ops = sum(1 for n in s.gm.graph.nodes if n.op == "call_function" and n.target in SPARSE_OPS)
    # Attention and layer norm as sparsecc's own kernels let a transformer encoder be one region (BERT-base at 90 %:
    # about 15 % faster than PyTorch's ops between regions, docs/benchmarks.md). Only beside sparse ops: without
    # those there is no region for them to join.
    if s.sparse_ops:
        fuse_attention(s.gm, s.settings)
        simplify_layer_norm(s.gm, s.settings)
    # Records every node's shape for the later stages, and shows the rewritten graph runs in eager PyTorch.
    with torch.no_grad():
        ShapeProp(s.gm).propagate(*s.runtime_inputs(s.example_inputs))


def _partition(s: PipelineState) -> None:
    from sparsecc.codegen.converters import OWN_KERNEL_OPS, VIEW_OPS, can_lower

    if s.settings.offload == "all":
        supported, anchor = can_lower, can_lower
    else:
        def supported(node: fx.Node) -> bool:
            return (node.target in SPARSE_OPS or node.target in VIEW_OPS or node.target in OWN_KERNEL_OPS) \
                and can_lower(node)

        def anchor(node: fx.Node) -> bool:
            return node.target in SPARSE_OPS

    s.gm = partition_regions(s.gm, s.settings, supported, anchor)


def _lower(s: PipelineState) -> None:
    from sparsecc.codegen.importer import lower_graph

    if s.settings.tune is not None:
        from sparsecc.codegen.tuning import tune_graph

        s.tuning = tune_graph(s.gm, s.settings)
    s.irmodule = lower_graph(s.gm, s.settings)


def _build(s: PipelineState) -> None:
    from sparsecc.codegen.build import build, runs_here, virtual_machine
    from sparsecc.codegen.executable import TvmRegion
    from sparsecc.codegen.importer import region_nodes, region_weights

    regions = region_nodes(s.gm)
    if not regions:
        return
    s.executable, s.target = build(s.irmodule, s.settings)
    s.regions = tuple(call.target for call in regions)
    if not runs_here(s.target):
        log.info("build: target %s is not this machine; regions are built but not loaded", s.settings.target)
        return
    s.vm = virtual_machine(s.executable, s.settings)
    for call in regions:
        sub = s.gm.get_submodule(call.target)
        weights = {name: getattr(sub, name) for name in region_weights(sub)}
        setattr(s.gm, call.target, TvmRegion(s.vm[call.target], call.target, weights))


STAGE_FUNCS: tuple[tuple[str, Callable[[PipelineState], None]], ...] = (
    ("capture", _capture),
    ("analysis", _analysis),
    ("plan", _plan),
    ("rewrite", _rewrite),
    ("partition", _partition),
    ("lower", _lower),
    ("build", _build),
)
assert tuple(name for name, _ in STAGE_FUNCS) == STAGES


def run_pipeline(source: fx.GraphModule, example_inputs: Sequence[Any], settings: Settings,
                 weight_names: dict[int, str] | None = None) -> PipelineState:
    state = PipelineState(settings, source, example_inputs, weight_names)
    for number, (name, stage) in enumerate(STAGE_FUNCS, 1):
        start = time.perf_counter()
        try:
            stage(state)
            if state.gm is not None:
                state.gm.graph.lint()
        except StageError:
            raise
        except SparseccError as exc:
            raise StageError(name, str(exc)) from exc
        except Exception as exc:
            raise StageError(name, f"{type(exc).__name__}: {exc}") from exc
        state.completed.append(name)
        state.seconds[name] = time.perf_counter() - start
        log.info("sparsecc: [%d/%d] %s done in %.2f s", number, len(STAGE_FUNCS), name, state.seconds[name])
        if settings.stop_after == name:
            break
    if settings.verify and (state.executable is None or state.vm is not None):
        _verify(state)
    # The state outlives the call (reports, the compiled variant). Keeping the inputs would keep the weights among
    # them alive, and with them the variant: CompiledGraph releases one when its weights are freed.
    state.example_inputs = ()
    return state


def _verify(state: PipelineState) -> None:
    with torch.no_grad():
        expected = state.source(*state.example_inputs)
        actual = state.run(state.example_inputs)
    try:
        assert_outputs_close(actual, expected)
    except AssertionError as exc:
        raise StageError("verify", f"compiled graph disagrees with PyTorch on the example inputs: {exc}") from exc
