"""Build: IRModule -> Relax executable for the chosen target (a VM only where it runs)."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import tvm
from tvm import relax

from sparsecc.codegen import targets
from sparsecc.codegen.openmp_pool import available as openmp_available
from sparsecc.codegen.openmp_pool import redirect_parallel_launch
from sparsecc.codegen.targets import QUIET_OMP_SPINS, configure_threads, target_of
from sparsecc.settings import Settings

log = logging.getLogger(__name__)


def build(mod: tvm.IRModule, settings: Settings) -> tuple[tvm.runtime.Executable, tvm.target.Target]:
    """`settings` resolved (`Settings.resolved`)."""
    target = target_of(settings)
    configure_threads(settings.threads)
    start = time.perf_counter()
    executable = tvm.compile(mod, target=target)
    log.info("build: compiled for %s in %.1f s", target.attrs.get("mcpu", "?"), time.perf_counter() - start)
    return executable, target


def uses_openmp(settings: Settings) -> bool:
    """Whether kernels built with `settings` (resolved) run on PyTorch's OpenMP threads (see codegen/openmp_pool.py)."""
    if settings.thread_pool == "tvm":
        return False
    if settings.thread_pool == "auto" and targets.OMP_SPINS <= QUIET_OMP_SPINS:
        log.info("build: PyTorch's OpenMP threads sleep soon after each op (GOMP_SPINCOUNT / OMP_WAIT_POLICY); "
                 "kernels use TVM's thread pool, whose workers spin between kernels")
        return False
    if settings.threads != torch.get_num_threads():
        log.info("build: num_threads=%d differs from PyTorch's %d threads; kernels use TVM's thread pool",
                 settings.num_threads, torch.get_num_threads())
        return False
    return openmp_available(settings.cache_dir)


def virtual_machine(executable: tvm.runtime.Executable, settings: Settings,
                    keep: Callable[[Path], None] | None = None) -> relax.VirtualMachine:
    """A VM of the executable. On PyTorch's OpenMP threads, or when `keep(library)` wants the library file (the
    kernel cache), the executable goes through a library file (deleted once loaded): only a loaded library's
    launcher pointer can be redirected."""
    if uses_openmp(settings) or keep is not None:
        with tempfile.TemporaryDirectory(prefix="sparsecc-vm-") as work:
            library = Path(work) / "regions.so"
            start = time.perf_counter()
            try:
                executable.export_library(str(library))
                _, vm = library_vm(library, settings)
            except Exception as exc:  # noqa: BLE001  (any failure here leaves the in-memory path)
                log.info("build: could not load the regions as a library (%s: %s); kernels use TVM's thread pool",
                         type(exc).__name__, exc)
            else:
                log.info("build: regions written and loaded as a library in %.2f s", time.perf_counter() - start)
                if keep is not None:
                    keep(library)
                return vm
    return relax.VirtualMachine(executable, tvm.cpu())


def library_vm(library: Path, settings: Settings) -> tuple[tvm.runtime.Module, relax.VirtualMachine]:
    """The loaded region library file and a VM of it, its kernels on PyTorch's OpenMP threads when `settings` say
    so."""
    module = tvm.runtime.load_module(str(library))
    if uses_openmp(settings) and redirect_parallel_launch(library, settings.cache_dir):
        log.info("build: kernels run on PyTorch's OpenMP threads")
    return module, relax.VirtualMachine(module, tvm.cpu())
