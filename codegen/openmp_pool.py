"""Run the TVM kernels' parallel loops on PyTorch's OpenMP threads instead of TVM's own pool.

Why: a model compiled by sparsecc alternates TVM kernels with PyTorch ops (attention, layer norm). With two
pools on the same cores, whichever pool just worked still spins while the other needs the cores, or has gone
to sleep and must be woken. Tuning TVM's spin count only helped beside OpenMP threads told to sleep early
(GOMP_SPINCOUNT=1000); in the default environment BERT-base at 90 % ran at about half speed (docs/benchmarks.md,
"Threads"). On one pool that choice disappears: PyTorch's threads, awake from its last op, run the next kernel.

How: code that TVM generates for a CPU calls its runtime's parallel launcher through a pointer stored in the
library (`__TVMBackendParallelLaunch`), which TVM fills when it loads the library. After loading, sparsecc
points it (and the barrier's) at a small C function that starts an OpenMP team in the OpenMP runtime PyTorch
already loaded and runs TVM's task closure on each thread. That needs a C compiler (the same one TVM needs to
write a library) and a loaded OpenMP runtime with the GNU entry points (libgomp, or LLVM's libomp which also
provides them); without either, kernels stay on TVM's pool and a log line says why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import re
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

# TVM's parallel-launch ABI (tvm/runtime/c_backend_api.h): the generated closure takes its task id and the group
# (its size), and returns non-zero on error. Tasks are the team's threads, as on TVM's own pool.
SHIM_SOURCE = r"""
#include <stdint.h>
#ifdef __cplusplus
extern "C" {
#endif
typedef struct { void* sync_handle; int32_t num_task; } ParallelGroup;
typedef int (*ParallelClosure)(int task_id, ParallelGroup* group, void* data);
typedef void (*GompParallel)(void (*fn)(void*), void* data, unsigned num_threads, unsigned flags);
typedef int (*OmpQuery)(void);
typedef void (*GompBarrier)(void);

static GompParallel gomp_parallel;
static GompBarrier gomp_barrier;
static OmpQuery thread_num, team_size;
/* Launches made and the last team's size: one relaxed add per kernel, so tests and users can see the path ran. */
static unsigned long long launches;
static int last_team;

struct launch { ParallelClosure closure; void* data; int status; };

static void run_task(void* arg) {
  struct launch* l = (struct launch*)arg;
  ParallelGroup group = {0, team_size()};
  if (group.num_task > 0 && thread_num() == 0) last_team = group.num_task;
  int status = l->closure(thread_num(), &group, l->data);
  if (status != 0) __atomic_store_n(&l->status, status, __ATOMIC_RELAXED);
}

/* num_task 0 (what TVM's code passes) takes the calling thread's OpenMP thread count, the one PyTorch set. */
int sparsecc_parallel_launch(ParallelClosure closure, void* data, int num_task) {
  struct launch l = {closure, data, 0};
  __atomic_fetch_add(&launches, 1ull, __ATOMIC_RELAXED);
  gomp_parallel(run_task, &l, num_task > 0 ? (unsigned)num_task : 0u, 0u);
  return l.status;
}

int sparsecc_parallel_barrier(int task_id, ParallelGroup* group) {
  (void)task_id; (void)group;
  gomp_barrier();
  return 0;
}

unsigned long long sparsecc_launches(void) { return __atomic_load_n(&launches, __ATOMIC_RELAXED); }
int sparsecc_last_team(void) { return last_team; }

void sparsecc_bind_openmp(void* parallel, void* barrier, void* get_thread_num, void* get_num_threads) {
  gomp_parallel = (GompParallel)parallel;
  gomp_barrier = (GompBarrier)barrier;
  thread_num = (OmpQuery)get_thread_num;
  team_size = (OmpQuery)get_num_threads;
}
#ifdef __cplusplus
}
#endif
"""

_OPENMP_ENTRY_POINTS = ("GOMP_parallel", "GOMP_barrier", "omp_get_thread_num", "omp_get_num_threads")
_OPENMP_LIBRARY = re.compile(r"lib(gomp|omp|iomp5)[-.\w]*\.(so|dylib)[.\d]*$")
# The pointers TVM's loader fills in a library, and the shim's functions that replace them.
_REDIRECTS = {"__TVMBackendParallelLaunch": "sparsecc_parallel_launch",
              "__TVMBackendParallelBarrier": "sparsecc_parallel_barrier"}


def loaded_openmp_library() -> str | None:
    """Path of the OpenMP runtime this process has loaded (PyTorch's), from the memory map; None if none is."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        path = line.split(maxsplit=5)[-1] if line.count(" ") >= 5 else ""
        if _OPENMP_LIBRARY.search(path):
            return path
    return None


@functools.lru_cache(maxsize=None)
def _shim(cache_dir: str | None = None) -> ctypes.CDLL | None:
    """The launcher, built once (cached on disk by its source, under `cache_dir`) and bound to PyTorch's OpenMP
    runtime. The process has one OpenMP runtime and one launch counter: whichever cache directory built the
    launcher first, its library is the one later callers get."""
    import torch  # noqa: F401  (loads the OpenMP runtime this binds to)

    openmp_path = loaded_openmp_library()
    if openmp_path is None:
        log.info("openmp: no OpenMP runtime loaded in this process; TVM kernels use TVM's thread pool")
        return None
    openmp = ctypes.CDLL(openmp_path)  # the already loaded library, not a second copy
    missing = [name for name in _OPENMP_ENTRY_POINTS if not hasattr(openmp, name)]
    if missing:
        log.info("openmp: %s lacks %s; TVM kernels use TVM's thread pool", openmp_path, ", ".join(missing))
        return None
    try:
        shim = _loaded_shim(cache_dir)
    except Exception as exc:  # no compiler, unwritable cache, ...
        log.info("openmp: could not build the OpenMP launcher (%s: %s); TVM kernels use TVM's thread pool",
                 type(exc).__name__, exc)
        return None
    shim.sparsecc_launches.restype = ctypes.c_ulonglong
    shim.sparsecc_bind_openmp(*(ctypes.c_void_p(address_of(openmp, name)) for name in _OPENMP_ENTRY_POINTS))
    log.debug("openmp: TVM kernels run on the OpenMP threads of %s", openmp_path)
    return shim


_LOADED: list[ctypes.CDLL] = []


def _loaded_shim(cache_dir: str | None) -> ctypes.CDLL:
    # One launcher per process: two copies would each count launches and bind OpenMP on their own.
    if not _LOADED:
        _LOADED.append(ctypes.CDLL(str(_built_shim(cache_dir))))
    return _LOADED[0]


def _built_shim(cache_dir: str | None) -> Path:
    from tvm.support import cc

    from sparsecc.cache import default_cache_dir

    digest = hashlib.sha256(SHIM_SOURCE.encode()).hexdigest()[:16]
    for directory in (default_cache_dir(cache_dir) / "openmp", Path(tempfile.gettempdir()) / f"sparsecc-{os.getuid()}"):
        library = directory / f"launch-{digest}.so"
        if library.exists():
            return library
        try:
            directory.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=directory) as work:
                source = Path(work) / "launch.c"
                source.write_text(SHIM_SOURCE)
                built = Path(work) / "launch.so"
                cc.create_shared(str(built), [str(source)], options=["-O2"])
                os.replace(built, library)  # atomic: a concurrent process sees all of it or none
            return library
        except OSError as exc:  # read-only or unwritable: try the next place
            log.debug("openmp: cannot build the launcher in %s: %s", directory, exc)
    raise OSError("no writable directory for the OpenMP launcher")


