"""FX node -> Relax converters, keyed by exact ATen/sparsecc op overload, each with a capability check.

The partitioner asks `can_lower(node)`; the importer calls `convert`. An op without an entry, or whose
check fails (dtype, dynamic shape, unusual arguments), stays in PyTorch.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import torch
import tvm
from torch import fx
from tvm import relax

from sparsecc.codegen.kernels.cpu.attention import attention_kernel
from sparsecc.kernel_work import ACTIVATIONS as KERNEL_ACTIVATIONS
from sparsecc.kernel_work import CONV_ACTIVATIONS
from sparsecc.codegen.kernels.cpu.bsr import bsr_linear_kernel
from sparsecc.kernel_work import KernelKnobs, default_knobs, token_tiled_shape
from sparsecc.codegen.executable import aligned
from sparsecc.codegen.kernels.cpu.direct_conv import direct_conv_kernel
from sparsecc.conv_work import ConvKnobs, chunk_pointers
from sparsecc.codegen.kernels.cpu.layer_norm import layer_norm_kernel
from sparsecc.codegen.kernels.cpu.max_pool import max_pool_kernel
from sparsecc.codegen.kernels.cpu.pad import pad_kernel
from sparsecc.ops import sparse_linear_args  # also registers the sparsecc:: ops
from sparsecc.packing import uniform_row_blocks
from sparsecc.passes.graph_utils import RESHAPE_OPS, constant_of, shape_dtype

aten = torch.ops.aten

FLOAT_DTYPES = {torch.float32: "float32", torch.float64: "float64"}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclasses.dataclass
class LoweringContext:
    bb: relax.BlockBuilder
    kernels: dict[tuple, relax.GlobalVar]
    # Nodes whose Relax value is in the kernels' token-tiled layout (codegen/kernels/cpu/bsr.token_tiled_shape) rather
    # than their own shape, with their token tile: decided per region by codegen/tiled_layout.py.
    tiled: dict[fx.Node, int] = dataclasses.field(default_factory=dict)
    threads: int | None = None  # the kernels' threads: the default loop order depends on them

    def kernel(self, key: tuple, make: Callable[[], Any], name: str) -> relax.GlobalVar:
        """One PrimFunc per distinct specialisation; layers of equal shape share it."""
        if key not in self.kernels:
            self.kernels[key] = self.bb.add_func(make(), name)
        return self.kernels[key]


@dataclasses.dataclass(frozen=True)
class Converter:
    convert: Callable[[LoweringContext, fx.Node, tuple], relax.Expr]
    check: Callable[[fx.Node], bool]


CONVERTERS: dict[Any, Converter] = {}

# The "sparse" offload policy moves reshapes into regions next to sparse ops, and the ops sparsecc has its own
# kernels for (faster than PyTorch's or close, and each one in a region can save a region call), and the padding
# and phase split ahead of a direct convolution (in PyTorch they would split a chain of convolutions into regions).
VIEW_OPS = RESHAPE_OPS
OWN_KERNEL_OPS = frozenset({torch.ops.sparsecc.attention.default, aten.layer_norm.default,
                            aten.constant_pad_nd.default, aten.permute.default, aten.slice.Tensor,
                            aten.max_pool2d.default})
# Views in PyTorch, copies in TVM: they join a region only to feed it, never to end one (sparsecc/pipeline.py).
LAYOUT_OPS = frozenset({aten.permute.default, aten.slice.Tensor})


def converter(*ops: Any, check: Callable[[fx.Node], bool] | None = None):
    def register(fn):
        for op in ops:
            CONVERTERS[op] = Converter(fn, check or _static_float)
        return fn

    return register


def can_lower(node: fx.Node) -> bool:
    conv = CONVERTERS.get(node.target) if node.op == "call_function" else None
    return conv is not None and conv.check(node)


def _static(node: fx.Node) -> bool:
    return shape_dtype(node) is not None


def _static_float(node: fx.Node) -> bool:
    tensors = [n for n in node.all_input_nodes] + [node]
    infos = [shape_dtype(n) for n in tensors]
    return all(i is not None and i[1] in FLOAT_DTYPES for i in infos)


def _sparse_check(node: fx.Node) -> bool:
    x, indptr, indices, values, bias, out_features, activation, residual = sparse_linear_args(node.args)
    xs, vs = shape_dtype(x), shape_dtype(values)
    if xs is None or vs is None or len(xs[0]) != 2 or len(vs[0]) != 3 or xs[1] != vs[1] or xs[1] not in FLOAT_DTYPES:
        return False
    _, r, c = vs[0]
    if out_features % r or xs[0][1] % c:
        return False
    if shape_dtype(indptr) is None or shape_dtype(indptr)[1] != torch.int32:
        return False
    if shape_dtype(indices) is None or shape_dtype(indices)[1] not in (torch.int16, torch.int32):
        return False
    if residual is not None and shape_dtype(residual) != ((xs[0][0], out_features), xs[1]):
        return False
    if activation not in KERNEL_ACTIVATIONS:
        return False
    return bias is None or (shape_dtype(bias) is not None and shape_dtype(bias)[1] == xs[1])


@dataclasses.dataclass(frozen=True)
class SparseLinearSpec:
    """What a sparse_linear kernel is specialised to; layers with equal specs share one kernel."""

    m: int
    n: int
    k: int
    block: tuple[int, int]
    dtype: str
    activation: str
    residual: bool
    column_dtype: str
    index_dtype: str = "int32"
    # Blocks in every block-row when all rows store the same number (ELL, or pruned evenly): baked into the kernel.
    row_blocks: int | None = None

    @classmethod
    def of(cls, node: fx.Node) -> "SparseLinearSpec":
        x, indptr, indices, values, bias, out_features, activation, residual = sparse_linear_args(node.args)
        (m, k), dtype = shape_dtype(x)
        return cls(m, out_features, k, tuple(shape_dtype(values)[0][1:]), dtype_name(dtype), activation,
                   residual is not None, dtype_name(shape_dtype(indices)[1]), dtype_name(shape_dtype(indptr)[1]),
                   _row_blocks(indptr))

    @property
    def key(self) -> tuple:
        return ("sparse_linear", self.m, self.n, self.k, self.block, self.dtype, self.activation, self.residual,
                self.column_dtype, self.row_blocks)

    @property
    def name(self) -> str:
        fmt = "csr" if self.block == (1, 1) else f"bsr{self.block[0]}x{self.block[1]}"
        rows = "" if self.row_blocks is None else f"_ell{self.row_blocks}"
        epilogue = ("" if self.activation == "none" else f"_{self.activation}") + ("_residual" if self.residual else "")
        return f"{fmt}{rows}_linear_{self.m}x{self.n}x{self.k}_{self.dtype}{epilogue}"

    def kernel(self, knobs: KernelKnobs | None = None, x_tiled: bool = False, y_tiled: bool = False,
               residual_tiled: bool = False):
        return bsr_linear_kernel(self.m, self.n, self.k, self.block, self.dtype, self.activation, self.residual,
                                 self.index_dtype, self.column_dtype, knobs=knobs, x_tiled=x_tiled, y_tiled=y_tiled,
                                 residual_tiled=residual_tiled, row_blocks=self.row_blocks)

    def default_knobs(self, threads: int | None) -> KernelKnobs:
        return default_knobs(self.m, self.n, self.k, self.block, self.dtype, threads)

    def token_tile(self, knobs: KernelKnobs | None) -> int:
        knobs = knobs or self.default_knobs(None)  # the tile does not depend on the threads
        return min(knobs.token_tile, self.m)


def _row_blocks(indptr: Any) -> int | None:
    """`uniform_row_blocks` of the packed weight when it is a constant of the node's own graph. A weight that reaches
    the region as an input (shared with another region) keeps the general kernel: only speed differs."""
    if isinstance(indptr, fx.Node) and indptr.op == "get_attr" and indptr.graph.owning_module is not None:
        return uniform_row_blocks(constant_of(indptr.graph.owning_module, indptr))
    return None


# node.meta key under which codegen/tuning/ leaves the tuned KernelKnobs of a sparse_linear node.
KNOBS_META = "sparsecc_kernel_knobs"


@converter(torch.ops.sparsecc.sparse_linear.default, check=_sparse_check)
def _sparse_linear(ctx: LoweringContext, node: fx.Node, args: tuple) -> relax.Expr:
    x, indptr, indices, values, bias, out_features, activation, residual = sparse_linear_args(args)
    spec = SparseLinearSpec.of(node)
    dtype = shape_dtype(node.args[0])[1]
    if bias is None:
        bias = relax.const(tvm.runtime.from_dlpack(torch.zeros(out_features, dtype=dtype)))
    if residual is None:
        residual = relax.const(tvm.runtime.from_dlpack(torch.zeros(1, 1, dtype=dtype)))
    knobs = node.meta.get(KNOBS_META) or spec.default_knobs(ctx.threads)  # tuned, else the template's defaults
    tile = spec.token_tile(knobs)
    residual_node = sparse_linear_args(node.args)[7]
    x_tiled, y_tiled, residual_tiled = node.args[0] in ctx.tiled, node in ctx.tiled, residual_node in ctx.tiled
    layouts = ("x_tiled",) * x_tiled + ("y_tiled",) * y_tiled + ("residual_tiled",) * residual_tiled
    key = (*spec.key, knobs, *layouts)
    gv = ctx.kernel(key, lambda: spec.kernel(knobs, x_tiled, y_tiled, residual_tiled), "_".join((spec.name, *layouts)))
    out_shape = token_tiled_shape(spec.m, spec.n, tile) if y_tiled else (spec.m, spec.n)
    return relax.call_tir(gv, [x, indptr, indices, values, bias, residual], relax.TensorType(out_shape, spec.dtype))


def _graph_constant(node: Any) -> torch.Tensor | None:
    if isinstance(node, fx.Node) and node.op == "get_attr" and node.graph.owning_module is not None:
        return constant_of(node.graph.owning_module, node)
    return None


def _sparse_conv_check(node: fx.Node) -> bool:
    x, indptr, indices, values, bias, out_channels, kernel, out_size = node.args[:8]
    activation = node.args[8] if len(node.args) > 8 else "none"
    xs, vs = shape_dtype(x), shape_dtype(values)
    if xs is None or vs is None or len(xs[0]) != 4 or xs[1] != vs[1] or xs[1] not in FLOAT_DTYPES:
        return False
    # The kernel reads offsets worked out from the weight's columns: the packed weight must be this graph's own.
    if _graph_constant(indptr) is None or _graph_constant(indices) is None or tuple(vs[0][1:]) != (1, 1):
        return False
    if activation not in CONV_ACTIVATIONS:
        return False
    residual = node.args[9] if len(node.args) > 9 else None
    if residual is not None and shape_dtype(residual) != ((xs[0][0], out_channels, *out_size), xs[1]):
        return False
    _, _, hq, wq = xs[0]
    if out_size[0] + kernel[0] - 1 > hq or out_size[1] + kernel[1] - 1 > wq:
        return False
    return bias is None or (shape_dtype(bias) is not None and shape_dtype(bias)[1] == xs[1])


# node.meta key under which a tuned ConvKnobs of a sparse_conv2d node would be left (none are searched yet).
CONV_KNOBS_META = "sparsecc_conv_knobs"


@converter(torch.ops.sparsecc.sparse_conv2d.default, check=_sparse_conv_check)
def _sparse_conv2d(ctx: LoweringContext, node: fx.Node, args: tuple) -> relax.Expr:
    x, _, _, values, bias, out_channels, kernel, out_size = args[:8]
    activation = node.args[8] if len(node.args) > 8 else "none"
    residual = args[9] if len(args) > 9 else None
    (batch, channels, hq, wq), dtype = shape_dtype(node.args[0])
    name = dtype_name(dtype)
    taps = kernel[0] * kernel[1]
    knobs = (node.meta.get(CONV_KNOBS_META) or ConvKnobs()).for_taps(taps)
    indptr, columns = _graph_constant(node.args[1]), _graph_constant(node.args[2]).long()
    channel, tap = columns // taps, columns % taps
    offsets = (channel * (hq * wq) + (tap // kernel[1]) * wq + tap % kernel[1]).to(torch.int32)
    pointers = torch.from_numpy(chunk_pointers(indptr.numpy(), columns.numpy(), taps, knobs.chunk, channels))
    if bias is None:
        bias = relax.const(tvm.runtime.from_dlpack(torch.zeros(out_channels, dtype=dtype)))
    fused = residual is not None
    if residual is None:
        residual = relax.const(tvm.runtime.from_dlpack(torch.zeros(1, 1, 1, 1, dtype=dtype)))
    key = ("sparse_conv2d", batch, channels, hq, wq, out_channels, tuple(out_size), name, activation, fused, knobs)
    gv = ctx.kernel(key, lambda: direct_conv_kernel(batch, channels, (hq, wq), out_channels, tuple(out_size), name,
                                                    activation, fused, knobs=knobs),
                    f"csr_conv_{batch}x{channels}x{hq}x{wq}_to_{out_channels}x{out_size[0]}x{out_size[1]}_{name}"
                    + ("" if activation == "none" else f"_{activation}") + ("_residual" if fused else ""))
    flat = ctx.bb.emit(relax.op.reshape(x, (batch, channels * hq * wq)))
    stored = shape_dtype(node.args[3])[0][0]
    return relax.call_tir(gv, [flat, relax.const(tvm.runtime.from_dlpack(aligned(pointers))),
                               relax.const(tvm.runtime.from_dlpack(aligned(offsets))),
                               ctx.bb.emit(relax.op.reshape(values, (stored,))), bias, residual],
                          relax.TensorType((batch, out_channels, *out_size), name))


def _pad_check(node: fx.Node) -> bool:
    pads = node.args[1]
    value = node.args[2] if len(node.args) > 2 else 0
    # Negative pads crop, which relax's pad does not do; those stay in PyTorch.
    return _static_float(node) and all(isinstance(p, int) and p >= 0 for p in pads) and isinstance(value, (int, float))


@converter(aten.constant_pad_nd.default, check=_pad_check)
def _constant_pad(ctx, node, args):
    pads = list(node.args[1])
    value = node.args[2] if len(node.args) > 2 else 0
    shape_in, dtype = shape_dtype(node.args[0])
    rank = len(shape_in)
    if rank >= 3 and len(pads) <= 4 and all(p >= 0 for p in pads):
        # Rows and columns only (a convolution's padding): sparsecc's parallel kernel over the planes.
        left, right, top, bottom = (list(pads) + [0, 0])[:4]
        planes, (h, w) = math.prod(shape_in[:-2]), shape_in[-2:]
        name = dtype_name(dtype)
        gv = ctx.kernel(("pad", planes, h, w, top, bottom, left, right, name),
                        lambda: pad_kernel(planes, (h, w), (top, bottom, left, right), name),
                        f"pad_{planes}x{h}x{w}_{top}_{bottom}_{left}_{right}_{name}")
        fill = relax.const(tvm.runtime.from_dlpack(torch.full((1,), float(value), dtype=dtype)))
        flat = ctx.bb.emit(relax.op.reshape(args[0], (planes, h, w)))
        y = ctx.bb.emit(relax.call_tir(gv, [flat, fill], relax.TensorType((planes, h + top + bottom,
                                                                            w + left + right), name)))
        return relax.op.reshape(y, shape_dtype(node)[0])
    width = [0] * (2 * rank)
    for i in range(len(pads) // 2):  # aten lists the last axis first
        width[2 * (rank - 1 - i)], width[2 * (rank - 1 - i) + 1] = pads[2 * i], pads[2 * i + 1]
    return relax.op.nn.pad(args[0], width, "constant", float(value))


@converter(*VIEW_OPS, check=_static)
def _reshape(ctx, node, args):
    if node in ctx.tiled:  # a reshape between two kernels that hand over in token tiles: the value passes through
        return args[0]
    shape, _ = shape_dtype(node)
    return relax.op.reshape(args[0], shape)


@converter(aten.t.default, check=_static_float)
def _t(ctx, node, args):
    return relax.op.permute_dims(args[0], [1, 0]) if len(shape_dtype(node)[0]) == 2 else args[0]


def _slice_check(node: fx.Node) -> bool:
    dim, start, end, step = (list(node.args[1:]) + [0, None, None, 1][len(node.args) - 1:])[:4]
    return _static_float(node) and all(isinstance(v, int) for v in (dim, start, step)) and step >= 1 and \
        start >= 0 and (end is None or isinstance(end, int))


@converter(aten.slice.Tensor, check=_slice_check)
def _slice(ctx, node, args):
    dim, start, end, step = (list(node.args[1:]) + [0, None, None, 1][len(node.args) - 1:])[:4]
    size = shape_dtype(node.args[0])[0][dim]
    end = size if end is None else min(end, size)
    return relax.op.strided_slice(args[0], [dim], [start], [end], [step])


@converter(aten.permute.default, check=_static_float)
def _permute(ctx, node, args):
    return relax.op.permute_dims(args[0], list(args[1]))


def _binary_check(node: fx.Node) -> bool:
    if node.kwargs.get("alpha", 1) != 1:
        return False
    return _static_float(node) and all(isinstance(a, (fx.Node, int, float)) for a in node.args[:2])


def _binary(relax_op):
    def convert(ctx, node, args):
        _, dtype = shape_dtype(node)
        lhs, rhs = (a if isinstance(a, relax.Expr) else relax.const(a, dtype_name(dtype)) for a in args[:2])
        return relax_op(lhs, rhs)

    return convert


converter(aten.add.Tensor, check=_binary_check)(_binary(relax.op.add))
converter(aten.sub.Tensor, check=_binary_check)(_binary(relax.op.subtract))
converter(aten.mul.Tensor, check=_binary_check)(_binary(relax.op.multiply))


@converter(aten.relu.default)
def _relu(ctx, node, args):
    return relax.op.nn.relu(args[0])


def _gelu_check(node: fx.Node) -> bool:
    return _static_float(node) and node.kwargs.get("approximate", "none") in ("none", "tanh")


@converter(aten.gelu.default, check=_gelu_check)
def _gelu(ctx, node, args):
    if node.kwargs.get("approximate", "none") == "tanh":
        return relax.op.nn.gelu_tanh(args[0])
    return relax.op.nn.gelu(args[0])


def _attention_check(node: fx.Node) -> bool:
    q, k, v, heads, _ = node.args
    infos = [shape_dtype(t) for t in (q, k, v)]
    return (_static_float(node) and infos[0] == infos[1] == infos[2] and len(infos[0][0]) == 3
            and infos[0][0][2] % heads == 0)


@converter(torch.ops.sparsecc.attention.default, check=_attention_check)
def _attention(ctx, node, args):
    q, k, v, heads, scale = args
    (batch, tokens, width), dtype = shape_dtype(node.args[0])
    name = dtype_name(dtype)
    head_dim = width // heads
    tiled = frozenset(operand for operand, a in zip(("q", "k", "v", "out"), (*node.args[:3], node)) if a in ctx.tiled)
    layouts = "".join(f"_{operand}" for operand in ("q", "k", "v", "out") if operand in tiled)
    gv = ctx.kernel(("attention", batch, tokens, heads, head_dim, scale, name, tiled),
                    lambda: attention_kernel(batch, tokens, heads, head_dim, scale, name, tiled),
                    f"attention_{batch}x{tokens}x{heads}x{head_dim}_{name}" + (f"_tiled{layouts}" if tiled else ""))
    shape = token_tiled_shape(batch * tokens, width, ctx.tiled[node]) if node in ctx.tiled else (batch, tokens, width)
    return relax.call_tir(gv, [q, k, v], relax.TensorType(shape, name))


def _layer_norm_check(node: fx.Node) -> bool:
    x, normalized = node.args[:2]
    info = shape_dtype(x)
    return _static_float(node) and info is not None and len(info[0]) >= 1 and list(normalized) == [info[0][-1]]


@converter(aten.layer_norm.default, check=_layer_norm_check)
def _layer_norm(ctx, node, args):
    x, _, weight, bias = args[:4]
    eps = args[4] if len(args) > 4 else 1e-5
    shape, dtype = shape_dtype(node.args[0])
    name = dtype_name(dtype)
    width = shape[-1]
    rows = math.prod(shape[:-1])
    # Always affine (ones and zeros when absent): a kernel that reads only x looks like a reshape to TVM's
    # RewriteDataflowReshape, whose analysis fails on a body that is not a TIR block (width 1 hits it).
    affine = True
    weight = weight if weight is not None else relax.const(tvm.runtime.from_dlpack(torch.ones(width, dtype=dtype)))
    bias = bias if bias is not None else relax.const(tvm.runtime.from_dlpack(torch.zeros(width, dtype=dtype)))
    x_tiled, y_tiled = node.args[0] in ctx.tiled, node in ctx.tiled
    layouts = ("x_tiled",) * x_tiled + ("y_tiled",) * y_tiled
    gv = ctx.kernel(("layer_norm", rows, width, eps, name, affine, *layouts),
                    lambda: layer_norm_kernel(rows, width, eps, name, affine, x_tiled, y_tiled),
                    "_".join((f"layer_norm_{rows}x{width}_{name}", *layouts)))
    flat = x if x_tiled else ctx.bb.emit(relax.op.reshape(x, (rows, width)))
    out_shape = token_tiled_shape(rows, width, ctx.tiled[node]) if y_tiled else (rows, width)
    y = ctx.bb.emit(relax.call_tir(gv, [flat, weight, bias], relax.TensorType(out_shape, name)))
    return y if y_tiled else relax.op.reshape(y, shape)


def _max_pool_arguments(node: fx.Node):
    """(kernel, stride, padding, dilation) of an aten.max_pool2d node, each a pair."""
    def pair(v, default):
        v = default if v is None or (isinstance(v, (list, tuple)) and not v) else v
        return tuple(v) * (2 if len(v) == 1 else 1) if isinstance(v, (list, tuple)) else (v, v)

    args = list(node.args) + [None] * (6 - len(node.args))
    kernel = pair(args[1], None)
    return kernel, pair(args[2], kernel), pair(args[3] if args[3] is not None else 0, 0), pair(
        args[4] if args[4] is not None else 1, 1)


def _max_pool_check(node: fx.Node) -> bool:
    info = shape_dtype(node.args[0])
    return _static_float(node) and info is not None and len(info[0]) == 4 and \
        _max_pool_arguments(node)[3] == (1, 1)


@converter(aten.max_pool2d.default, check=_max_pool_check)
def _max_pool(ctx, node, args):
    (batch, channels, h, w), dtype = shape_dtype(node.args[0])
    out = tuple(shape_dtype(node)[0][2:])
    kernel, stride, padding, _ = _max_pool_arguments(node)
    name = dtype_name(dtype)
    gv = ctx.kernel(("max_pool", batch, channels, h, w, kernel, stride, padding, out, name),
                    lambda: max_pool_kernel(batch, channels, (h, w), kernel, stride, padding, out, name),
                    f"max_pool_{batch}x{channels}x{h}x{w}_{kernel[0]}x{kernel[1]}_s{stride[0]}_{name}")
    low = relax.const(tvm.runtime.from_dlpack(torch.full((1,), float("-inf"), dtype=dtype)))
    return relax.call_tir(gv, [args[0], low], relax.TensorType((batch, channels, *out), name))

