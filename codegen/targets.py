"""Host target detection and TVM's thread pool size.

The wheel's default LLVM triple (x86_64-conda-linux-gnu) makes TVM reject `-mcpu=native` and fall back to a
generic CPU without AVX2/FMA, which costs 2-3x. So the CPU name is asked from LLVM and the triple is
set explicitly.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import re

import torch
import tvm

from sparsecc.errors import OptionError
from sparsecc.settings import target_fields

log = logging.getLogger(__name__)

_TRIPLES = {"x86_64": "x86_64-linux-gnu", "amd64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu",
            "arm64": "aarch64-linux-gnu"}


@functools.cache
def host_cpu() -> str:
    cpu = tvm.target.codegen.llvm_get_system_cpu()
    if not cpu or cpu == "generic":
        log.warning("LLVM could not name this host's CPU; kernels are built for a generic CPU and run slower")
        return "generic"
    known = _known_cpus()
    if known and cpu not in known:
        # A CPU newer than TVM's LLVM: LLVM would log an error per target and build for a generic CPU anyway.
        log.warning("this host's CPU %r is unknown to TVM's LLVM %d; kernels are built for a generic CPU and run "
                    "slower (a newer apache-tvm, or option target= naming an older CPU of the same family, avoids "
                    "that)", cpu, tvm.target.codegen.llvm_version_major())
        return "generic"
    return cpu


def _known_cpus() -> frozenset[str]:
    """The CPU names TVM's LLVM accepts for this machine's triple (empty when the triple is not one sparsecc knows)."""
    triple = _host_triple()
    if triple is None:
        return frozenset()
    return frozenset(map(str, tvm.target.codegen.llvm_get_cpu_archlist(tvm.target.Target({"kind": "llvm",
                                                                                         "mtriple": triple}))))


def _host_triple() -> str | None:
    return _TRIPLES.get(platform.machine().lower())


def host_target(num_threads: int) -> tvm.target.Target:
    triple = _host_triple()
    spec = {"kind": "llvm", "mcpu": host_cpu(), "num-cores": num_threads}
    if triple is not None:
        spec["mtriple"] = triple
    return tvm.target.Target(spec)


@functools.lru_cache(maxsize=32)
def parse_target(spec: str, num_threads: int) -> tvm.target.Target:
    """The `target` option -> a TVM target (parsed once per option and thread count). Raises OptionError saying what
    is accepted, or what TVM rejected."""
    if spec == "host":
        return host_target(num_threads)
    fields = target_fields(spec)
    try:
        return tvm.target.Target({"num-cores": num_threads, **fields})
    except Exception as exc:  # TVM's own check of the fields: unknown keys, CPUs or triples
        raise OptionError(f"option 'target': TVM rejects {spec!r}: {exc}") from None


def target_arch(target: tvm.target.Target) -> str:
    triple = str(target.attrs.get("mtriple", "")) or tvm.target.codegen.llvm_get_system_triple()
    return triple.split("-")[0]


def host_arch() -> str:
    return _TRIPLES.get(platform.machine().lower(), platform.machine().lower()).split("-")[0]


# Instruction-set features (code using one faults on a CPU without it); LLVM's list also holds tuning flags
# such as "slow-3ops-lea" that say nothing about where code runs.
_ISA_FEATURE = re.compile(r"^(sse|ssse|avx|fma|bmi|f16c|popcnt|lzcnt|movbe|aes|pclmul|sha|vaes|vpclmulqdq|gfni|amx|"
                          r"adx|cx16|sve|neon|fp-armv8|dotprod|i8mm|bf16|fullfp16|sme)")


def cpu_features(target: tvm.target.Target) -> list[str]:
    return sorted(f for f in map(str, tvm.target.codegen.llvm_get_cpu_features(target)) if _ISA_FEATURE.match(f))


@functools.cache
def host_features() -> frozenset[str]:
    return frozenset(cpu_features(host_target(1)))


def missing_features(target: tvm.target.Target) -> list[str]:
    """CPU features code built for `target` may use that this machine's CPU lacks (empty: it runs here)."""
    if target_arch(target) != host_arch():
        return [f"arch {target_arch(target)}"]
    return [f for f in cpu_features(target) if f not in host_features()]


