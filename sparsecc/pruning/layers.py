"""The prunable weights of a canonical graph (after analysis) and what the calibration pass learns about them.

A weight is prunable when it is a 2-D floating constant that only feeds linear-layer products (mm, addmm, linear,
matmul) and is large enough to be worth a sparse kernel. One pass of the graph over the calibration batches (an FX
interpreter) accumulates, per weight, the Gram matrix H = X^T X of the rows each use multiplies it by, and keeps
the graph's outputs, against which the pruned graph's error is measured.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
from typing import Any, Sequence

import torch
from torch import fx

from sparsecc.formats import WeightSparsity
from sparsecc.passes.analyze_weights import META_KEY
from sparsecc.passes.graph_utils import constant_of
from sparsecc.progress import progress_bar
from sparsecc.pruning.patterns import Pattern
from sparsecc.settings import Settings

log = logging.getLogger(__name__)

aten = torch.ops.aten

# (op, operand position) -> the weight's role: "right" (x @ W, W stored (in, out)), "linear" (F.linear, W stored
# (out, in)) or "left" (W @ x, W stored (out, in), x (..., in, tokens)).
ROLES = {
    (aten.mm.default, 1): "right", (aten.addmm.default, 2): "right", (aten.matmul.default, 1): "right",
    (aten.linear.default, 1): "linear",
    (aten.mm.default, 0): "left", (aten.addmm.default, 1): "left", (aten.matmul.default, 0): "left",
}
_OPS = {str(op): op for op, _ in ROLES}


@dataclasses.dataclass(frozen=True)
class Layer:
    attr: str  # the constant's attribute on the graph module
    name: str  # the user's name of the weight
    stored_right: bool  # stored (in, out): the (out, in) matrix is its transpose
    uses: tuple[tuple[str, str, int], ...]  # (matmul node name, role, operand position)
    shape: tuple[int, int]  # (out, in)
    tokens: int  # rows multiplied by it per call, over all uses

    def matrix(self, gm: fx.GraphModule) -> torch.Tensor:
        tensor = getattr(gm, self.attr)
        return tensor.t() if self.stored_right else tensor

    def stored(self, matrix: torch.Tensor) -> torch.Tensor:
        return (matrix.t() if self.stored_right else matrix).contiguous()

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


def prunable_layers(gm: fx.GraphModule, settings: Settings,
                    pattern: Pattern) -> tuple[list[Layer], dict[str, str]]:
    """The weights to prune, in graph order, and why each other analysed weight is left alone (name -> reason)."""
    include = settings.prune.include if settings.prune else None
    layers: list[Layer] = []
    skipped: dict[str, str] = {}
    for node in gm.graph.nodes:
        w: WeightSparsity | None = node.meta.get(META_KEY) if node.op == "get_attr" else None
        if w is None:
            continue
        reason = _unprunable(gm, node, w, settings, pattern, include)
        if reason:
            skipped[w.name] = reason
            continue
        roles = [(u.node, ROLES[(_OPS[u.op], u.operand)], u.operand) for u in w.uses]
        right = roles[0][1] == "right"
        layers.append(Layer(str(node.target), w.name, right, tuple(roles), tuple(w.matrix),
                            sum(u.tokens for u in w.uses)))
    return layers, skipped


def _unprunable(gm: fx.GraphModule, node: fx.Node, w: WeightSparsity, settings: Settings, pattern: Pattern,
                include: Sequence[str] | None) -> str | None:
    if include is not None and not any(fnmatch.fnmatchcase(w.name, p) for p in include):
        return "not in prune.include"
    tensor = constant_of(gm, node)
    if tensor is None or tensor.dim() != 2 or not tensor.is_floating_point():
        return "not a 2-D floating weight"
    bad = [u.op for u in w.uses if (_OPS.get(u.op), u.operand) not in ROLES]
    if bad:
        return f"also used by {bad[0]} (only linear-layer products are pruned)"
    roles = {ROLES[(_OPS[u.op], u.operand)] == "right" for u in w.uses}
    if len(roles) > 1:
        return "used both as (in, out) and (out, in)"
    if tensor.numel() < settings.min_weight_numel:
        return f"fewer than min_weight_numel={settings.min_weight_numel} elements"
    if not pattern.fits(tuple(w.matrix)):
        return f"pattern {pattern.label} does not fit a {w.matrix[0]}x{w.matrix[1]} (out x in) matrix"
    return None


def activation_rows(role: str, args: Sequence[Any], pos: int) -> torch.Tensor:
    """The (rows, in) inputs one use multiplies the weight (operand `pos` of `args`) by."""
    if role == "linear":
        x = args[0]
    elif role == "right":  # mm(x, W), addmm(b, x, W), matmul(x, W)
        x = args[pos - 1]
    else:  # mm(W, x), addmm(b, W, x), matmul(W, x): x is (..., in, tokens)
        x = args[pos + 1]
        return x.transpose(-1, -2).reshape(-1, x.shape[-2])
    return x.reshape(-1, x.shape[-1])


@dataclasses.dataclass
class Statistics:
    grams: dict[str, torch.Tensor]  # attr -> (in, in) float64, summed over every calibration row
    outputs: list[Any]  # the graph's outputs on each calibration batch


def gather_statistics(gm: fx.GraphModule, layers: Sequence[Layer], batches: Sequence[tuple]) -> Statistics:
    """One pass over the calibration batches."""
    by_node = {node: (layer, role, pos) for layer in layers for node, role, pos in layer.uses}
    grams = {layer.attr: torch.zeros(layer.shape[1], layer.shape[1], dtype=torch.float64) for layer in layers}

    class Collector(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            result = super().run_node(n)
            hit = by_node.get(n.name)
            if hit is not None:
                layer, role, pos = hit
                args = self.fetch_args_kwargs_from_env(n)[0]
                x = activation_rows(role, args, pos).to(torch.float64)
                grams[layer.attr].add_(x.T @ x)
            return result

    outputs = []
    update, close = progress_bar(len(batches), "sparsecc prune: calibration", "batch")
    try:
        with torch.no_grad():
            for batch in batches:
                outputs.append(Collector(gm).run(*_copies(batch)))
                update(1, "")
    finally:
        close()
    return Statistics(grams, outputs)


def _copies(batch: Sequence[Any]) -> list[Any]:
    return [a.clone() if isinstance(a, torch.Tensor) else a for a in batch]


def outputs_with(gm: fx.GraphModule, values: dict[str, torch.Tensor], batches: Sequence[tuple]) -> list[Any]:
    """The graph's outputs on `batches` with some constants (attr -> value as stored) replaced, then put back."""
    originals = {attr: getattr(gm, attr) for attr in values}
    try:
        for attr, value in values.items():
            setattr(gm, attr, value)
        with torch.no_grad():
            return [gm(*_copies(batch)) for batch in batches]
    finally:
        for attr, tensor in originals.items():
            setattr(gm, attr, tensor)
