"""Analysis: find each constant weight that feeds a matrix product or a convolution and record its sparsity.

Operands are matched in either position: nn.Linear becomes `addmm(bias, x, W^T)` with the weight on the
right, transformers' GPT-2 Conv1D is `addmm(bias, x, W)` with an (in, out) weight, and `W @ x` puts it
on the left. The result is a frozen WeightSparsity in the get_attr node's meta["sparsecc"].
"""

from __future__ import annotations

import logging

import torch
from torch import fx

from sparsecc.kernel_work import ROWS_PER_TASK, task_count, task_spans, work_prefix
from sparsecc.formats import BlockStats, WeightSparsity, WeightUse
from sparsecc.passes.fold_constants import LAYOUT, ORIGIN
from sparsecc.passes.graph_utils import constant_of
from sparsecc.passes.direct_conv import DIRECT_USE, ConvGeometry, why_not_direct
from sparsecc.passes.pointwise_conv import CONVOLUTION, POINTWISE_USE, is_channels_last, why_not_pointwise
from sparsecc.settings import Settings

log = logging.getLogger(__name__)

aten = torch.ops.aten

# op -> positions of its matrix operands
MATMUL_OPERANDS = {
    aten.mm.default: (0, 1),
    aten.addmm.default: (1, 2),
    aten.bmm.default: (0, 1),
    aten.baddbmm.default: (1, 2),
    aten.matmul.default: (0, 1),
    aten.linear.default: (1,),
}

META_KEY = "sparsecc"

# Block shapes (rows of the (out, in) matrix x columns) whose fill analysis measures; the BSR kernel takes any.
BLOCK_SHAPES = ((1, 4), (4, 1), (8, 1), (16, 1), (4, 4), (8, 8))
# Group sizes for N:M structure along the input dimension (2:4 and 4:8 are what sparse hardware and pruners use).
NM_GROUPS = (4, 8)
# The weight is the right operand here, multiplied as its transpose (in, out).
RIGHT_OPERANDS = {(aten.mm.default, 1), (aten.addmm.default, 2)}


def analyze_weights(gm: fx.GraphModule, settings: Settings) -> fx.GraphModule:
    uses: dict[fx.Node, list[WeightUse]] = {}
    right: dict[fx.Node, bool] = {}  # orientation of the first use
    for node in gm.graph.nodes:
        positions = MATMUL_OPERANDS.get(node.target) if node.op == "call_function" else None
        for pos in positions or ():
            arg = node.args[pos] if pos < len(node.args) else None
            weight = constant_of(gm, arg) if isinstance(arg, fx.Node) else None
            if weight is not None:
                uses.setdefault(arg, []).append(WeightUse(str(node.target), pos, node.name, _tokens(node, weight, pos)))
                right.setdefault(arg, (node.target, pos) in RIGHT_OPERANDS)

        if node.op == "call_function" and node.target is CONVOLUTION and isinstance(node.args[1], fx.Node):
            _add_convolution_use(gm, node, uses, right)

    threads = settings.threads
    for node, node_uses in uses.items():
        tensor = constant_of(gm, node)
        node.meta[META_KEY] = describe_weight(str(node.meta.get(ORIGIN, node.target)), tensor, right[node],
                                              tuple(node_uses), node.meta.get(LAYOUT, "strided"), threads)
    log.debug("analysis: %d weights feed matrix products", len(uses))
    return gm


