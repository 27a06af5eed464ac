"""Built regions kept on disk, so a second compile of the same model skips lowering and the TVM build.

Why: on a warm cache (plans read from the tuning database) lowering (TVMScript parsing each kernel) and LLVM's build
were 1.4 s of BERT-base's 6 s compile, for a library the first compile had already built.

Key: everything lowering reads. Each region's FX code, every node's shape and dtype, the region's inputs, and the
bytes of the packed weights it takes (values as well as indices: 45 MB for BERT-base at 90 %, hashed in ~30 ms, and
then no lowering decision can depend on something the key misses); the resolved settings less those that only
decide what happens around the build; the TVM target; sparsecc's, TVM's and torch's versions. Not cached: tuned
compiles (`tune`: the tuner and its database decide the knobs) and targets that do not run here (AOT builds them).

An entry is `<cache dir>/kernels/<key>/` holding the library (`regions.so`), the IRModule it was built from
(`irmodule.json`, so reports and tests still see the kernels) and `entry.json` with both files' sha256. It is written
into a temporary sibling and renamed into place. A reader checks both hashes and loads its own copy of the library
(dlopen returns the first library loaded from a path); a damaged entry is removed with one warning naming it and the
regions are built again. An unwritable cache directory means building every time, with one warning.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import tvm
from torch import fx
from tvm_ffi.serialization import from_json_graph_str

from sparsecc.cache import default_cache_dir
from sparsecc.passes.graph_utils import constant_of, shape_dtype
from sparsecc.settings import Settings

log = logging.getLogger(__name__)

ENTRY_FORMAT = 1
DIRECTORY = "kernels"
LIBRARY = "regions.so"
IRMODULE = "irmodule.json"
ENTRY = "entry.json"
# Entries kept; past this the least recently used go (a BERT-base entry is about 2 MB, so the cache stays small).
MAX_ENTRIES = 64
# Settings that never reach lowering or the build: they need not split the cache.
_UNUSED_BY_LOWERING = ("cache_dir", "verify", "on_failure", "on_weight_change", "dense_backend", "stop_after",
                       "prune", "cache_kernels")

_warned: set[str] = set()


@dataclasses.dataclass(frozen=True)
class CachedRegions:
    irmodule: tvm.IRModule
    library: bytes  # the checked library: its caller loads a private copy of these bytes


def region_key(gm: fx.GraphModule, settings: Settings, target: tvm.target.Target) -> str | None:
    """The cache key of `gm`'s partitioned regions (settings resolved), or None when they are not cached."""
    from sparsecc.codegen.importer import region_nodes

    if not settings.cache_kernels or settings.tune is not None:
        return None
    digest = hashlib.sha256()

    def add(*parts: Any) -> None:
        digest.update(json.dumps(parts, default=str).encode())
        digest.update(b"\0")

    options = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)
               if f.name not in _UNUSED_BY_LOWERING}
    add(ENTRY_FORMAT, _versions(), str(target), repr(sorted(options.items())))
    for call in region_nodes(gm):
        sub = gm.get_submodule(call.target)
        add(str(call.target), sub.code, [_shape(a) for a in call.args])
        add([(n.name, _shape(n)) for n in sub.graph.nodes])
        for node in sub.graph.nodes:
            if node.op == "get_attr":
                value = constant_of(sub, node)
                add(str(node.target), tuple(value.shape), str(value.dtype))
                digest.update(_bytes(value))
    return digest.hexdigest()


def load(key: str, settings: Settings) -> CachedRegions | None:
    """The entry for `key`, checked, or None (missing, or damaged: then removed with a warning)."""
    entry = _entry_dir(key, settings)
    if not (entry / ENTRY).exists():
        return None
    try:
        record = json.loads((entry / ENTRY).read_text())
        irmodule_text = _checked(entry / IRMODULE, record)
        library = _checked(entry / LIBRARY, record)
        # Without tvm.ir.load_json's upgrade from older TVM versions (0.3 s of Python for BERT-base): the entry was
        # written by this TVM version, which is part of its key.
        irmodule = from_json_graph_str(irmodule_text.decode())
    except Exception as exc:  # noqa: BLE001  (whatever is wrong with an entry, building again is the cure)
        _discard(entry, f"{type(exc).__name__}: {exc}")
        return None
    try:
        os.utime(entry)  # recently used: the last to be evicted
    except OSError:
        pass  # a read-only cache still serves its entries
    log.info("lower: regions read from the kernel cache (%s)", entry)
    return CachedRegions(irmodule, library)


def store(key: str, settings: Settings, irmodule: tvm.IRModule, library: Path) -> None:
    """Keep `library` (built from `irmodule`) under `key`; a failure to write costs only the next compile's build."""
    root = default_cache_dir(settings.cache_dir) / DIRECTORY
    entry = root / key
    if (entry / ENTRY).exists():
        return
    tmp = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = _partial_entry(root, key)
        (tmp / IRMODULE).write_text(tvm.ir.save_json(irmodule))
        shutil.copyfile(library, tmp / LIBRARY)
        record = {"format": ENTRY_FORMAT, "files": {name: _sha256((tmp / name).read_bytes())
                                                    for name in (IRMODULE, LIBRARY)}}
        (tmp / ENTRY).write_text(json.dumps(record, sort_keys=True) + "\n")
        for f in tmp.iterdir():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
        os.rename(tmp, entry)
        tmp = None
        _evict(root)
    except OSError as exc:
        if not (entry / ENTRY).exists():  # another process may have stored the same entry first: nothing lost
            _warn_once(str(root), f"sparsecc: cannot store built kernels in {root} ({exc.strerror or exc}); "
                                  "compiles build them again (set cache_dir to a writable directory)")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _evict(root: Path) -> None:
    """Remove the least recently used entries past MAX_ENTRIES (another process may be evicting too: best effort)."""
    kept = []
    for entry in root.iterdir():
        try:
            if not entry.name.startswith("."):
                kept.append((entry.stat().st_mtime, entry))
        except OSError:
            continue
    for _, entry in sorted(kept)[:max(0, len(kept) - MAX_ENTRIES)]:
        shutil.rmtree(entry, ignore_errors=True)


def _partial_entry(root: Path, key: str) -> Path:
    """A new hidden directory beside the entries, renamed into place once the entry is whole."""
    return Path(tempfile.mkdtemp(prefix=f".{key[:16]}.partial-", dir=root))


def _entry_dir(key: str, settings: Settings) -> Path:
    return default_cache_dir(settings.cache_dir) / DIRECTORY / key


def _checked(f: Path, record: dict[str, Any]) -> bytes:
    data = f.read_bytes()
    if _sha256(data) != record["files"][f.name]:
        raise ValueError(f"{f.name}'s sha256 differs from entry.json's")
    return data


def _discard(entry: Path, why: str) -> None:
    warnings.warn(f"sparsecc: the kernel cache entry {entry} is damaged ({why}); removed, the regions are built "
                  "again", stacklevel=4)
    shutil.rmtree(entry, ignore_errors=True)


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=4)


def _versions() -> tuple[str, str, str]:
    import sparsecc

    return sparsecc.__version__, tvm.__version__, torch.__version__


def _shape(node: Any) -> Any:
    if not isinstance(node, fx.Node):
        return repr(node)
    info = shape_dtype(node)
    return None if info is None else (info[0], str(info[1]))


def _bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().contiguous()
    return memoryview(t.view(torch.uint8).reshape(-1).numpy()) if t.numel() else memoryview(b"")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
