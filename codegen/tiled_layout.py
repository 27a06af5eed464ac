"""Which values of a region pass from kernel to kernel in the token-tiled layout (bsr.token_tiled_shape).

The sparse kernels want x as (token tiles, width, tile): each weight value then multiplies a vector of tokens. A
kernel that reads row-major x first transposes it, and one that writes row-major y stores one value per token.
Attention (tokens of a tile as its query lanes) and layer norm (tokens as lanes, sums down the width) work in the
same layout. So inside a region a value is kept tiled when everything that reads it can: measured on one thread
at BERT-base shapes, a 768x768 CSR kernel took 10-12 % less with x and y tiled, a 3072x768 one about 20 %.

A producer's value is tiled when every use, through reshapes, is an operand that sees the producer's (tokens,
width) matrix and reads the producer's tile: x or the residual of a sparse_linear with that token tile, q / k / v of an
attention whose query tile it is, x of a layer norm. A use outside the region (the region's output) or by any
other op keeps it row-major.
"""

from __future__ import annotations

import math

import torch
from torch import fx

from sparsecc.codegen.converters import KNOBS_META, VIEW_OPS, SparseLinearSpec, can_lower
from sparsecc.codegen.kernels.cpu.attention import can_tile, query_tile
from sparsecc.codegen.kernels.cpu.layer_norm import token_tile
from sparsecc.ops import sparse_linear_args
from sparsecc.passes.graph_utils import shape_dtype

aten = torch.ops.aten
SPARSE_LINEAR = torch.ops.sparsecc.sparse_linear.default
ATTENTION = torch.ops.sparsecc.attention.default
LAYER_NORM = aten.layer_norm.default
RESIDUAL = 7  # position of sparse_linear's residual


def plan_tiled(graph: fx.Graph) -> dict[fx.Node, int]:
    """node -> token tile, for each node of `graph` whose value is to be token-tiled (producers and the reshapes
    between them and their readers)."""
    tiled: dict[fx.Node, int] = {}
    for node in graph.nodes:
        tile = written_tile(node)
        if tile is None:
            continue
        views = _tiled_views(node, tile)
        if views is not None:
            tiled[node] = tile
            tiled.update(dict.fromkeys(views, tile))
    return tiled


def written_tile(node: fx.Node) -> int | None:
    """The token tile `node` would write its output in, if it can write that layout at all."""
    if node.op != "call_function" or not can_lower(node):
        return None
    if node.target is SPARSE_LINEAR:
        return SparseLinearSpec.of(node).token_tile(node.meta.get(KNOBS_META))
    if node.target is ATTENTION:
        return _attention_tile(node)
    if node.target is LAYER_NORM:
        return token_tile(_tokens(node))
    return None


def read_tile(user: fx.Node, position: int) -> int | None:
    """The token tile in which `user` can read its argument at `position`, if any."""
    if user.op != "call_function" or not can_lower(user):
        return None
    if user.target is SPARSE_LINEAR and position in (0, RESIDUAL):
        return SparseLinearSpec.of(user).token_tile(user.meta.get(KNOBS_META))
    if user.target is ATTENTION and position in (0, 1, 2):
        return _attention_tile(user)
    if user.target is LAYER_NORM and position == 0:
        return token_tile(_tokens(user))
    return None


def _tiled_views(producer: fx.Node, tile: int) -> list[fx.Node] | None:
    """The reshapes between `producer` and its readers when every reader takes `tile`; None when any does not."""
    matrix = _matrix(producer)
    views: list[fx.Node] = []
    readers = 0
    pending = [(producer, user) for user in producer.users]
    while pending:
        via, user = pending.pop()
        if user.op == "call_function" and user.target in VIEW_OPS:
            # A view keeps the row-major order of the elements, so only the shape a reader finds matters.
            views.append(user)
            pending.extend((user, u) for u in user.users)
            continue
        if via in user.kwargs.values():
            return None
        args = sparse_linear_args(user.args) if user.target is SPARSE_LINEAR else user.args
        positions = [i for i, a in enumerate(args) if a is via]
        if not positions or _matrix(via) != matrix:
            return None
        if any(read_tile(user, i) != tile for i in positions):
            return None
        readers += 1
    return views if readers else None


def _matrix(node: fx.Node) -> tuple[int, int] | None:
    """(tokens, width) of a value read as a matrix over its last dimension."""
    info = shape_dtype(node)
    if info is None or not info[0]:
        return None
    shape = info[0]
    return math.prod(shape[:-1]), shape[-1]


def _tokens(node: fx.Node) -> int:
    return _matrix(node)[0]


def _attention_tile(node: fx.Node) -> int | None:
    (batch, tokens, _), dtype = shape_dtype(node)
    name = str(dtype).removeprefix("torch.")
    return query_tile(tokens, name) if can_tile(batch, tokens, name) else None