def _add_convolution_use(gm: fx.GraphModule, node: fx.Node, uses: dict, right: dict) -> None:
    weight = node.args[1]
    tensor = constant_of(gm, weight)
    if tensor is None or tensor.dim() < 3:
        return
    # A 1x1 convolution sparsecc multiplies as a matrix product, a k x k one its direct kernel computes, or another
    # one (which the plan keeps dense, saying why).
    conv, reason = "", ""
    direct = why_not_direct(node, tensor) is None
    if why_not_pointwise(node, tensor) is None and not (direct and not is_channels_last(node.args[0])):
        # A 1x1 convolution over a channels-last input: its pixels are already rows of a matrix. The plan also
        # times the direct kernel (conv). Over an NCHW input the product would cost a copy into rows and one back
        # (ResNet-50 at 0 % or 80 % ran slower than eager with them), so there only the direct kernel is a candidate.
        op = POINTWISE_USE
        conv = ConvGeometry.of(node, tensor).to_json() if direct else ""
    elif (reason := why_not_direct(node, tensor)) is None:
        op, reason, conv = DIRECT_USE, "", ConvGeometry.of(node, tensor).to_json()
    else:
        op = str(CONVOLUTION)
    out = node.meta.get("val")
    tokens = int(out.numel()) // int(tensor.shape[0]) if isinstance(out, torch.Tensor) else 0
    uses.setdefault(weight, []).append(WeightUse(op, 1, node.name, tokens, conv, reason))
    right.setdefault(weight, False)


def convolution_only(uses: tuple[WeightUse, ...]) -> bool:
    """Every use of the weight is a convolution: analysis sees it as the (out, in * kh * kw) matrix."""
    return bool(uses) and all(u.op in (POINTWISE_USE, DIRECT_USE, str(CONVOLUTION)) for u in uses)


def describe_weight(name: str, tensor: torch.Tensor, right: bool, uses: tuple[WeightUse, ...], source_layout: str,
                    threads: int) -> WeightSparsity:
    """What analysis records of one weight. `right`: the weight is stored (in, out), as x @ W takes it. A
    convolution's weight (out, in / groups, kh, kw) is the matrix (out, in / groups * kh * kw)."""
    if tensor.dim() > 2 and convolution_only(uses):
        matrix = tensor.reshape(tensor.shape[0], -1)
    else:
        matrix = (tensor.t() if right else tensor) if tensor.dim() == 2 else None
    nonzero = nonzero_mask(matrix) if matrix is not None else None
    per_row = nonzero.sum(dim=1) if nonzero is not None else None
    return WeightSparsity(
        name=name,
        shape=tuple(tensor.shape),
        dtype=str(tensor.dtype).removeprefix("torch."),
        nnz=int(per_row.sum()) if per_row is not None else int(torch.count_nonzero(tensor)),
        source_layout=source_layout,
        uses=uses,
        blocks=block_stats(nonzero, threads) if nonzero is not None else (),
        nm=nm_stats(nonzero) if nonzero is not None else (),
        matrix=tuple(matrix.shape) if matrix is not None else (),
        imbalance=imbalance(per_row, (1, 1), threads) if per_row is not None else 1.0,
        row_max=int(per_row.max()) if per_row is not None and len(per_row) else 0,
    )


def nonzero_mask(matrix: torch.Tensor) -> torch.Tensor:
    """Where `matrix` is non-zero, row-major whatever the matrix's own strides (the statistics below need it)."""
    return (matrix != 0).contiguous()


def block_stats(matrix: torch.Tensor, threads: int = 1) -> tuple[BlockStats, ...]:
    """Non-empty blocks of each shape in BLOCK_SHAPES that divides the (out, in) matrix (or its non-zero mask)."""
    n, k = matrix.shape
    nonzero = matrix if matrix.dtype == torch.bool and matrix.is_contiguous() else nonzero_mask(matrix)
    return tuple(block_stat(nonzero, r, c, threads) for r, c in BLOCK_SHAPES if not (n % r or k % c))


def block_stat(nonzero: torch.Tensor, r: int, c: int, threads: int = 1) -> BlockStats:
    """Non-empty r x c blocks of a boolean (out, in) mask whose sides r and c divide, and their thread balance."""
    occupied = occupied_blocks(nonzero, r, c)
    return BlockStats(r, c, int(occupied.sum()), occupied.numel(), imbalance(occupied.sum(dim=1), (r, c), threads))


