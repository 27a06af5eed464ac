"""The outer FX graph of a compiled model <-> plain JSON, so an artifact loads without pickle or Python code.

What a compiled graph holds after partitioning is small and closed: placeholders, constants (get_attr), ATen /
prims / sparsecc:: op overloads, `operator.getitem`, calls to TVM regions (call_module) and the output.
Ops are written by their schema name and looked up again in `torch.ops` when loading, so loading resolves
registered operators only and never evaluates anything taken from the file.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
from torch import fx

from sparsecc.errors import ArtifactError, UnsupportedError

GRAPH_FORMAT = 1
# Python callables a graph may call besides op overloads, by the name written in the file.
BUILTINS = {"getitem": operator.getitem}
_BUILTIN_NAMES = {fn: name for name, fn in BUILTINS.items()}
_NAMESPACES = ("aten", "prims", "sparsecc")
_DTYPES = {str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)}
_LAYOUTS = {str(v).removeprefix("torch."): v for v in vars(torch).values() if isinstance(v, torch.layout)}
_FORMATS = {str(v).removeprefix("torch."): v for v in vars(torch).values() if isinstance(v, torch.memory_format)}


def graph_to_json(gm: fx.GraphModule) -> dict[str, Any]:
    nodes = []
    for node in gm.graph.nodes:
        entry: dict[str, Any] = {"name": node.name, "op": node.op}
        if node.op == "call_function":
            entry["target"] = _target_name(node)
        elif node.op in ("get_attr", "call_module"):
            entry["target"] = str(node.target)
        if node.args:
            entry["args"] = [_encode(a, node) for a in node.args]
        if node.kwargs:
            entry["kwargs"] = {k: _encode(v, node) for k, v in node.kwargs.items()}
        nodes.append(entry)
    return {"format": GRAPH_FORMAT, "nodes": nodes}


def graph_from_json(data: dict[str, Any], root: torch.nn.Module) -> fx.GraphModule:
    if data.get("format") != GRAPH_FORMAT:
        raise ArtifactError(f"graph format {data.get('format')!r} is not {GRAPH_FORMAT}; rebuild the artifact "
                            "with this sparsecc version")
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for entry in data["nodes"]:
        name, op = entry["name"], entry["op"]
        args = tuple(_decode(a, env) for a in entry.get("args", ()))
        kwargs = {k: _decode(v, env) for k, v in entry.get("kwargs", {}).items()}
        if op == "placeholder":
            node = graph.placeholder(name)
        elif op == "get_attr":
            node = graph.get_attr(entry["target"])
        elif op == "call_module":
            node = graph.call_module(entry["target"], args, kwargs)
        elif op == "call_function":
            node = graph.call_function(_resolve_target(entry["target"]), args, kwargs)
        elif op == "output":
            node = graph.output(args[0])
        else:
            raise ArtifactError(f"graph node '{name}' has an unknown kind {op!r}")
        node.name = name
        env[name] = node
    return fx.GraphModule(root, graph)


def _target_name(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        namespace = target.namespace
        if namespace not in _NAMESPACES:
            raise UnsupportedError(
                f"node '{node.name}' calls {target}, an op from library '{namespace}'; an artifact can only hold "
                f"ops of {', '.join(_NAMESPACES)} (load could not find it in another process)")
        return f"{namespace}::{target._schema.name.split('::')[-1]}.{target._overloadname}"
    if target in _BUILTIN_NAMES:
        return f"builtin::{_BUILTIN_NAMES[target]}"
    raise UnsupportedError(f"node '{node.name}' calls {target!r}, which an artifact cannot hold (only op overloads "
                           "of " + ", ".join(_NAMESPACES) + " and getitem)")


def _resolve_target(name: str) -> Any:
    namespace, _, rest = name.partition("::")
    if namespace == "builtin" and rest in BUILTINS:
        return BUILTINS[rest]
    if namespace not in _NAMESPACES:
        raise ArtifactError(f"graph calls {name!r}, which is not an op an artifact may call")
    op_name, _, overload = rest.partition(".")
    try:
        return getattr(getattr(getattr(torch.ops, namespace), op_name), overload or "default")
    except AttributeError:
        raise ArtifactError(f"graph calls op {name}, which this torch {torch.__version__} does not have; "
                            "load the artifact with the torch version in its manifest") from None


def _encode(value: Any, node: fx.Node) -> Any:
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, (list, tuple)):
        return {"list" if isinstance(value, list) else "tuple": [_encode(v, node) for v in value]}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, torch.layout):
        return {"layout": str(value).removeprefix("torch.")}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).removeprefix("torch.")}
    raise UnsupportedError(f"node '{node.name}' ({node.target}) has an argument of type {type(value).__name__} "
                           "that an artifact cannot store")


def _decode(value: Any, env: dict[str, fx.Node]) -> Any:
    if not isinstance(value, dict):
        return value
    (kind, payload), = value.items()
    if kind == "node":
        return env[payload]
    if kind in ("list", "tuple"):
        items = [_decode(v, env) for v in payload]
        return items if kind == "list" else tuple(items)
    if kind == "float":
        return float(payload)
    table = {"dtype": _DTYPES, "layout": _LAYOUTS, "memory_format": _FORMATS}.get(kind)
    if table is not None:
        return table[payload]
    if kind == "device":
        return torch.device(payload)
    raise ArtifactError(f"graph argument of unknown kind {kind!r}")
