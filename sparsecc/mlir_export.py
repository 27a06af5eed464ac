"""MLIR export: an ExportedProgram as linalg-on-tensors MLIR, each sparse weight typed with MLIR's sparse_tensor
encoding of the format sparsecc planned for it, for MLIR- and IREE-based pipelines.

torch-mlir (`pip install torch-mlir`, pinned in the `mlir` extra) imports the program and lowers it to
linalg-on-tensors. Its usual "frozen" import inlines every parameter as a `dense_resource` literal; here an
importer hook makes every parameter and buffer a function argument instead, so weights are typed like any other
tensor and the file holds the computation, not the data (BERT-base would otherwise be ~900 MB of hex).

The function is `func.func @main(user inputs..., state...)`: the user inputs first, in the program's order, then one
argument per parameter or buffer in the order the graph first uses it (a Linear's weight, then its bias), each
marked with the argument attribute `sparsecc.weight = "<name>"` (parameters) or `sparsecc.buffer = "<name>"`
(buffers), `<name>` being the state_dict key, e.g. `encoder.layer.0.output.dense.weight` or `0.weight`.
A caller binds them by that attribute, which survives parsing and passes; position alone is not a contract.
Parameters and buffers nobody uses are not arguments. Lifted tensor constants stay literals, as torch-mlir makes them.

After lowering, each weight the plan made sparse gets its encoding on the tensor as stored, e.g. a Linear weight
(out, in), not on the transpose the graph computes from it:

- CSR: `(d0, d1) -> (d0 : dense, d1 : compressed)`.
- BSR with r x c blocks: `(d0, d1) -> (d0 floordiv r : dense, d1 floordiv c : compressed, d0 mod r : dense,
  d1 mod c : dense)`; a block side of 1 has no floordiv/mod pair (MLIR cannot infer the inverse map of
  `floordiv 1`/`mod 1`), so 8x1 is `(d0 floordiv 8 : dense, d1 : compressed, d0 mod 8 : dense)`.
- 2:4: `(d0, d1) -> (d0 : dense, d1 floordiv 4 : dense, d1 mod 4 : structured[2, 4])`, groups of 4 running along
  the input dimension. The plan has no 2:4 format (no CPU kernel gains from it), so this is used when the plan
  chose CSR for a weight whose analysis found 2:4: the pattern is exact, stores at most half the weight, and is
  what 2:4-capable MLIR paths (the sparsifier's NVIDIA 2:4 support) consume; CSR would hide it. The stored tensor is
  checked to fit, otherwise it is CSR. A weight the plan keeps dense stays dense even when it is 2:4, and a BSR
  choice stays BSR: the export shows the plan, not a second opinion. This MLIR parses `structured[n, m]` for
  other N:M too (1:4, 4:8), but only 2:4 has consumers, so only 2:4 is emitted.

Orientation: plan blocks and N:M groups are in (out, in) terms. Which stored dimension holds the inputs is read off
the program graph the way analysis does: `linear(x, W)` and `W @ x` store (out, in), `x @ W` (GPT-2's Conv1D)
stores (in, out), a transpose in between flips it. With no such use the stored tensor is taken as (out, in).

Uses: linalg ops take the sparse weight directly (they are what MLIR's sparsifier rewrites). Any other op using it
(a reshape, a return) gets a `sparse_tensor.convert` to the dense type first, so the module stays valid.

What this MLIR (torch-mlir 20261001) makes of it: every encoding above parses and verifies. Its own CPU sparse
compiler (the `sparsifier` pipeline) compiles CSR, 4x4 and 1x4 BSR and 2:4 when the sparse layer reads the function's
input, but (1) segfaults on row blocks with one column (4x1, 8x1, 16x1, which sparsecc often picks) and (2) fails for
every format when an activation precedes the sparse layer: its elementwise fusion pulls the ReLU into the sparse
kernel, which it then cannot sparsify. Both are limits of that pipeline, not of the encodings; a consumer with its
own pipeline (IREE) is not bound by them. tests/test_mlir_export.py compiles the working cases.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any

import torch
from torch import fx

from sparsecc.errors import UnsupportedError
from sparsecc.formats import FormatChoice, SparseFormat, SparsePlan, WeightSparsity

log = logging.getLogger(__name__)

TORCH_MLIR_REQUIREMENT = "torch-mlir==20261001"
WEIGHT_ATTR = "sparsecc.weight"
BUFFER_ATTR = "sparsecc.buffer"

aten = torch.ops.aten

# Matrix products -> the operand position at which a weight W is multiplied as `x @ W`, so stored (in, out) (_RIGHT),
# or as `W @ x`, so stored (out, in) (_LEFT).
_RIGHT = {aten.mm.default: 1, aten.matmul.default: 1, aten.addmm.default: 2}
_LEFT = {aten.mm.default: 0, aten.matmul.default: 0, aten.addmm.default: 1}


@dataclasses.dataclass(frozen=True)
class _StateArg:
    index: int  # argument number of @main
    attr: str  # WEIGHT_ATTR or BUFFER_ATTR
    name: str  # state_dict key
    shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class _Encoding:
    label: str  # "csr", "bsr8x1", "2:4": for logs
    dim_to_lvl: str  # the map of #sparse_tensor.encoding

    @property
    def asm(self) -> str:
        return f"#sparse_tensor.encoding<{{ map = {self.dim_to_lvl} }}>"


def export_mlir(program: torch.export.ExportedProgram, plan: SparsePlan) -> str:
    """`program` as linalg-on-tensors MLIR text; the weights `plan` made sparse carry their sparse_tensor encoding.

    Weights are matched by their user name (`plan.weights[key].name`, the program's state_dict key). Raises
    UnsupportedError when torch-mlir is missing or cannot import or lower the program. `program` is not changed.
    """
    encodings = _plan_encodings(program, plan)
    module, state_args = _import_linalg(program)
    _apply_encodings(module, state_args, encodings)
    n_sparse = sum(a.name in encodings for a in state_args)
    log.info("mlir export: %d state arguments, %d with a sparse encoding", len(state_args), n_sparse)
    return str(module)


# ---------------------------------------------------------------------------------------------------- the plan


def _plan_encodings(program: torch.export.ExportedProgram, plan: SparsePlan) -> dict[str, _Encoding]:
    """User name -> encoding for each weight the plan made sparse and the program holds as state."""
    sig = program.graph_signature
    # state name -> placeholder, to find how the graph uses it
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    state = {target: placeholders[inp] for inp, target in
             list(sig.inputs_to_parameters.items()) + list(sig.inputs_to_buffers.items())}
    encodings: dict[str, _Encoding] = {}
    for key, choice in plan.choices.items():
        if choice.format is SparseFormat.DENSE:
            continue
        weight = plan.weights.get(key)
        if weight is None:
            log.warning("mlir export: plan chose %s for %r but has no analysis for it; left dense",
                        choice.format.value, key)
            continue
        if weight.name not in state:
            log.warning("mlir export: %r (%s in the plan) is not a parameter or buffer of the program; skipped",
                        weight.name, choice.format.value)
            continue
        tensor = _state_value(program, weight.name)
        if tensor is None or tensor.dim() != 2:
            log.warning("mlir export: %r is not a 2-D tensor in the program; left dense", weight.name)
            continue
        enc = _encoding_for(choice, weight, tensor, _input_dim(state[weight.name]))
        previous = encodings.setdefault(weight.name, enc)
        if previous != enc:
            # Two graph constants folded from one parameter (say W and W.t()) can get different plans; the
            # parameter has one type, so the first wins.
            log.warning("mlir export: %r planned as both %s and %s; using %s",
                        weight.name, previous.label, enc.label, previous.label)
    return encodings


def _state_value(program: torch.export.ExportedProgram, name: str) -> torch.Tensor | None:
    value = program.state_dict.get(name)
    if value is None:  # non-persistent buffers live in constants
        value = program.constants.get(name)
    return value if isinstance(value, torch.Tensor) else None


def _input_dim(node: fx.Node, depth: int = 0) -> int | None:
    """Which dimension of the 2-D tensor `node` runs along a matrix product's input features (the reduction):
    1 for (out, in) as nn.Linear stores it, 0 for (in, out); None when no use tells."""
    if depth > 4:
        return None
    for user in node.users:
        if user.op != "call_function":
            continue
        target, positions = user.target, {i for i, a in enumerate(user.args) if a is node}
        if target is aten.linear.default and 1 in positions:
            return 1
        if _RIGHT.get(target) in positions:
            return 0
        if _LEFT.get(target) in positions:
            return 1
        if _is_transpose(user):
            inner = _input_dim(user, depth + 1)
            if inner is not None:
                return 1 - inner
    return None


def _is_transpose(node: fx.Node) -> bool:
    if node.target is aten.t.default:
        return True
    if node.target is aten.transpose.int:
        return {d % 2 for d in node.args[1:3]} == {0, 1}
    if node.target is aten.permute.default:
        return [d % 2 for d in node.args[1]] == [1, 0]
    return False


def _encoding_for(choice: FormatChoice, weight: WeightSparsity, tensor: torch.Tensor,
                  input_dim: int | None) -> _Encoding:
    if input_dim is None:
        log.debug("mlir export: no matrix product says how %r is stored; taken as (out, in)", weight.name)
        input_dim = 1
    if choice.format in (SparseFormat.CSR, SparseFormat.ELL) and weight.nm_label() == "2:4":
        if _fits_nm(tensor, 2, 4, input_dim):
            out_dim = 1 - input_dim
            return _Encoding("2:4", f"(d0, d1) -> (d{out_dim} : dense, d{input_dim} floordiv 4 : dense, "
                                    f"d{input_dim} mod 4 : structured[2, 4])")
        log.warning("mlir export: %r was analysed as 2:4 but the program's tensor is not 2:4 along dimension %d; "
                    "emitted as CSR", weight.name, input_dim)
    if choice.format is SparseFormat.BSR and choice.block and choice.block != (1, 1):
        # The plan's block is (out rows, in cols); on an (in, out) tensor the sides swap.
        rows, cols = choice.block if input_dim == 1 else choice.block[::-1]
        if tensor.shape[0] % rows == 0 and tensor.shape[1] % cols == 0:
            return _Encoding(f"bsr{choice.block[0]}x{choice.block[1]}", _bsr_map(rows, cols))
        log.warning("mlir export: %dx%d blocks do not tile %r of shape %s; emitted as CSR",
                    rows, cols, weight.name, tuple(tensor.shape))
    return _Encoding("csr", "(d0, d1) -> (d0 : dense, d1 : compressed)")


def _bsr_map(rows: int, cols: int) -> str:
    """Block rows dense, block columns compressed, then the dense block; a side of 1 needs no level of its own."""
    lvls = [f"d0 floordiv {rows} : dense" if rows > 1 else "d0 : dense",
            f"d1 floordiv {cols} : compressed" if cols > 1 else "d1 : compressed"]
    if rows > 1:
        lvls.append(f"d0 mod {rows} : dense")
    if cols > 1:
        lvls.append(f"d1 mod {cols} : dense")
    return f"(d0, d1) -> ({', '.join(lvls)})"


def _fits_nm(tensor: torch.Tensor, n: int, m: int, dim: int) -> bool:
    """Every group of m consecutive entries along `dim` holds at most n non-zeros."""
    t = tensor.detach().movedim(dim, -1)
    if t.shape[-1] % m:
        return False
    return bool((t.reshape(-1, m) != 0).sum(dim=1).max() <= n) if t.numel() else True


# -------------------------------------------------------------------------------------------------- torch-mlir


def _torch_mlir() -> tuple[Any, Any, Any, Any]:
    try:
        from torch_mlir import fx as tm_fx
        from torch_mlir import ir
        from torch_mlir.dialects import torch as torch_d
        from torch_mlir.extras import fx_importer
    except ImportError as e:
        raise UnsupportedError(
            f"MLIR export needs torch-mlir, which is not installed ({e}): pip install {TORCH_MLIR_REQUIREMENT}"
        ) from e
    return tm_fx, ir, torch_d, fx_importer


def _import_linalg(program: torch.export.ExportedProgram) -> tuple[Any, list[_StateArg]]:
    """Import and lower `program` with torch-mlir, parameters and buffers as function arguments. Returns the module
    and which argument holds which state."""
    from torch.export.graph_signature import InputKind

    tm_fx, ir, torch_d, fx_importer = _torch_mlir()
    state_args: list[_StateArg] = []

    class StateAsArguments(fx_importer.FxImporterHooks):
        # torch-mlir asks this hook for a parameter or buffer the first time the graph uses it (and would inline
        # it as a literal if it returned None); it answers with a new argument of the function being built.
        def resolve_input(self, gni, value, info):
            block = ir.InsertionPoint.current.block
            func = block.owner
            arg = block.add_argument(info.ir_type, ir.Location.current)
            # Keep function_type in step with the block, or the func op would not verify.
            results = ir.FunctionType(ir.TypeAttr(func.attributes["function_type"]).value).results
            func.attributes["function_type"] = ir.TypeAttr.get(
                ir.FunctionType.get([a.type for a in block.arguments], results))
            attr = WEIGHT_ATTR if info.input_spec.kind is InputKind.PARAMETER else BUFFER_ATTR
            state_args.append(_StateArg(arg.arg_number, attr, info.input_spec.target, tuple(value.shape)))
            return arg

        def store_produced_value(self, gni, py_value, produced_ir_value, info):
            # torch-mlir's default raises NotImplementedError with the whole program in the message.
            raise UnsupportedError(
                f"the program updates buffer {info.input_spec.target!r} (a module in training mode, such as "
                "BatchNorm?); an exported function has no state to update: export the model in eval() mode")

    context = ir.Context()
    torch_d.register_dialect(context)
    errors: list[str] = []

    def on_diagnostic(d) -> bool:
        # MLIR would print these to stderr; keep them for the error message instead.
        if d.severity == ir.DiagnosticSeverity.ERROR:
            errors.append(f"{d.message} at {d.location}")
        return True

    handler = context.attach_diagnostic_handler(on_diagnostic)
    try:
        importer = fx_importer.FxImporter(context=context, hooks=StateAsArguments())
        # experimental_support_mutation selects import_program, the path that calls resolve_input; the frozen
        # path substitutes the tensors into the graph before any hook sees them.
        module = tm_fx.export_and_import(program, output_type="linalg-on-tensors", fx_importer=importer,
                                         experimental_support_mutation=True)
    except UnsupportedError:
        raise
    except Exception as e:  # torch-mlir raises NotImplementedError, TorchMlirCompilerError, AssertionError...
        raise UnsupportedError(_import_failure(e, errors)) from e
    finally:
        handler.detach()
    return module, state_args


def _import_failure(exc: Exception, errors: list[str]) -> str:
    text = "\n".join(errors + [str(exc)])
    op = None
    for pattern in (r'name = "(torch\.[\w.]+)"',  # torch.operator: an ATen op torch-mlir does not know
                    r"failed to legalize operation '([\w.]+)'",
                    r"\b(aten[.:]{1,2}\w+(?:\.\w+)?)"):
        match = re.search(pattern, text)
        if match:
            op = match.group(1)
            break
    detail = errors[0] if errors else (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    where = f" (op {op})" if op else ""
    return f"torch-mlir could not lower the program to linalg-on-tensors{where}: {detail[:500]}"


def _apply_encodings(module: Any, state_args: list[_StateArg], encodings: dict[str, _Encoding]) -> None:
    _, ir, _, _ = _torch_mlir()
    from torch_mlir.dialects import sparse_tensor

    func = _main_function(module)
    block = func.regions[0].blocks[0]
    # Argument numbers were taken before lowering; check they still hold the tensors they did.
    for a in state_args:
        if a.index >= len(block.arguments) or _shape(ir, block.arguments[a.index].type) not in (a.shape, None):
            raise UnsupportedError(f"torch-mlir's lowering moved the argument for {a.name!r}; cannot mark the weights")
    arg_attrs: list[dict[str, Any]] = [{} for _ in block.arguments]
    with module.context, ir.Location.unknown():
        for a in state_args:
            arg_attrs[a.index][a.attr] = ir.StringAttr.get(a.name)
            enc = encodings.get(a.name)
            if enc is None:
                continue
            arg = block.arguments[a.index]
            dense = ir.RankedTensorType(arg.type)
            sparse = ir.RankedTensorType.get(dense.shape, dense.element_type, ir.Attribute.parse(enc.asm))
            others = [u for u in arg.uses if not u.owner.operation.name.startswith("linalg.")]
            arg.set_type(sparse)
            if others:
                with ir.InsertionPoint.at_block_begin(block):
                    as_dense = sparse_tensor.ConvertOp(dense, arg).result
                for use in others:
                    use.owner.operation.operands[use.operand_number] = as_dense
            log.debug("mlir export: %s as %s", a.name, enc.label)
        results = ir.FunctionType(ir.TypeAttr(func.attributes["function_type"]).value).results
        func.attributes["function_type"] = ir.TypeAttr.get(
            ir.FunctionType.get([a.type for a in block.arguments], results))
        if "arg_attrs" in func.attributes:  # keep whatever the lowering put there
            for index, old in enumerate(ir.ArrayAttr(func.attributes["arg_attrs"])):
                for named in ir.DictAttr(old):
                    arg_attrs[index].setdefault(named.name, named.attr)
        func.attributes["arg_attrs"] = ir.ArrayAttr.get([ir.DictAttr.get(d) for d in arg_attrs])
    try:
        module.operation.verify()
    except Exception as e:
        raise UnsupportedError(f"the MLIR with sparse encodings does not verify: {e}") from e


def _shape(ir: Any, t: Any) -> tuple[int, ...] | None:
    return tuple(ir.RankedTensorType(t).shape) if t.typeid == ir.RankedTensorType.static_typeid else None


def _main_function(module: Any) -> Any:
    for op in module.body.operations:
        if op.operation.name == "func.func" and str(op.operation.attributes["sym_name"]) == '"main"':
            return op.operation
    raise UnsupportedError("torch-mlir's output has no func.func @main")
