"""A built region as an nn.Module the outer FX graph calls: torch tensors cross through DLPack both ways."""

from __future__ import annotations

import torch
import tvm
from tvm import relax


class TvmRegion(torch.nn.Module):
    def __init__(self, vm: relax.VirtualMachine, name: str):
        super().__init__()
        self.region_name = name
        self._fn = vm[name]

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = self._fn(*[tvm.runtime.from_dlpack(a.contiguous()) for a in args])
        return tuple(torch.from_dlpack(o) for o in outs)
