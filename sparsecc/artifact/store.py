"""An artifact directory on disk: its files, its manifest, and how it is written and checked.

Layout (all names fixed):
    manifest.json            versions, target, input/output specs, and size + sha256 of every other file
    plan.json                the SparsePlan (format chosen per weight, with reasons)
    graph.json               the outer FX graph (graph_json.py)
    weights.safetensors      every constant: dense ones of the outer graph and packed ones of the regions
    example_inputs.safetensors   the inputs it was built and verified with (for `sparsecc bench`)
    kernels.so | kernels.tar the TVM library (.tar of object files for a target this machine cannot link for)

Writes go to a hidden sibling directory that is renamed into place only when complete, with the manifest
written last; readers check every hash. A build killed at any point therefore leaves nothing that loads.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from sparsecc.errors import ArtifactError

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1


def write_json(path: Path, data: Any) -> None:
    # Sorted keys and a trailing newline: the same content always gives the same bytes.
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
    """The manifest of the artifact at `path`, after checking that every file it lists is there, whole and
    unchanged. Raises ArtifactError saying what is wrong."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"no artifact at {path}: the directory does not exist")
    if not path.is_dir():
        raise ArtifactError(f"{path} is a file; an artifact is a directory written by sparsecc.export or "
                            "`sparsecc build`")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{path} is not a complete artifact: {MANIFEST} is missing (was the build interrupted?)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{manifest_path} is corrupt: {exc}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("format"), int):
        raise ArtifactError(f"{manifest_path} has no format version; it was not written by sparsecc")
    if manifest["format"] > MANIFEST_FORMAT:
        raise ArtifactError(
            f"{path} has artifact format {manifest['format']}, newer than the {MANIFEST_FORMAT} this sparsecc "
            f"reads (built by sparsecc {manifest.get('sparsecc', '?')}); upgrade sparsecc or rebuild the artifact")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise ArtifactError(f"{manifest_path} has no file table; rebuild the artifact")
    for name, info in files.items():
        f = path / name
        if not f.is_file():
            raise ArtifactError(f"{path} is incomplete: {name} is missing")
        if f.stat().st_size != info.get("bytes"):
            raise ArtifactError(f"{path / name} is truncated or changed: {f.stat().st_size} bytes, the manifest "
                                f"says {info.get('bytes')}")
        if check_hashes and sha256(f) != info.get("sha256"):
            raise ArtifactError(f"{path / name} is corrupt: its sha256 differs from the manifest's")
    return manifest
