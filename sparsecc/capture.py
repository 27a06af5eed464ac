"""Capture: a dynamo GraphModule plus example inputs -> one canonical ATen-level inference graph.

Under torch.compile, parameters and buffers arrive as graph inputs marked `_dynamo_static_input_type`.
Capture binds them as constants (get_attr) and re-traces the graph with make_fx, which decomposes
torch-level calls (F.linear, module code) into the small, stable ATen op set the passes match on.
Then ops over constants are folded, so analysis sees each layer's effective weight.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any, Sequence

import torch
from torch import fx
from torch.fx.experimental.proxy_tensor import make_fx

from sparsecc.errors import UnsupportedError
from sparsecc.passes.fold_constants import LAYOUT, ORIGIN, fold_constants
from sparsecc.passes.graph_utils import add_constant, drop_unused_constants
from sparsecc.settings import Settings

log = logging.getLogger(__name__)

# Set by sparsecc.compile on dense copies of weights the user held in a torch.sparse layout (dynamo
# cannot trace sparse tensors, so they are densified before tracing; analysis still reports the layout).
SOURCE_LAYOUT_ATTR = "_sparsecc_source_layout"


@dataclasses.dataclass
class CapturedGraph:
    gm: fx.GraphModule
    input_positions: tuple[int, ...]  # positions of the dynamo inputs that stay runtime inputs
    weight_positions: tuple[int, ...]  # positions bound as constants
    weight_names: dict[int, str]  # position -> the user's name of that weight
    writes_inputs: bool = False  # an op writes into a runtime input: a failed call may have half-updated it
    input_names: tuple[str, ...] = ()  # the user's names of the runtime inputs (what calibration data is keyed by)


def is_weight(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and (
        isinstance(value, torch.nn.Parameter) or getattr(value, "_dynamo_static_input_type", None) is not None
    )


def user_name(placeholder: str) -> str:
    """'L_self_modules_encoder_modules_layer_modules_0_parameters_weight_' -> 'encoder.layer.0.weight'."""
    name = re.sub(r"^L_(self|fn|mod|model|m)_", "", placeholder, flags=re.IGNORECASE)
    name = re.sub(r"^L_", "", name, flags=re.IGNORECASE)
    name = re.sub(r"_(modules|parameters|buffers)_", ".", name)
    name = re.sub(r"^(modules|parameters|buffers)_", "", name)
    return name.strip("_")


def capture(gm: fx.GraphModule, example_inputs: Sequence[Any], settings: Settings,
            names: dict[int, str] | None = None) -> CapturedGraph:
    """`names`: position -> user name of each weight input, where the graph does not mark its weights (AOT: the
    positions of a torch.export program's parameters, buffers and constants)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        raise UnsupportedError(
            f"graph has {len(placeholders)} inputs but {len(example_inputs)} example inputs were given"
        )
    for node, value in zip(placeholders, example_inputs):
        if isinstance(value, torch.SymInt) or (
            isinstance(value, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in value.shape)
        ):
            raise UnsupportedError(f"input '{node.name}' has a symbolic shape; capture needs concrete inputs")
        if isinstance(value, torch.Tensor) and value.layout != torch.strided:
            raise UnsupportedError(
                f"input '{node.name}' is a {value.layout} tensor; sparsecc.compile(model) densifies sparse "
                "weights before tracing, torch.compile cannot trace them"
            )

    if names is not None:
        weight_pos = tuple(sorted(names))
    else:
        weight_pos = tuple(i for i, v in enumerate(example_inputs) if is_weight(v))
    input_pos = tuple(i for i in range(len(example_inputs)) if i not in weight_pos)
    constants = {i: example_inputs[i].detach() for i in weight_pos}
    names = names if names is not None else {i: user_name(placeholders[i].name) for i in weight_pos}

    def run(*inputs: Any) -> Any:
        full = list(example_inputs)
        for i, t in constants.items():
            full[i] = t
        for i, v in zip(input_pos, inputs):
            full[i] = v
        return gm(*full)

    # Functionalized: an in-place op on an intermediate (T5's `relative_buckets += ...`) becomes out of place.
    # Left in place, folding would turn that intermediate into a constant the op then writes to on every call.
    with torch.no_grad():
        traced = make_fx(torch.func.functionalize(run, remove="mutations"), tracing_mode="real")(
            *[example_inputs[i] for i in input_pos])

    _name_constants(traced, constants, names, example_inputs)
    fold_constants(traced, settings)
    _reject_weight_mutation(traced)  # after folding, so that it covers the constants folding made too
    traced.graph.lint()
    log.debug("capture: %d nodes, %d weights bound as constants", len(traced.graph.nodes), len(weight_pos))
    writes = any(node.op == "placeholder" for _, node in _written(traced))
    return CapturedGraph(traced, input_pos, weight_pos, names, writes,
                         tuple(user_name(placeholders[i].name) for i in input_pos))


def _name_constants(gm: fx.GraphModule, constants: dict[int, torch.Tensor], names: dict[int, str],
                    originals: Sequence[Any]) -> None:
    """make_fx stores closed-over tensors as `_tensor_constantN`; give them the user's names and record
    where they came from, so reports and errors speak of `encoder.layer.0.output.dense.weight`."""
    by_id = {id(t): i for i, t in constants.items()}
    for node in list(gm.graph.nodes):
        if node.op != "get_attr":
            continue
        value = getattr(gm, node.target)
        pos = by_id.get(id(value))
        if pos is None:
            continue
        new = add_constant(gm, names[pos], value, before=node)
        new.meta[ORIGIN] = names[pos]
        new.meta["sparsecc_is_parameter"] = isinstance(originals[pos], torch.nn.Parameter)
        layout = getattr(originals[pos], SOURCE_LAYOUT_ATTR, None)
        if layout is not None:
            new.meta[LAYOUT] = layout
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    drop_unused_constants(gm)


def _written(gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node]]:
    """(op node, the node it writes into) for every argument a mutable op writes."""
    pairs = []
    for node in gm.graph.nodes:
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
            continue
        if not target._schema.is_mutable:
            continue
        for arg, value in zip(target._schema.arguments, node.args):
            if arg.alias_info is not None and arg.alias_info.is_write and isinstance(value, fx.Node):
                pairs.append((node, value))
    return pairs


def _reject_weight_mutation(gm: fx.GraphModule) -> None:
    for node, value in _written(gm):
        if value.op == "get_attr":
            raise UnsupportedError(
                f"op {node.target} in node '{node.name}' writes to weight '{value.meta.get(ORIGIN, value.target)}'; "
                "sparsecc compiles inference graphs whose weights are read-only"
            )