def address_of(library: ctypes.CDLL, symbol: str) -> int:
    return ctypes.cast(getattr(library, symbol), ctypes.c_void_p).value


def available(cache_dir: str | None = None) -> bool:
    """Whether TVM kernels can run on PyTorch's OpenMP threads in this process (building the launcher under
    `cache_dir`, the option's directory, when it is not built yet)."""
    return _shim(cache_dir) is not None


def launch_count() -> tuple[int, int]:
    """Parallel launches made on PyTorch's OpenMP threads in this process, and the size of the last team
    ((0, 0) before the launcher was loaded, or where it is unavailable)."""
    shim = _LOADED[0] if _LOADED else None
    if shim is None:
        return 0, 0
    return int(shim.sparsecc_launches()), int(shim.sparsecc_last_team())


def redirect_parallel_launch(library_path: str | os.PathLike, cache_dir: str | None = None) -> bool:
    """Point a TVM library, already loaded by `tvm.runtime.load_module` from `library_path`, at the OpenMP
    launcher. Returns False, leaving it on TVM's pool, where the launcher is unavailable or the library has no
    parallel code."""
    shim = _shim(cache_dir)
    if shim is None:
        return False
    library = ctypes.CDLL(str(library_path))  # the handle TVM opened: same path, same mapping
    redirected = []
    for slot, function in _REDIRECTS.items():
        try:
            ctypes.c_void_p.in_dll(library, slot).value = address_of(shim, function)
            redirected.append(slot)
        except ValueError:  # no parallel loop (or no barrier) in this library: nothing to point
            pass
    return "__TVMBackendParallelLaunch" in redirected
