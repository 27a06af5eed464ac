"""Host target detection and TVM's thread pool size.

The wheel's default LLVM triple (x86_64-conda-linux-gnu) makes TVM reject `-mcpu=native` and fall back to a
generic CPU without AVX2/FMA, which costs 2-3x. So the CPU name is asked from LLVM and the triple is
set explicitly.
"""

from __future__ import annotations

import functools
import logging
import platform

import torch
import tvm

log = logging.getLogger(__name__)

_TRIPLES = {"x86_64": "x86_64-linux-gnu", "amd64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu",
            "arm64": "aarch64-linux-gnu"}


@functools.cache
def host_cpu() -> str:
    cpu = tvm.target.codegen.llvm_get_system_cpu()
    if not cpu or cpu == "generic":
        log.warning("LLVM could not name this host's CPU; kernels are built for a generic CPU and run slower")
        return "generic"
    return cpu


def host_target(num_threads: int) -> tvm.target.Target:
    machine = platform.machine().lower()
    triple = _TRIPLES.get(machine)
    spec = {"kind": "llvm", "mcpu": host_cpu(), "num-cores": num_threads}
    if triple is not None:
        spec["mtriple"] = triple
    return tvm.target.Target(spec)


def resolve_threads(requested: int | None) -> int:
    return requested if requested is not None else torch.get_num_threads()


_configured: list[int] = []


def configure_threads(num_threads: int) -> None:
    """Size TVM's worker pool like PyTorch's: two busy-waiting pools larger than the cores thrash."""
    if _configured and _configured[-1] == num_threads:
        return
    big_cores_mode = 1  # threading::ThreadGroup::kBig: on a uniform CPU every core is "big"
    tvm.get_global_func("runtime.config_threadpool")(big_cores_mode, num_threads)
    _configured.append(num_threads)