def target_of(settings) -> tvm.target.Target:
    """The TVM target of resolved settings (`Settings.resolved`): their `target` option for their thread count."""
    return parse_target(settings.target, settings.threads)


def runs_here(target: tvm.target.Target) -> bool:
    return not missing_features(target)


# threading::ThreadGroup::kSpecifyThreadShareAllCore: workers may run on any of the listed CPUs.
_SHARE_ALL_CORES = -3


def _usable_cpus() -> list[str]:
    try:
        return [str(c) for c in sorted(os.sched_getaffinity(0))]
    except AttributeError:  # not on Linux
        return [str(c) for c in range(os.cpu_count() or 1)]


def configure_threads(num_threads: int) -> int:
    """Size TVM's worker pool like PyTorch's and return the threads TVM will use.

    TVM creates its pool once, at first use, with hardware_concurrency / 2 workers on x86 (it assumes
    hyper-threading): one worker on a 2-core machine. Passing the CPU list raises that ceiling when it
    runs before the pool exists, which is why this module does it at import.
    """
    cpus = _usable_cpus()
    tvm.get_global_func("runtime.config_threadpool")(_SHARE_ALL_CORES, min(num_threads, len(cpus)), cpus)
    used = tvm.runtime.num_threads()
    if used < min(num_threads, len(cpus)):
        log.warning("TVM's thread pool was created with %d threads before sparsecc configured it; kernels use "
                    "%d of the %d threads asked for (set TVM_NUM_THREADS before TVM is first used)",
                    used, used, num_threads)
    return used


# TVM's idle workers spin (yielding) this many times before they sleep, when PyTorch's OpenMP threads are known
# to sleep soon after each op. Each kernel then finds its worker awake instead of paying a wake-up: BERT-base at
# 90 % with GOMP_SPINCOUNT=1000, 32 ms against 42-51 ms with no spin (300: 39 ms, 3000: 42, 10000: 35-37).
TVM_SPINS_BESIDE_QUIET_OMP = 1000
# A GOMP_SPINCOUNT at or below this counts as quiet; libgomp's own default is 300 000 spins.
QUIET_OMP_SPINS = 10_000
_GOMP_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def omp_spins(environ) -> float:
    """How long PyTorch's OpenMP threads spin after an op, as libgomp reads the environment: OMP_WAIT_POLICY=passive
    means not at all; GOMP_SPINCOUNT is a count with an optional k/M/G/T suffix or INFINITE; unset means long."""
    if environ.get("OMP_WAIT_POLICY", "").strip().lower() == "passive":
        return 0
    text = environ.get("GOMP_SPINCOUNT", "").strip().lower()
    match = re.fullmatch(r"(\d+)\s*([kmgt]?)", text)
    if match is None:
        return float("inf")
    return int(match.group(1)) * _GOMP_SUFFIXES[match.group(2)]


# libgomp reads its spin settings once, when PyTorch loads it; so does sparsecc, at import, not at every build.
OMP_SPINS = omp_spins(os.environ)


def default_tvm_spin_count(environ) -> int:
    """TVM_THREAD_POOL_SPIN_COUNT when the user set none: spin only beside quiet OpenMP threads. Beside spinning
    ones both pools fight for the cores: BERT-base at 90 % took 100-128 ms with 1000 spins against 52-57 ms with
    none, and eager PyTorch slowed down too (docs/benchmarks.md, Threads)."""
    return TVM_SPINS_BESIDE_QUIET_OMP if omp_spins(environ) <= QUIET_OMP_SPINS else 0


# TVM offers no API for these two, only variables read when its pool starts; a value the user set wins.
# - TVM pins its workers, and the calling thread, to cores; PyTorch's OpenMP threads created later inherit
#   the pin, and eager PyTorch ran up to 1.7x slower here.
# - Idle spinning: see default_tvm_spin_count.
os.environ.setdefault("TVM_BIND_THREADS", "0")
os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", str(default_tvm_spin_count(os.environ)))
configure_threads(torch.get_num_threads())
