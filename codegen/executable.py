"""A built region as an nn.Module the outer FX graph calls: torch tensors cross through DLPack both ways.

A relax VirtualMachine is not safe to call from two threads at once (its register frames are shared; concurrent
calls crashed the process), so the regions of one VM share a lock held while the VM runs. Kernels already use every
core, so serving threads lose little by taking turns inside TVM; PyTorch's ops between regions still overlap.

The region's packed weights stay torch tensors held here (plain attributes rather than buffers, since `.to()` would
leave the TVM views behind); those views are made once rather than on every call.
"""

from __future__ import annotations

import threading
from typing import Mapping

import torch
import tvm


# TVM takes DLPack tensors only at 64-byte aligned addresses; torch's allocator gives that, views at an offset and
# tensors mapped from a file (safetensors) need not.
TVM_ALIGNMENT = 64


def aligned(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    return t if t.data_ptr() % TVM_ALIGNMENT == 0 else t.clone()


class TvmRegion(torch.nn.Module):
    def __init__(self, function: tvm.runtime.PackedFunc, name: str, weights: Mapping[str, torch.Tensor],
                 vm_lock: threading.Lock):
        """`weights`: the region's constants by attribute name, in the order its function takes them. `vm_lock`:
        one lock for every region of the same VirtualMachine."""
        super().__init__()
        self._vm_lock = vm_lock
        self.region_name = name
        self._fn = function
        self.weights = {k: aligned(w) for k, w in weights.items()}
        self._tvm_weights = [tvm.runtime.from_dlpack(w) for w in self.weights.values()]
        self.calls = 0  # how often the TVM function ran: what shows a caller the sparse path was taken

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inputs = [tvm.runtime.from_dlpack(aligned(a)) for a in args]
        with self._vm_lock:
            outs = self._fn(*inputs, *self._tvm_weights)
            self.calls += 1
        # Handing torch the capsule skips its device and stream negotiation, which CPU outputs do not need (about
        # 1 us an output; regions are built for the host CPU only).
        return tuple([torch.from_dlpack(o.__dlpack__()) for o in outs])

    # Called straight from the outer graph's code, skipping nn.Module's hook dispatch (a few us a call, which a
    # one-Linear graph of ~150 us notices; nothing hooks this internal module).
    __call__ = forward
