"""The outer FX graph of a compiled model <-> plain JSON, so an artifact loads without pickle or Python code.

What a compiled graph holds after partitioning is small and closed: placeholders, constants (get_attr), ATen /
prims / sparsecc:: op overloads, `operator.getitem`, calls to TVM regions (call_module) and the output.
Ops are written by their schema name and looked up again in `torch.ops` when loading, so loading resolves
registered operators only and never evaluates anything taken from the file.
"""

from __future__ import annotations

import keyword
import math
import operator
import re
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
_NON_FINITE = ("inf", "-inf", "nan")  # repr of each: what _encode writes
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_WORD = re.compile(r"[A-Za-z0-9_]+\Z")


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


def graph_from_json(data: Any, root: torch.nn.Module) -> fx.GraphModule:
    """The graph `data` (from graph_to_json) over `root`, whose buffers are the constants it may read and whose
    submodules the regions it may call. Raises ArtifactError for anything graph_to_json does not write."""
    if not isinstance(data, dict) or data.get("format") != GRAPH_FORMAT:
        found = data.get("format") if isinstance(data, dict) else None
        raise ArtifactError(f"graph format {found!r} is not {GRAPH_FORMAT}; rebuild the artifact with this sparsecc "
                            "version")
    nodes = data.get("nodes")
    if not isinstance(nodes, list) or not nodes:
        raise ArtifactError("graph has no list of nodes")
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    scope = {"get_attr": {name for name, _ in root.named_buffers(recurse=False)},
             "call_module": {name for name, _ in root.named_children()}}
    output = None
    for entry in nodes:
        if output is not None:
            raise ArtifactError("graph has nodes after its output")
        node = _add_node(graph, entry, env, scope)
        output = node if node.op == "output" else None
    if output is None:
        raise ArtifactError("graph has no output node")
    return fx.GraphModule(root, graph)


def _add_node(graph: fx.Graph, entry: Any, env: dict[str, fx.Node], scope: dict[str, set[str]]) -> fx.Node:
    if not isinstance(entry, dict):
        raise ArtifactError(f"graph node {_short(entry)} is not a record")
    # Names and targets become Python source when fx compiles the graph (a placeholder's name is a parameter of
    # forward), so each must be a plain identifier: anything else could carry code.
    name = _identifier(entry.get("name"), "node name")
    if name in env:
        raise ArtifactError(f"graph node name {name!r} is repeated")
    op, args, kwargs = entry.get("op"), _decode_args(entry, env), _decode_kwargs(entry, env)
    if op == "placeholder" and not args and not kwargs:
        node = graph.placeholder(name)
        # forward's signature is written from the target: make it the name fx chose, which the graph's globals
        # (torch, ...) are then named around.
        node.target = node.name
    elif op in scope:
        node = graph.create_node(op, _scoped_target(entry, scope[op], op), args, kwargs, name=name)
    elif op == "call_function":
        node = graph.create_node(op, _resolve_target(entry.get("target")), args, kwargs, name=name)
    elif op == "output" and len(args) == 1 and not kwargs:
        node = graph.output(args[0])
    else:
        raise ArtifactError(f"graph node '{name}' has an unknown kind {op!r} or arguments it cannot take")
    env[name] = node
    return node


def _identifier(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _IDENTIFIER.match(value) or keyword.iskeyword(value):
        raise ArtifactError(f"graph {what} {_short(value)} is not a plain identifier")
    return value


def _scoped_target(entry: dict[str, Any], allowed: set[str], op: str) -> str:
    """A get_attr / call_module target: one of root's own constants / regions by name. fx resolves a dotted target
    attribute by attribute, which from an nn.Module reaches its class, methods and module globals."""
    # fx writes a target that is not an identifier (nn.Sequential's "3_bias") as getattr(self, "<target>"), unescaped:
    # word characters only, so no quote can end that string.
    target = entry.get("target")
    if not isinstance(target, str) or not _WORD.match(target):
        raise ArtifactError(f"graph {op} target {_short(target)} is not a plain attribute name")
    if target not in allowed:
        what = "constant in weights.safetensors" if op == "get_attr" else "region the manifest lists"
        raise ArtifactError(f"graph node '{entry.get('name')}' reads {target!r}, which is no {what}")
    return target


def _decode_args(entry: dict[str, Any], env: dict[str, fx.Node]) -> tuple[Any, ...]:
    args = entry.get("args", [])
    if not isinstance(args, list):
        raise ArtifactError(f"graph node '{entry.get('name')}' has args that are not a list")
    return tuple(_decode(a, env) for a in args)


def _decode_kwargs(entry: dict[str, Any], env: dict[str, fx.Node]) -> dict[str, Any]:
    kwargs = entry.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise ArtifactError(f"graph node '{entry.get('name')}' has kwargs that are not a table")
    return {_identifier(k, "keyword argument"): _decode(v, env) for k, v in kwargs.items()}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


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


def _resolve_target(name: Any) -> Any:
    """The callable a graph node names: getitem, or an op overload registered in one of _NAMESPACES."""
    if not isinstance(name, str):
        raise ArtifactError(f"graph calls {_short(name)}, which is not an op name")
    namespace, _, rest = name.partition("::")
    if namespace == "builtin" and rest in BUILTINS:
        return BUILTINS[rest]
    if namespace not in _NAMESPACES:
        raise ArtifactError(f"graph calls {name!r}, which is not an op an artifact may call")
    op_name, _, overload = rest.partition(".")
    overload = overload or "default"
    if not (_IDENTIFIER.match(op_name) and _IDENTIFIER.match(overload)):
        raise ArtifactError(f"graph calls {name!r}, which is not an op name (namespace::op.overload)")
    try:
        op = getattr(getattr(getattr(torch.ops, namespace), op_name), overload)
    except (AttributeError, RuntimeError):
        raise ArtifactError(f"graph calls op {name}, which this torch {torch.__version__} does not have; "
                            "load the artifact with the torch version in its manifest") from None
    # getattr on a namespace or an op packet also finds their Python attributes (a dunder, a method, the class):
    # only the registered operator of exactly that name will do.
    if not (isinstance(op, torch._ops.OpOverload) and op.namespace == namespace
            and op._schema.name == f"{namespace}::{op_name}" and op._overloadname == overload):
        raise ArtifactError(f"graph calls {name!r}, which is not a registered op")
    return op


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
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if not isinstance(value, dict) or len(value) != 1:
        raise ArtifactError(f"graph argument {_short(value)} is not one an artifact holds")
    (kind, payload), = value.items()
    if kind == "node":
        if not isinstance(payload, str) or payload not in env:
            raise ArtifactError(f"graph argument refers to node {_short(payload)}, which no earlier node defines")
        return env[payload]
    if kind in ("list", "tuple") and isinstance(payload, list):
        items = [_decode(v, env) for v in payload]
        return items if kind == "list" else tuple(items)
    if kind == "float" and payload in _NON_FINITE:
        return float(payload)
    table = {"dtype": _DTYPES, "layout": _LAYOUTS, "memory_format": _FORMATS}.get(kind)
    if table is not None and isinstance(payload, str) and payload in table:
        return table[payload]
    if kind == "device" and isinstance(payload, str):
        try:
            return torch.device(payload)
        except RuntimeError:
            pass
    raise ArtifactError(f"graph argument {_short(value)} is not one an artifact holds")
