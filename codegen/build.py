"""Build: IRModule -> Relax executable for the chosen target (a VM only where it runs)."""

from __future__ import annotations

import logging
import time

import tvm
from tvm import relax

from sparsecc.codegen.targets import configure_threads, missing_features, parse_target, resolve_threads
from sparsecc.settings import Settings

log = logging.getLogger(__name__)


def build(mod: tvm.IRModule, settings: Settings) -> tuple[tvm.runtime.Executable, tvm.target.Target]:
    threads = resolve_threads(settings.num_threads)
    target = parse_target(settings.target, threads)
    configure_threads(threads)
    start = time.perf_counter()
    executable = tvm.compile(mod, target=target)
    log.info("build: compiled for %s in %.1f s", target.attrs.get("mcpu", "?"), time.perf_counter() - start)
    return executable, target


def runs_here(target: tvm.target.Target) -> bool:
    return not missing_features(target)


def virtual_machine(executable: tvm.runtime.Executable) -> relax.VirtualMachine:
    return relax.VirtualMachine(executable, tvm.cpu())
