"""What tuning measures: one kernel with the packed weight of a layer it runs, and the distinct kernels of a graph."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from typing import Any, Sequence

import numpy as np
import torch
from torch import fx

from sparsecc.codegen.converters import SparseLinearSpec
from sparsecc.codegen.importer import region_nodes
from sparsecc.ops import SPARSE_LINEAR_OPS, sparse_linear_args
from sparsecc.packing import pack_blocks, pack_ell, uniform_row_blocks
from sparsecc.passes.graph_utils import constant_of

log = logging.getLogger(__name__)


@dataclasses.dataclass
class KernelTask:
    """One kernel to tune, with the packed weight of the layer it is measured on."""

    spec: SparseLinearSpec
    indptr: torch.Tensor
    indices: torch.Tensor
    values: torch.Tensor
    bias: torch.Tensor | None = None
    layers: tuple[str, ...] = ()  # the graph nodes sharing the kernel
    nodes: tuple[fx.Node, ...] = ()

    @classmethod
    def from_weight(cls, weight: torch.Tensor, tokens: int, block: tuple[int, int] = (1, 1),
                    bias: torch.Tensor | None = None, activation: str = "none", residual: bool = False,
                    ell: bool = False) -> "KernelTask":
        """A task for `weight` (out x in, dense with zeros) applied to `tokens` rows, packed like the rewrite does
        (`ell`: block-rows padded to one length)."""
        indptr, indices, values = (pack_ell if ell else pack_blocks)(weight, block)
        spec = SparseLinearSpec(tokens, weight.shape[0], weight.shape[1], tuple(block),
                                str(weight.dtype).removeprefix("torch."), activation, residual,
                                str(indices.dtype).removeprefix("torch."), str(indptr.dtype).removeprefix("torch."),
                                uniform_row_blocks(indptr))
        return cls(spec, indptr, indices, values, bias)

    @property
    def pattern(self) -> str:
        h = hashlib.sha256()
        for t in (self.indptr, self.indices):
            t = t.detach().contiguous().cpu()
            h.update(f"{tuple(t.shape)}:{t.dtype};".encode())
            h.update(t.numpy().tobytes())
        h.update(f"values{tuple(self.values.shape)}".encode())
        return h.hexdigest()

    @property
    def stored_blocks(self) -> int:
        return int(self.values.shape[0])

    def inputs(self, seed: int = 0) -> list[np.ndarray]:
        """The kernel's arguments in order (x, indptr, indices, values, bias, res), as numpy arrays."""
        s = self.spec
        dtype = getattr(torch, s.dtype)
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(s.m, s.k, generator=g, dtype=dtype)
        bias = self.bias if self.bias is not None else torch.zeros(s.n, dtype=dtype)
        res = torch.randn(s.m, s.n, generator=g, dtype=dtype) if s.residual else torch.zeros(1, 1, dtype=dtype)
        return [t.detach().contiguous().cpu().numpy() for t in (x, self.indptr, self.indices, self.values, bias, res)]

    def reference(self, inputs: Sequence[np.ndarray]) -> np.ndarray:
        x, indptr, indices, values, bias, res = (torch.from_numpy(a) for a in inputs)
        with torch.no_grad():
            y = torch.ops.sparsecc.sparse_linear(x, indptr, indices, values, bias, self.spec.n, self.spec.activation,
                                                 res if self.spec.residual else None)
        return y.numpy()


def graph_tasks(gm: fx.GraphModule) -> list[KernelTask]:
    """The distinct sparse kernels of a partitioned graph, each with the layer it is tuned on: the one with the
    most stored blocks among those sharing the kernel."""
    groups: dict[tuple, list[KernelTask]] = {}
    for call in region_nodes(gm):
        sub = gm.get_submodule(call.target)
        placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
        outer = dict(zip(placeholders, call.args))

        def const(arg: Any) -> torch.Tensor | None:
            if not isinstance(arg, fx.Node):
                return None
            if arg.op == "placeholder" and isinstance(outer.get(arg), fx.Node):
                return constant_of(gm, outer[arg])
            return constant_of(sub, arg)

        for node in sub.graph.nodes:
            if node.op != "call_function" or node.target not in SPARSE_LINEAR_OPS:
                continue
            _, indptr, indices, values, bias, *_ = sparse_linear_args(node.args)
            packed = [const(a) for a in (indptr, indices, values)]
            if any(p is None for p in packed):
                log.warning("tune: %s.%s has no constant packed weight; its kernel keeps the default knobs",
                            call.target, node.name)
                continue
            spec = SparseLinearSpec.of(node)
            groups.setdefault(spec.key, []).append(
                KernelTask(spec, *packed, const(bias), (f"{call.target}.{node.name}",), (node,)))
    tasks = []
    for members in groups.values():
        chosen = max(members, key=lambda t: t.stored_blocks)
        tasks.append(dataclasses.replace(chosen, layers=tuple(l for t in members for l in t.layers),
                                         nodes=tuple(n for t in members for n in t.nodes)))
    return tasks
