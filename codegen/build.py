"""Build: IRModule -> Relax VM for the host CPU."""

from __future__ import annotations

import logging
import time

import tvm
from tvm import relax

from sparsecc.codegen.targets import configure_threads, host_target, resolve_threads
from sparsecc.settings import Settings

log = logging.getLogger(__name__)


def build(mod: tvm.IRModule, settings: Settings) -> relax.VirtualMachine:
    threads = resolve_threads(settings.num_threads)
    target = host_target(threads)
    configure_threads(threads)
    start = time.perf_counter()
    executable = tvm.compile(mod, target=target)
    log.info("build: compiled for %s in %.1f s", target.attrs.get("mcpu", "?"), time.perf_counter() - start)
    return relax.VirtualMachine(executable, tvm.cpu())
