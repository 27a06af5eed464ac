"""Which weights a pruning method removes, for each pattern the kernels have: unstructured, N:M along the input
dimension, and r x c blocks of the (out, in) matrix. Every function takes a score per weight (higher: keep) and
returns a boolean keep-mask of the same shape."""

from __future__ import annotations

import dataclasses
import re

import torch

from sparsecc.errors import OptionError


@dataclasses.dataclass(frozen=True)
class Pattern:
    """"unstructured", "N:M" (keep n of every m consecutive inputs) or "RxC" (blocks of r outputs x c inputs)."""

    kind: str  # "unstructured" | "nm" | "block"
    n: int = 0
    m: int = 0
    rows: int = 1
    cols: int = 1

    @classmethod
    def parse(cls, text: str) -> "Pattern":
        if text == "unstructured":
            return cls("unstructured")
        if match := re.fullmatch(r"(\d+):(\d+)", text):
            n, m = int(match[1]), int(match[2])
            if not 0 < n < m:
                raise OptionError(f"option 'prune': pattern {text!r} must keep 0 < N < M weights of every M")
            return cls("nm", n=n, m=m)
        if match := re.fullmatch(r"(\d+)x(\d+)", text):
            r, c = int(match[1]), int(match[2])
            if r < 1 or c < 1 or r * c == 1:
                raise OptionError(f"option 'prune': block pattern {text!r} needs blocks of more than one weight")
            return cls("block", rows=r, cols=c)
        raise OptionError(f"option 'prune': pattern {text!r} is not 'unstructured', 'N:M' (e.g. '2:4') or 'RxC' "
                          "(e.g. '16x1')")

    @property
    def label(self) -> str:
        return {"unstructured": "unstructured", "nm": f"{self.n}:{self.m}", "block": f"{self.rows}x{self.cols}"}[
            self.kind]

    @property
    def fixed_sparsity(self) -> float | None:
        """N:M fixes the sparsity of every layer it prunes; the others take any level."""
        return 1.0 - self.n / self.m if self.kind == "nm" else None

    def fits(self, shape: tuple[int, int]) -> bool:
        """Whether an (out, in) matrix of `shape` can hold this pattern."""
        out, inp = shape
        if self.kind == "nm":
            return inp % self.m == 0
        if self.kind == "block":
            return out % self.rows == 0 and inp % self.cols == 0
        return True


def keep_mask(score: torch.Tensor, sparsity: float, pattern: Pattern, per_row: bool = False) -> torch.Tensor:
    """Keep the highest-scoring weights of an (out, in) `score`. Unstructured: `sparsity` of the layer (or of each
    row with `per_row`) goes; N:M: the m - n lowest of each group; blocks: the lowest-scoring blocks by summed
    score."""
    if pattern.kind == "nm":
        out, inp = score.shape
        groups = score.reshape(out, inp // pattern.m, pattern.m)
        drop = groups.topk(pattern.m - pattern.n, dim=2, largest=False).indices
        mask = torch.ones_like(groups, dtype=torch.bool).scatter_(2, drop, False)
        return mask.reshape(out, inp)
    if pattern.kind == "block":
        out, inp = score.shape
        r, c = pattern.rows, pattern.cols
        blocks = score.reshape(out // r, r, inp // c, c).sum(dim=(1, 3))
        kept = _keep_lowest_out(blocks, sparsity, per_row=False)
        return kept.repeat_interleave(r, dim=0).repeat_interleave(c, dim=1)
    return _keep_lowest_out(score, sparsity, per_row)


def _keep_lowest_out(score: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    if per_row:
        drop = int(round(score.shape[1] * sparsity))
        mask = torch.ones_like(score, dtype=torch.bool)
        if drop:
            mask.scatter_(1, score.topk(drop, dim=1, largest=False).indices, False)
        return mask
    drop = int(round(score.numel() * sparsity))
    mask = torch.ones(score.numel(), dtype=torch.bool)
    if drop:
        mask[score.flatten().topk(drop, largest=False).indices] = False
    return mask.reshape(score.shape)
