"""Index folders on object storage (s3://, gs://): the layout of versions.py without rename or locks.

PREFIX/CURRENT names the live version and the sha256 of its manifest ("v000003-9f2c41d07a1b <sha256>");
PREFIX/v000003-9f2c41d07a1b/ holds the index files and manifest.json (size and sha256 of each). A save
uploads a new version prefix, whose random suffix keeps concurrent writers apart, and then publishes it
by writing CURRENT: one PUT, which readers see whole or not at all. A writer that dies before that PUT
leaves the previous version current; the objects it left are deleted by a later save. The newest two
versions are kept, so a reader that read CURRENT just before a swap can still fetch its files.

Compare-and-swap without a lock: S3 has conditional PUTs (If-Match) but pyarrow's filesystems do not
expose them, so a save reads CURRENT again just before writing it and raises IndexConflictError when
another writer published meanwhile. Between that read and the PUT (one round trip) another writer can
still publish; then the later PUT wins and the other save's change is lost although it returned. Where
several processes write one index prefix at once, serialise them (one writer per index on object storage).
"""

from __future__ import annotations

import json
import re
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from voxsearch.common.hashing import sha256_bytes, sha256_file
from voxsearch.common.storage import ObjectPath
from voxsearch.index import versions
from voxsearch.index.errors import IndexConflictError, IndexCorruptError, IndexFormatError

_VERSION_RE = re.compile(r"^v(\d{6})-[0-9a-f]{12}$")


def _number(name: str | None) -> int:
    match = _VERSION_RE.match(name or "")
    return int(match.group(1)) if match else 0


def _pointer(prefix: ObjectPath) -> tuple[str, str] | None:
    """(version name, manifest sha256) that CURRENT holds, or None where there is no index."""
    pointer = prefix / versions.CURRENT
    try:
        text = pointer.read_text()
    except FileNotFoundError:
        return None
    parts = text.split()
    if len(parts) != 2 or not _VERSION_RE.match(parts[0]):
        raise IndexCorruptError(f"{pointer} is damaged: expected 'vNNNNNN-<suffix> <sha256>', got {text[:80]!r}")
    return parts[0], parts[1]


def current_version(prefix: ObjectPath) -> str | None:
    pointer = _pointer(prefix)
    return pointer[0] if pointer else None


def is_index_dir(prefix: ObjectPath) -> bool:
    return (prefix / versions.CURRENT).is_file()


def write_version(prefix: ObjectPath, writers: dict[str, Callable[[Path], None]], manifest: dict, *,
                  expected: str | None | object) -> ObjectPath:
    """versions.write_version for a prefix in object storage: each file is written to a local temp
    folder and uploaded, then manifest.json, then CURRENT; returns the version prefix."""
    found = current_version(prefix)
    if expected is not versions.ANY_VERSION and found != expected:
        raise IndexConflictError(prefix, expected, found)
    if found is None and any(not _VERSION_RE.match(p.name) for p in prefix.iterdir()):
        raise IndexFormatError(f"refusing to save an index into {prefix}: it holds objects but no index")
    name = f"v{_number(found) + 1:06d}-{uuid.uuid4().hex[:12]}"
    folder = prefix / name
    try:
        with tempfile.TemporaryDirectory(prefix="voxsearch-index-") as tmp:
            files = {}
            for file_name, write in writers.items():
                path = Path(tmp) / file_name
                write(path)
                files[file_name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
                (folder / file_name).upload(path)
        manifest = {**manifest, "format": versions.FORMAT, "format_version": versions.FORMAT_VERSION, "files": files}
        body = json.dumps(manifest, indent=2, sort_keys=True, default=str).encode("utf-8")
        (folder / versions.MANIFEST).write_bytes(body)
        found = current_version(prefix)
        if expected is not versions.ANY_VERSION and found != expected:
            raise IndexConflictError(prefix, expected, found)
        (prefix / versions.CURRENT).write_text(f"{name} {sha256_bytes(body)}\n")
    except BaseException:
        folder.delete_tree()  # best effort; what a killed writer leaves, _prune of a later save removes
        raise
    _prune(prefix, name)
    return folder


def _prune(prefix: ObjectPath, published: str) -> None:
    """Delete versions numbered below the previous one. Orphans of dead writers go with them; a live
    writer's upload numbered that low can no longer publish (its compare-and-swap fails), except an
    ANY_VERSION save that read CURRENT two versions ago."""
    oldest_kept = _number(published) - versions.KEEP_VERSIONS + 1
    for child in prefix.iterdir():
        if _VERSION_RE.match(child.name) and _number(child.name) < oldest_kept:
            child.delete_tree()


@contextmanager
def open_version(prefix: ObjectPath, verify: bool = True) -> Iterator[tuple[Path, dict, str]]:
    """(local folder holding the current version's files, its manifest, its name), the files downloaded
    and checked against the manifest; the folder is deleted on exit (files a caller memory-mapped stay
    readable until unmapped)."""
    pointer = _pointer(prefix)
    if pointer is None:
        raise IndexFormatError(f"no index at {prefix}: no {versions.CURRENT} object there")
    name, manifest_sha = pointer
    manifest_obj = prefix / name / versions.MANIFEST
    try:
        body = manifest_obj.read_bytes()
    except FileNotFoundError:
        raise IndexCorruptError(f"index {prefix}: {manifest_obj} is missing") from None
    if sha256_bytes(body) != manifest_sha:
        raise IndexCorruptError(f"index {prefix}: {manifest_obj} does not match its checksum in {versions.CURRENT}")
    manifest = versions.parse_manifest(prefix, body)
    with tempfile.TemporaryDirectory(prefix="voxsearch-index-") as tmp:
        for file_name, info in manifest.get("files", {}).items():
            obj = prefix / name / file_name
            try:
                size, sha = obj.download(Path(tmp) / file_name)
            except FileNotFoundError:
                raise IndexCorruptError(f"index {prefix}: object {obj} listed in the manifest is missing") from None
            if size != info["bytes"]:
                raise IndexCorruptError(f"index {prefix}: object {obj} has {size} bytes, the manifest says {info['bytes']}")
            if verify and sha != info["sha256"]:
                raise IndexCorruptError(f"index {prefix}: object {obj} is corrupt (sha256 does not match the manifest)")
        yield Path(tmp), manifest, name
