"""Random programs over the ops sparsecc touches, as hypothesis strategies, for tests/test_generated_graphs.py.

A `Program` is plain data (its inputs' shapes, a list of steps, which intermediate values are extra outputs, the
compile options); `ProgramModule` is the nn.Module that runs it, so dynamo traces an ordinary forward. The strategy
keeps track of every value's shape while it draws steps, so each program it makes is valid PyTorch; shrinking then
reduces a failure to a short program whose `repr` reads as a recipe.

Weights are drawn with the sparsity patterns sparsecc has formats for (unstructured, r x c blocks, N:M) and the
edge cases (all-zero rows, an all-zero weight, a single non-zero, fully dense).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

# Sizes include 1, odd and prime ones: the kernels tile by 4, 8, 16 and must handle every remainder.
SIZES = (1, 2, 3, 5, 7, 8, 12, 13, 16, 17, 24, 31, 32, 40, 64)
LEADING = (1, 2, 3, 5, 7)
PATTERNS = ("dense", "unstructured", "blocks", "2:4", "4:8", "zero_rows", "all_zero", "single")
BLOCKS = ((1, 4), (4, 1), (2, 2), (4, 4), (8, 1), (16, 1), (1, 8))


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    rows: int
    cols: int
    pattern: str
    density: float
    block: tuple[int, int]
    seed: int

    def tensor(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed)
        w = torch.randn(self.rows, self.cols, generator=g) / math.sqrt(self.cols)
        return w * _mask(self, g)


def _mask(spec: WeightSpec, g: torch.Generator) -> torch.Tensor:
    rows, cols = spec.rows, spec.cols
    if spec.pattern == "dense":
        return torch.ones(rows, cols)
    if spec.pattern == "all_zero":
        return torch.zeros(rows, cols)
    if spec.pattern == "single":
        mask = torch.zeros(rows * cols)
        mask[int(torch.randint(rows * cols, (1,), generator=g))] = 1
        return mask.view(rows, cols)
    if spec.pattern == "blocks":
        r, c = spec.block
        keep = (torch.rand(-(-rows // r), -(-cols // c), generator=g) < spec.density).float()
        return keep.repeat_interleave(r, 0).repeat_interleave(c, 1)[:rows, :cols]
    if spec.pattern in ("2:4", "4:8"):
        n, m = map(int, spec.pattern.split(":"))
        groups = -(-cols // m)
        scores = torch.rand(rows, groups, m, generator=g)
        mask = torch.zeros(rows, groups, m).scatter_(2, scores.topk(n, dim=2).indices, 1.0)
        return mask.view(rows, groups * m)[:, :cols]
    mask = (torch.rand(rows, cols, generator=g) < spec.density).float()
    if spec.pattern == "zero_rows":
        mask[torch.rand(rows, generator=g) < 0.5] = 0
    return mask


@dataclasses.dataclass(frozen=True)
class Step:
    op: str
    weights: tuple[WeightSpec, ...] = ()
    args: tuple[Any, ...] = ()
    bias: bool = False
    keep: bool = False  # remember the result: a later residual or an extra output may use it


@dataclasses.dataclass(frozen=True)
class Program:
    lead: tuple[int, ...]  # leading dims of the float input
    width: int  # its last dim
    vocab: int  # > 0: an int64 input of shape `lead` indexes an embedding table added to the float input
    steps: tuple[Step, ...]
    extra_outputs: tuple[int, ...]  # indices into the kept values
    options: tuple[tuple[str, Any], ...]

    def inputs(self, seed: int) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(*self.lead, self.width, generator=g)
        if not self.vocab:
            return (x,)
        return x, torch.randint(self.vocab, self.lead, generator=g)


class ProgramModule(nn.Module):
    def __init__(self, program: Program):
        super().__init__()
        self.program = program
        self.params = nn.ParameterList()
        for step in program.steps:
            for spec in step.weights:
                # "matmul" multiplies by a weight stored (in, out), as a transposed Linear keeps it.
                w = spec.tensor()
                self.params.append(nn.Parameter(w.t().contiguous() if step.op == "matmul" else w))
            if step.bias:
                self.params.append(nn.Parameter(torch.randn(_bias_size(step)) * 0.1))
        if program.vocab:
            self.embedding = nn.Embedding(program.vocab, program.width)

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> Any:
        h = x if ids is None else x + self.embedding(ids)
        kept = [h]
        params = iter(self.params)
        for step in self.program.steps:
            weights = [next(params) for _ in step.weights]
            bias = next(params) if step.bias else None
            h = _apply(step, h, weights, bias, kept)
            if step.keep:
                kept.append(h)
        if not self.program.extra_outputs:
            return h
        return (h, *[kept[i] for i in self.program.extra_outputs])


def _bias_size(step: Step) -> int:
    if step.op in ("layer_norm",):
        return step.args[0]
    return step.weights[-1].rows


def _apply(step: Step, h: torch.Tensor, weights: list[torch.Tensor], bias: torch.Tensor | None,
           kept: list[torch.Tensor]) -> torch.Tensor:
    op, args = step.op, step.args
    if op == "linear":
        return F.linear(h, weights[0], bias)
    if op == "matmul":
        out = h @ weights[0]
        return out if bias is None else out + bias
    if op == "addmm":
        return torch.addmm(bias, h, weights[0].t()) if bias is not None else torch.mm(h, weights[0].t())
    if op == "left_matmul":  # W @ x^T: the weight on the left
        return (weights[0] @ h.t()).t()
    if op == "self_attention":  # scores between tokens with no weight: bmm / softmax / bmm
        scores = torch.bmm(h, h.transpose(1, 2)) / math.sqrt(h.shape[-1])
        return torch.bmm(scores.softmax(-1), h)
    if op == "attention":
        return _attention(h, weights, bias, heads=args[0], sdpa=args[1])
    if op == "pointwise_conv":  # (B, T, D) as a (B, D, T, 1) image through a 1x1 convolution, and back
        image = h.transpose(1, 2).unsqueeze(-1)
        return F.conv2d(image, weights[0][:, :, None, None], bias, stride=(args[0], 1)).squeeze(-1).transpose(1, 2)
    if op == "flatten":
        return h.reshape(-1, h.shape[-1])
    if op == "permute":
        return h.permute(*args)
    if op == "transpose_roundtrip":
        return h.transpose(-1, -2).contiguous().transpose(-1, -2)
    if op == "mix_features":  # a view that interleaves features: what head splitting does
        return h.view(*h.shape[:-1], 2, h.shape[-1] // 2).transpose(-1, -2).reshape(h.shape)
    if op == "slice_features":
        return h[..., args[0]:args[1]]
    if op == "slice_rows":
        return h[: args[0]]
    if op == "residual_add":
        return h + kept[args[0]]
    if op == "residual_mul":
        return h * kept[args[0]]
    if op == "scale":
        return h * args[0] + args[1]
    if op == "relu":
        return torch.relu(h)
    if op == "gelu":
        return F.gelu(h, approximate=args[0])
    if op == "softmax":
        return h.softmax(-1)
    if op == "layer_norm":
        weight = bias if bias is None else torch.ones_like(bias) + bias
        return F.layer_norm(h, (args[0],), weight, bias, eps=args[1])
    raise AssertionError(f"unknown step {op}")


def _attention(h: torch.Tensor, weights: list[torch.Tensor], bias: torch.Tensor | None, heads: int,
               sdpa: bool) -> torch.Tensor:
    q_w, k_w, v_w, o_w = weights
    batch, tokens, width = h.shape
    split = [F.linear(h, w).view(batch, tokens, heads, width // heads).transpose(1, 2) for w in (q_w, k_w, v_w)]
    if sdpa:
        mixed = F.scaled_dot_product_attention(*split)
    else:
        q, k, v = split
        mixed = (q @ k.transpose(-1, -2) / math.sqrt(width // heads)).softmax(-1) @ v
    return F.linear(mixed.transpose(1, 2).reshape(batch, tokens, width), o_w, bias)


# ------------------------------------------------------------------------------------------------- strategies

def weight_specs(rows: int, cols: int) -> st.SearchStrategy[WeightSpec]:
    return st.builds(WeightSpec, st.just(rows), st.just(cols), st.sampled_from(PATTERNS),
                     st.sampled_from((0.02, 0.1, 0.3, 0.6)), st.sampled_from(BLOCKS), st.integers(0, 2**16))


# Options a user may pass that change what is built; the planner always uses the break-even rule (it never
# measures, so a case's plan does not depend on the clock) and lets every weight size go sparse.
OPTION_CHOICES = {
    "offload": ("sparse", "all"),
    "formats": (None, ("csr",), ("bsr",), ("ell",), ("dense", "csr"), ("dense", "bsr4x1"), ("dense", "ell")),
    "csr_max_density": (None, 1.0),
    "verify": (True, False),
    "num_threads": (None, 1),
}


@st.composite
def programs(draw: st.DrawFn, max_steps: int = 6) -> Program:
    lead = tuple(draw(st.lists(st.sampled_from(LEADING), min_size=1, max_size=2)))
    width = draw(st.sampled_from(SIZES))
    vocab = draw(st.sampled_from((0, 0, 11)))
    shape = (*lead, width)
    kept = [shape]
    steps = []
    for _ in range(draw(st.integers(1, max_steps))):
        step, shape = draw(_step(shape, kept))
        if step.keep:
            kept.append(shape)
        steps.append(step)
    extra = draw(st.lists(st.integers(0, len(kept) - 1), max_size=2, unique=True))
    options = (("cost_model", "break-even"), ("min_weight_numel", 1), ("dense_backend", "eager"),
               *((k, draw(st.sampled_from(v))) for k, v in OPTION_CHOICES.items()))
    return Program(lead, width, vocab, tuple(steps), tuple(extra), options)


@st.composite
def _step(draw: st.DrawFn, shape: tuple[int, ...], kept: list[tuple[int, ...]]) -> tuple[Step, tuple[int, ...]]:
    *lead, width = shape
    choices = ["linear", "linear", "linear", "matmul", "relu", "gelu", "softmax", "layer_norm", "scale",
               "transpose_roundtrip", "slice_features", "slice_rows", "residual_add", "residual_mul"]
    if len(lead) == 1:
        choices += ["addmm", "left_matmul"]
    if len(lead) == 2:
        choices += ["self_attention", "flatten", "permute", "attention", "attention", "pointwise_conv"]
    if width % 2 == 0:
        choices.append("mix_features")
    op = draw(st.sampled_from(choices))
    keep = draw(st.booleans())
    same = [i for i, s in enumerate(kept) if s == shape]
    if op in ("linear", "matmul", "addmm"):
        out = draw(st.sampled_from(SIZES))
        return Step(op, (draw(weight_specs(out, width)),), bias=draw(st.booleans()), keep=keep), (*lead, out)
    if op == "pointwise_conv":
        out, stride = draw(st.sampled_from(SIZES)), draw(st.sampled_from((1, 2)))
        return (Step(op, (draw(weight_specs(out, width)),), (stride,), bias=draw(st.booleans()), keep=keep),
                (lead[0], -(-lead[1] // stride), out))
    if op == "left_matmul":
        out = draw(st.sampled_from(SIZES))
        return Step(op, (draw(weight_specs(out, width)),), keep=keep), (*lead, out)
    if op == "attention":
        heads = draw(st.sampled_from([h for h in (1, 2, 4) if width % h == 0]))
        weights = tuple(draw(weight_specs(width, width)) for _ in range(4))
        return Step(op, weights, (heads, draw(st.booleans())), bias=draw(st.booleans()), keep=keep), shape
    if op == "permute":
        return Step(op, args=(1, 0, 2), keep=keep), (lead[1], lead[0], width)
    if op == "flatten":
        return Step(op, keep=keep), (math.prod(lead), width)
    if op == "slice_features":
        start = draw(st.integers(0, width - 1))
        stop = draw(st.integers(start + 1, width))
        return Step(op, args=(start, stop), keep=keep), (*lead, stop - start)
    if op == "slice_rows":
        rows = draw(st.integers(1, lead[0]))
        return Step(op, args=(rows,), keep=keep), (rows, *lead[1:], width)
    if op in ("residual_add", "residual_mul"):
        if not same:
            return Step("relu", keep=keep), shape
        return Step(op, args=(draw(st.sampled_from(same)),), keep=keep), shape
    if op == "scale":
        return Step(op, args=(draw(st.sampled_from((0.5, -2.0, 3.0))), draw(st.sampled_from((0.0, 1.0)))),
                    keep=keep), shape
    if op == "gelu":
        return Step(op, args=(draw(st.sampled_from(("none", "tanh"))),), keep=keep), shape
    if op == "layer_norm":
        return Step(op, args=(width, draw(st.sampled_from((1e-5, 1e-12)))), bias=draw(st.booleans()),
                    keep=keep), shape
    return Step(op, keep=keep), shape