# c booleans read as one integer: non-zero exactly when one of them is set.
_AS_ONE_INTEGER = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def occupied_blocks(nonzero: torch.Tensor, r: int, c: int) -> torch.Tensor:
    """(out / r, in / c) booleans: which r x c blocks of the mask hold a non-zero. A max over the r rows of a block
    (a middle dimension: vectorised along the columns) and the c columns read as one integer; any() over a short
    innermost dimension ran one element at a time, and made analysis most of a warm BERT-base compile."""
    n, k = nonzero.shape
    rows = nonzero.contiguous().view(torch.uint8)
    if r > 1:
        rows = rows.view(n // r, r, k).amax(dim=1)
    if c == 1:
        return rows.bool()
    if c in _AS_ONE_INTEGER:  # through 1-D: a size-1 dim may carry any stride, which a dtype view refuses
        return (rows.reshape(-1).view(_AS_ONE_INTEGER[c]) != 0).view(n // r, k // c)
    return rows.view(n // r, k // c, c).amax(dim=2).bool()


def imbalance(per_block_row: torch.Tensor, block: tuple[int, int], threads: int) -> float:
    """The busiest thread's work over the mean, split as the kernel splits it: tasks spanning equal work (stored
    values plus ROW_WORK per row, `task_spans`), handed to threads in contiguous runs (TVM's static schedule). What
    stays uneven is what one block-row holds: a row with most of the non-zeros cannot be split."""
    if threads <= 1 or int(per_block_row.sum()) == 0:
        return 1.0
    tasks = task_count(len(per_block_row) * block[0], block, ROWS_PER_TASK)
    work = work_prefix(per_block_row, block)
    spans = task_spans(work, tasks)
    per_task = work[spans[1:]] - work[spans[:-1]]
    per_thread = -(-tasks // threads)
    pad = (-tasks) % per_thread
    chunks = torch.nn.functional.pad(per_task, (0, pad)).reshape(-1, per_thread).sum(dim=1)
    return round(float(chunks.max()) * threads / float(work[-1]), 4)


def _tokens(node: fx.Node, w: torch.Tensor, pos: int) -> int:
    """Rows a matrix product applies the weight to: its output's elements over the weight's output features."""
    out = node.meta.get("val")
    if not isinstance(out, torch.Tensor) or w.dim() != 2:
        return 0
    features = w.shape[1] if (node.target, pos) in RIGHT_OPERANDS else w.shape[0]
    try:
        return int(out.numel()) // int(features) if int(features) else 0
    except TypeError:  # symbolic sizes
        return 0


def nm_stats(matrix: torch.Tensor) -> tuple[tuple[int, int], ...]:
    """(most non-zeros in any group of m consecutive inputs, m) for each m in NM_GROUPS dividing the in dimension, of
    the (out, in) matrix or its non-zero mask."""
    n, k = matrix.shape
    nonzero = (matrix if matrix.dtype == torch.bool else matrix != 0).view(torch.uint8)
    stats = []
    for m in NM_GROUPS:
        if k % m:
            continue
        # The m strided columns added up (uint8 holds m <= 255): element-wise and vectorised, where a sum over a
        # short innermost dimension is not.
        counts = nonzero[:, 0::m].clone()
        for i in range(1, m):
            counts += nonzero[:, i::m]
        stats.append((int(counts.max()) if counts.numel() else 0, m))
    return tuple(stats)


def as_matrix(tensor: torch.Tensor, w: WeightSparsity) -> torch.Tensor:
    """`tensor` as the kernel multiplies it, (out, in), oriented like analysis saw its first use."""
    if tensor.dim() > 2 and convolution_only(w.uses):
        return tensor.reshape(tensor.shape[0], -1)
    first = w.uses[0]
    right = any(first.op == str(op) and first.operand == pos for op, pos in RIGHT_OPERANDS)
    return tensor.t() if right else tensor


def analysed_weights(gm: fx.GraphModule) -> dict[str, WeightSparsity]:
    """attribute name -> WeightSparsity, for every analysed constant, in graph order."""
    return {n.target: n.meta[META_KEY] for n in gm.graph.nodes if n.op == "get_attr" and META_KEY in n.meta}
