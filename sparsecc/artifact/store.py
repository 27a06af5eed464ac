"""An artifact directory on disk: its files, its manifest, and how it is written and checked.

Layout (all names fixed):
    manifest.json            versions, target, input/output specs, size + sha256 of every other file, and the
                             sha256 of its own content (manifest_sha256)
    plan.json                the SparsePlan (format chosen per weight, with reasons)
    graph.json               the outer FX graph (graph_json.py)
    weights.safetensors      every constant: dense ones of the outer graph and packed ones of the regions
    example_inputs.safetensors   the inputs it was built and verified with (for `sparsecc bench`)
    kernels.so | kernels.tar the TVM library (.tar of object files for a target this machine cannot link for)

Writes go to a hidden sibling directory that is renamed into place only when complete, with the manifest
written last; readers check every hash. A build killed at any point therefore leaves nothing that loads.

Reading trusts nothing in the directory: it holds exactly the manifest and the files the manifest lists, each a
plain file (no links, no subdirectories), of the listed size and sha256, and the manifest matches its own hash. An
artifact is not signed, though: whoever can rewrite every hash can rewrite the kernels too, so a manifest from
someone you do not trust is code from someone you do not trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable

from sparsecc.errors import ArtifactError

MANIFEST = "manifest.json"
# Format 2 adds SELF_HASH, so that a changed manifest is refused like a changed file. Format 1 artifacts still
# load; in theirs, a change that leaves the JSON well formed and the fields well typed goes unnoticed.
MANIFEST_FORMAT = 2
SELF_HASH = "manifest_sha256"
LIBRARY_SUFFIXES = (".so", ".tar")
# Far above any real manifest; a bound so that a damaged or hostile one is not read into memory whole.
MAX_MANIFEST_BYTES = 64 << 20
REBUILD = "rebuild the artifact (sparsecc.export or `sparsecc build`)"
_SHA256 = re.compile(r"[0-9a-f]{64}\Z")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def write_json(path: Path, data: Any) -> None:
    # Sorted keys and a trailing newline: the same content always gives the same bytes.
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's content less SELF_HASH, in one canonical form: a change of any byte of manifest.json
    then either breaks its JSON, changes this digest, or leaves the same content (whitespace, the case of an
    escape's hex digit)."""
    content = {k: v for k, v in manifest.items() if k != SELF_HASH}
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def write_atomically(path: str | os.PathLike, fill: Callable[[Path], dict[str, Any]]) -> Path:
    """Create the artifact directory `path`: `fill(tmp)` writes the files into a temporary directory and returns
    the manifest (less its file table), which is written last; then the directory replaces `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        manifest = fill(tmp)
        _apply_umask(tmp)
        manifest["files"] = {f.name: {"bytes": f.stat().st_size, "sha256": sha256(f)}
                             for f in sorted(tmp.iterdir()) if f.name != MANIFEST}
        manifest["format"] = MANIFEST_FORMAT
        manifest[SELF_HASH] = manifest_digest(manifest)
        write_json(tmp / MANIFEST, manifest)
        _fsync_dir(tmp)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _replace_dir(new: Path, path: Path) -> None:
    if not path.exists():
        os.rename(new, path)
        return
    if not (path / MANIFEST).is_file() and any(path.iterdir()):
        raise ArtifactError(f"{path} exists and is not a sparsecc artifact; choose another output directory")
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    os.rename(path, old / "artifact")
    os.rename(new, path)
    shutil.rmtree(old, ignore_errors=True)


def _apply_umask(directory: Path) -> None:
    # mkdtemp (and safetensors) create private files; an artifact is shared like any build output.
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for f in directory.iterdir():
        f.chmod((0o777 if os.access(f, os.X_OK) else 0o666) & ~umask)


def _fsync_dir(directory: Path) -> None:
    for f in directory.iterdir():
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())


def read_manifest(path: str | os.PathLike, *, check_hashes: bool = True) -> dict[str, Any]:
    """The manifest of the artifact at `path`, after checking that the directory holds exactly the files it lists,
    whole and unchanged. Raises ArtifactError saying what is wrong."""
    manifest = parse_manifest(path)
    verify_artifact(path, manifest, check_hashes=check_hashes)
    return manifest


def parse_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of the artifact directory `path`: well-formed JSON of a format this sparsecc reads, its fields
    of the right types. Nothing is checked against the files yet (verify_artifact does that)."""
    path = Path(path)
    _check_directory(path)
    manifest_path = path / MANIFEST
    if _kind(manifest_path) == "missing":
        raise ArtifactError(f"{path} is not a complete artifact: {MANIFEST} is missing (was the build interrupted?); "
                            f"{REBUILD}")
    manifest = _parse_json(_read_plain_file(manifest_path, limit=MAX_MANIFEST_BYTES), manifest_path)
    _check_format(manifest, path)
    _check_fields(manifest, manifest_path)
    return manifest


