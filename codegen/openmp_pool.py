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

import _ctypes
import ctypes
import functools
import hashlib
import logging
import os
import re
import struct
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
# The shim's own functions: a library at the launcher's path without them is not the launcher.
_SHIM_FUNCTIONS = ("sparsecc_parallel_launch", "sparsecc_parallel_barrier", "sparsecc_launches", "sparsecc_last_team",
                   "sparsecc_bind_openmp")


def _loaded_shim(cache_dir: str | None) -> ctypes.CDLL:
    # One launcher per process: two copies would each count launches and bind OpenMP on their own.
    if not _LOADED:
        library = _built_shim(cache_dir)
        try:
            shim = _open_shim(library)
        except OSError as exc:  # passed the file check, yet the loader refuses it: build a fresh one
            log.warning("openmp: the cached OpenMP launcher %s cannot be loaded (%s); building it again", library, exc)
            shim = _open_shim(_built_shim(cache_dir, rebuild=True))
        _LOADED.append(shim)
    return _LOADED[0]


def _open_shim(library: Path) -> ctypes.CDLL:
    shim = ctypes.CDLL(str(library))
    missing = [name for name in _SHIM_FUNCTIONS if not hasattr(shim, name)]
    if missing:
        # Unloaded, or loading the rebuilt file at the same path would hand back this handle again.
        _ctypes.dlclose(shim._handle)
        raise OSError(f"{library} lacks {', '.join(missing)}")
    return shim


def _built_shim(cache_dir: str | None, rebuild: bool = False) -> Path:
    """The launcher's library, from the cache when it is there and whole, else built (`rebuild`: built whatever is
    there). In the cache directory, else in the temporary directory where the cache cannot be written."""
    digest = hashlib.sha256(SHIM_SOURCE.encode()).hexdigest()[:16]
    errors = []
    for directory in _shim_directories(cache_dir):
        library = directory / f"launch-{digest}.so"
        if library.exists() and not rebuild:
            problem = _damage(library)
            if problem is None:
                return library
            log.warning("openmp: the cached OpenMP launcher %s is damaged (%s); building it again", library, problem)
        try:
            _build(directory, library)
            return library
        except (OSError, RuntimeError) as exc:  # read-only, full, no compiler (RuntimeError): try the next place
            log.debug("openmp: cannot build the launcher in %s: %s", directory, exc)
            errors.append(f"{directory}: {exc}")
    raise OSError("no writable directory for the OpenMP launcher (" + "; ".join(errors) + ")")


def _shim_directories(cache_dir: str | None) -> tuple[Path, Path]:
    from sparsecc.cache import default_cache_dir

    return default_cache_dir(cache_dir) / "openmp", Path(tempfile.gettempdir()) / f"sparsecc-{os.getuid()}"


def _build(directory: Path, library: Path) -> None:
    """Compile the launcher in a private temporary directory and rename it into place: a process loading it, or
    building it at the same time, sees all of one build or none."""
    from tvm.support import cc

    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as work:
        source = Path(work) / "launch.c"
        source.write_text(SHIM_SOURCE)
        built = Path(work) / "launch.so"
        cc.create_shared(str(built), [str(source)], options=["-O2"])
        problem = _damage(built)
        if problem is not None:  # e.g. the disk filled while the linker wrote it
            raise OSError(f"the compiler wrote a damaged launcher ({problem})")
        os.replace(built, library)


def _damage(library: Path) -> str | None:
    """Why `library` is not a whole shared library (None where it is): not ELF, or cut short. Loading a cut file
    can pass dlopen and then crash the process (SIGBUS) on the first access past its end, so this is checked from
    the ELF headers before loading: every loaded segment and the section table must lie inside the file."""
    try:
        with open(library, "rb") as f:
            data = f.read(1 << 16)
            size = os.fstat(f.fileno()).st_size
    except OSError as exc:
        return f"unreadable: {exc}"
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] not in (1, 2) or data[5] not in (1, 2):
        return "not an ELF shared library"
    wide, order = data[4] == 2, "<" if data[5] == 1 else ">"
    try:
        if wide:
            phoff, shoff = struct.unpack_from(order + "QQ", data, 0x20)
            phentsize, phnum, shentsize, shnum = struct.unpack_from(order + "HHHH", data, 0x36)
        else:
            phoff, shoff = struct.unpack_from(order + "II", data, 0x1C)
            phentsize, phnum, shentsize, shnum = struct.unpack_from(order + "HHHH", data, 0x2A)
        if shoff + shentsize * shnum > size:
            return f"cut short: {size} bytes, its section table ends at {shoff + shentsize * shnum}"
        for i in range(phnum):
            at = phoff + i * phentsize
            if wide:
                kind, _, offset, _, _, filesz = struct.unpack_from(order + "IIQQQQ", data, at)
            else:
                kind, offset, _, _, filesz = struct.unpack_from(order + "IIIII", data, at)
            if kind == 1 and offset + filesz > size:  # PT_LOAD
                return f"cut short: {size} bytes, a segment ends at {offset + filesz}"
    except struct.error:
        return "cut short inside its headers"
    return None


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
