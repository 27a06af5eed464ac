"""The one seam that sees both FX and TVM: partitioned FX regions -> one Relax IRModule.

Each `sparsecc_region_<i>` submodule becomes a Relax function of the same name; its sparse ops call TIR
kernels generated for their shapes. Its constants (packed weights) become trailing parameters of that function
rather than Relax constants: the library then holds code only, so weights are stored once (in torch, shared with
TVM through DLPack), an artifact can keep them in safetensors, and equal-shaped models build equal libraries.
All regions share one IRModule so they are built, and their kernels deduplicated, once.
"""

from __future__ import annotations

import logging

import tvm
from torch import fx
from tvm import relax

from sparsecc.codegen.converters import CONVERTERS, LoweringContext, dtype_name
from sparsecc.codegen.tiled_layout import plan_tiled
from sparsecc.errors import StageError
from sparsecc.passes.graph_utils import constant_of, op_name, shape_dtype
from sparsecc.passes.partition_regions import REGION_PREFIX
from sparsecc.settings import Settings

log = logging.getLogger(__name__)


def region_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_module" and str(n.target).startswith(REGION_PREFIX)]


def region_weights(sub: fx.GraphModule) -> list[str]:
    """Attribute names of the constants a region reads, in the order its Relax function takes them."""
    return [str(n.target) for n in sub.graph.nodes if n.op == "get_attr"]


def lower_graph(gm: fx.GraphModule, settings: Settings) -> tvm.IRModule:
    ctx = LoweringContext(relax.BlockBuilder(), {}, threads=settings.threads)
    for call in region_nodes(gm):
        _lower_region(ctx, call, gm.get_submodule(call.target))
    mod = ctx.bb.get()
    log.info("lower: %d regions, %d kernels", len(region_nodes(gm)), len(ctx.kernels))
    return mod


def _lower_region(ctx: LoweringContext, call: fx.Node, sub: fx.GraphModule) -> None:
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    params = []
    for ph, outer in zip(placeholders, call.args):
        info = shape_dtype(outer) or shape_dtype(ph)
        if info is None:
            raise StageError("lower", "input of the region has no static shape", node=ph.name)
        params.append(relax.Var(ph.name, relax.TensorType(info[0], dtype_name(info[1]))))
    env: dict[fx.Node, relax.Expr] = dict(zip(placeholders, params))
    for node in sub.graph.nodes:
        if node.op == "get_attr":
            value = constant_of(sub, node)
            var = relax.Var(str(node.target), relax.TensorType(tuple(value.shape), dtype_name(value.dtype)))
            params.append(var)
            env[node] = var

    ctx.tiled = plan_tiled(sub.graph)
    bb = ctx.bb
    with bb.function(str(call.target), params):
        with bb.dataflow():
            for node in sub.graph.nodes:
                if node.op == "call_function":
                    args = fx.node.map_arg(node.args, env.__getitem__)
                    try:
                        env[node] = bb.emit(CONVERTERS[node.target].convert(ctx, node, args))
                    except Exception as exc:
                        raise StageError("lower", f"conversion to Relax failed: {exc}", node=node.name,
                                         op=op_name(node)) from exc
                elif node.op == "output":
                    outs = node.args[0]
                    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
                    result = bb.emit_output(relax.Tuple([env[o] for o in outs]))
        bb.emit_func_output(result)