def verify_artifact(path: str | os.PathLike, manifest: dict[str, Any], *, check_hashes: bool = True) -> None:
    """Check that `manifest` (from parse_manifest) matches its own hash and that the directory holds exactly the
    files it lists, each a plain file of the listed size and sha256."""
    path = Path(path)
    _check_self_hash(manifest, path / MANIFEST)
    for name, info in manifest["files"].items():
        _check_file(path, name, info, check_hashes)
    _check_nothing_else(path, manifest["files"])


def read_checked(path: str | os.PathLike, name: str, manifest: dict[str, Any]) -> bytes:
    """The bytes of the listed file `name`, read once and checked against the manifest: what the caller then uses
    is exactly what was checked, whatever happens to the file afterwards."""
    path = Path(path)
    info = manifest["files"].get(name)
    if info is None:
        raise ArtifactError(f"{path} is incomplete: its manifest does not list {name}; {REBUILD}")
    data = _read_plain_file(path / name)
    _check_size(path / name, len(data), info)
    if hashlib.sha256(data).hexdigest() != info["sha256"]:
        raise _corrupt(path / name)
    return data


# -- the directory and its entries ----------------------------------------------------------------------------


def _kind(f: Path) -> str:
    """What `f` is, without following a symlink: "file", "directory", "symlink", "other" or "missing"."""
    try:
        mode = os.lstat(f).st_mode
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        raise ArtifactError(f"{f} cannot be read: {exc.strerror}") from None
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISDIR(mode):
        return "directory"
    return "file" if stat.S_ISREG(mode) else "other"


def _check_directory(path: Path) -> None:
    kind = _kind(path)
    if kind == "missing":
        raise ArtifactError(f"no artifact at {path}: the directory does not exist")
    if kind == "symlink":
        # Every file is then reached through a link that can be repointed between the checks and the reads.
        raise ArtifactError(f"{path} is a symlink (to {os.readlink(path)}); load the directory it points to "
                            "instead, or copy the artifact")
    if kind == "file":
        raise ArtifactError(f"{path} is a file; an artifact is a directory written by sparsecc.export or "
                            "`sparsecc build`")
    if kind != "directory":
        raise ArtifactError(f"{path} is not a directory; an artifact is a directory written by sparsecc.export or "
                            "`sparsecc build`")


def _not_plain(f: Path, kind: str) -> ArtifactError:
    what = {"symlink": "a symlink", "directory": "a directory"}.get(kind, "not a plain file")
    return ArtifactError(f"{f} is {what}; an artifact holds only plain files, written by the build: {REBUILD}")


def _open_plain_file(f: Path) -> int:
    kind = _kind(f)
    if kind == "missing":
        raise ArtifactError(f"{f.parent} is incomplete: {f.name} is missing; {REBUILD}")
    if kind != "file":
        raise _not_plain(f, kind)
    # O_NOFOLLOW and the fstat: a link or a FIFO swapped in after the lstat is still refused (and never blocks).
    try:
        fd = os.open(f, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise ArtifactError(f"{f} cannot be read: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _not_plain(f, "other")
    return fd


def _read_plain_file(f: Path, limit: int | None = None) -> bytes:
    fd = _open_plain_file(f)
    with os.fdopen(fd, "rb") as handle:
        data = handle.read() if limit is None else handle.read(limit + 1)
    if limit is not None and len(data) > limit:
        raise ArtifactError(f"{f} is over {limit >> 20} MiB, far more than a manifest holds: it is not one sparsecc "
                            f"wrote; {REBUILD}")
    return data


def _check_file(path: Path, name: str, info: dict[str, Any], check_hashes: bool) -> None:
    f = path / name
    with os.fdopen(_open_plain_file(f), "rb") as handle:
        _check_size(f, os.fstat(handle.fileno()).st_size, info)
        if not check_hashes:
            return
        digest = hashlib.sha256()
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != info["sha256"]:
        raise _corrupt(f)


def _check_size(f: Path, size: int, info: dict[str, Any]) -> None:
    if size != info["bytes"]:
        raise ArtifactError(f"{f} is truncated or changed: {size} bytes, the manifest says {info['bytes']}; "
                            f"{REBUILD}")


def _corrupt(f: Path) -> ArtifactError:
    return ArtifactError(f"{f} is corrupt: its sha256 differs from the manifest's; {REBUILD}")


def _check_nothing_else(path: Path, files: dict[str, Any]) -> None:
    # A file the build did not write means the directory was changed since (or is not what was built); an extra
    # library next to the kernels could even be picked up by the dynamic loader.
    try:
        names = sorted(os.listdir(path))
    except OSError as exc:
        raise ArtifactError(f"{path} cannot be listed: {exc.strerror}") from None
    for name in names:
        if name != MANIFEST and name not in files:
            kind = _kind(path / name)
            what = {"symlink": "a symlink", "directory": "a directory"}.get(kind, "a file")
            raise ArtifactError(f"{path / name} is {what} the manifest does not list: the artifact was changed "
                                f"after it was built. Remove it, or {REBUILD}")


# -- the manifest's content -----------------------------------------------------------------------------------


def _parse_json(data: bytes, manifest_path: Path) -> Any:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise ValueError(f"a key appears twice: {sorted(k for k in keys if keys.count(k) > 1)[0]!r}")
        return dict(pairs)

    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=no_duplicates)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ArtifactError(f"{manifest_path} is corrupt: {exc}; {REBUILD}") from None


def _check_format(manifest: Any, path: Path) -> None:
    manifest_path = path / MANIFEST
    if not isinstance(manifest, dict) or not _is_int(manifest.get("format")):
        raise ArtifactError(f"{manifest_path} has no format version: it is corrupt, or was not written by sparsecc; "
                            f"{REBUILD}")
    if manifest["format"] > MANIFEST_FORMAT:
        raise ArtifactError(
            f"{path} has artifact format {manifest['format']}, newer than the {MANIFEST_FORMAT} this sparsecc "
            f"reads (built by sparsecc {manifest.get('sparsecc', '?')}); upgrade sparsecc or rebuild the artifact")
    if manifest["format"] < 1:
        raise ArtifactError(f"{manifest_path} has format {manifest['format']}, which no sparsecc writes; it is "
                            f"corrupt: {REBUILD}")


def _check_self_hash(manifest: dict[str, Any], manifest_path: Path) -> None:
    recorded = manifest.get(SELF_HASH)
    if recorded is None and manifest["format"] == 1:
        return  # written before manifests carried their hash
    if recorded != manifest_digest(manifest):
        raise ArtifactError(f"{manifest_path} is corrupt: its content does not match the {SELF_HASH} it records "
                            f"(damaged, or edited after the build); {REBUILD}")


def is_plain_name(name: Any) -> bool:
    """A file name inside the artifact directory: no path separators, not '.', '..' or the manifest."""
    return (isinstance(name, str) and name not in ("", ".", "..", MANIFEST)
            and not any(c in name for c in "/\\\0"))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _list_of(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, list) and all(check(x) for x in v)


def _dict_of(check: Callable[[Any], bool], key: Callable[[Any], bool] = lambda k: True) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, dict) and all(key(k) and check(x) for k, x in v.items())


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def _record(**fields: Callable[[Any], bool]) -> Callable[[Any], bool]:
    """A dict whose given fields, where present, pass their checks (other fields are free)."""
    return lambda v: isinstance(v, dict) and all(k not in v or check(v[k]) for k, check in fields.items())


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _is_identifier(v: Any) -> bool:
    return isinstance(v, str) and bool(_IDENTIFIER.match(v))


def _is_file_info(v: Any) -> bool:
    return (isinstance(v, dict) and _is_int(v.get("bytes")) and v["bytes"] >= 0
            and isinstance(v.get("sha256"), str) and bool(_SHA256.match(v["sha256"])))


def _is_tensor_spec(v: Any) -> bool:
    return (isinstance(v, dict) and _list_of(lambda d: _is_int(d) and d >= 0)(v.get("shape"))
            and _is_str(v.get("dtype")))


# field: (required, check, what it must be). The loader reads these; other fields are for people and tools.
_FIELDS: dict[str, tuple[bool, Callable[[Any], bool], str]] = {
    "files": (True, _dict_of(_is_file_info, is_plain_name),
              "a table of plain file names to {bytes, sha256}"),
    "inputs": (True, _list_of(_is_tensor_spec), "a list of {shape, dtype}"),
    "outputs": (False, _list_of(_is_tensor_spec), "a list of {shape, dtype}"),
    "library": (False, _optional(lambda v: is_plain_name(v) and v.endswith(LIBRARY_SUFFIXES)),
                "null or the file name of a .so or .tar"),
    "regions": (False, _dict_of(_list_of(_is_str), _is_identifier), "a table of region names to weight names"),
    "target": (False, _record(arch=_is_str, features=_list_of(_is_str), mcpu=_is_str, mtriple=_is_str),
               "a record of arch, features, mcpu, mtriple"),
    "options": (False, _record(num_threads=_optional(_is_int), thread_pool=_is_str), "a table of options"),
    "output_tree": (False, _optional(_is_str), "null or a serialized pytree spec"),
}


def _check_fields(manifest: dict[str, Any], manifest_path: Path) -> None:
    for field, (required, check, what) in _FIELDS.items():
        if field not in manifest:
            if required:
                raise ArtifactError(f"{manifest_path} has no '{field}'; it is incomplete or corrupt: {REBUILD}")
        elif not check(manifest[field]):
            raise ArtifactError(f"{manifest_path} is corrupt: '{field}' must be {what}, got "
                                f"{_short(manifest[field])}; {REBUILD}")
    library = manifest.get("library")
    if library is not None and library not in manifest["files"]:
        raise ArtifactError(f"{manifest_path} is corrupt: its library {library} is not one of the files it lists "
                            f"(and hashes); {REBUILD}")
    if manifest.get("regions") and library is None:
        raise ArtifactError(f"{manifest_path} is corrupt: it lists TVM regions but no kernel library; {REBUILD}")


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."
