"""Crash-safe index directories.

Layout: DIR/CURRENT names the live version folder (DIR/v000003/) and the sha256 of its manifest;
each version folder holds the index file(s), the id map, metadata and manifest.json with the size
and sha256 of every file. A save writes a fresh hidden folder, renames it to the next version and
only then swaps CURRENT with os.replace (atomic), so a writer killed at any point leaves the
previous version loadable. The newest two versions are kept so a reader that opened the old one
while a writer swapped it can finish.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Callable

from voxsearch.index.errors import IndexCorruptError, IndexFormatError

FORMAT = "voxsearch-index"
FORMAT_VERSION = 1
CURRENT = "CURRENT"
MANIFEST = "manifest.json"
KEEP_VERSIONS = 2
_VERSION_RE = re.compile(r"^v(\d{6})$")


def sha256_file(path: Path, chunk: int = 8 * 1024 * 1024) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_index_dir(directory: Path) -> bool:
    return (Path(directory) / CURRENT).is_file()


def _versions(directory: Path) -> list[int]:
    return sorted(int(m.group(1)) for p in directory.iterdir() if (m := _VERSION_RE.match(p.name)))


def write_version(directory: Path, writers: dict[str, Callable[[Path], None]], manifest: dict) -> Path:
    """Write one new version of the index at `directory` and make it current; returns its folder."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise IndexFormatError(f"cannot save an index to {directory}: it is a file")
    if directory.is_dir() and not is_index_dir(directory) and any(
        not p.name.startswith(".tmp-") for p in directory.iterdir()
    ):
        raise IndexFormatError(f"refusing to save an index into {directory}: it is a non-empty folder that holds no index")
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".tmp-{uuid.uuid4().hex}"
    try:
        tmp.mkdir()
        files = {}
        for name, write in writers.items():
            path = tmp / name
            write(path)
            _fsync(path)
            files[name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
        manifest = {**manifest, "format": FORMAT, "format_version": FORMAT_VERSION, "files": files}
        manifest_path = tmp / MANIFEST
        manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        _fsync(manifest_path)
        number = (_versions(directory) or [0])[-1] + 1
        final = directory / f"v{number:06d}"
        os.rename(tmp, final)
        pointer = directory / f".tmp-{uuid.uuid4().hex}-{CURRENT}"
        pointer.write_text(f"{final.name} {sha256_file(final / MANIFEST)}\n")
        _fsync(pointer)
        os.replace(pointer, directory / CURRENT)
        _fsync(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(directory, keep=final.name)
    return final


def _prune(directory: Path, keep: str) -> None:
    """Drop versions beyond the newest KEEP_VERSIONS and temp folders of writers that died."""
    for number in _versions(directory)[:-KEEP_VERSIONS]:
        if f"v{number:06d}" != keep:
            shutil.rmtree(directory / f"v{number:06d}", ignore_errors=True)
    for path in directory.glob(".tmp-*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def read_version(directory: Path, verify: bool = True) -> tuple[Path, dict]:
    """The current version folder of `directory` and its manifest, checked against their checksums."""
    directory = Path(directory)
    if not directory.is_dir():
        raise IndexFormatError(f"no index at {directory}: folder not found")
    pointer = directory / CURRENT
    if not pointer.is_file():
        raise IndexFormatError(f"{directory} is not a voxsearch index folder (no {CURRENT} file)")
    parts = pointer.read_text().split()
    if len(parts) != 2 or not _VERSION_RE.match(parts[0]):
        raise IndexCorruptError(f"{pointer} is damaged: expected 'vNNNNNN <sha256>', got {pointer.read_text()[:80]!r}")
    folder, manifest_sha = directory / parts[0], parts[1]
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise IndexCorruptError(f"index {directory}: {manifest_path.relative_to(directory)} is missing")
    if sha256_file(manifest_path) != manifest_sha:
        raise IndexCorruptError(f"index {directory}: {manifest_path.relative_to(directory)} does not match its checksum in {CURRENT}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise IndexCorruptError(f"index {directory}: manifest is not valid JSON ({exc})") from exc
    if manifest.get("format") != FORMAT:
        raise IndexFormatError(f"{directory}: manifest format {manifest.get('format')!r} is not {FORMAT!r}")
    if int(manifest.get("format_version", -1)) > FORMAT_VERSION:
        raise IndexFormatError(
            f"{directory}: written by a newer voxsearch (format version {manifest.get('format_version')}, "
            f"this one reads <= {FORMAT_VERSION}); upgrade voxsearch"
        )
    for name, info in manifest.get("files", {}).items():
        path = folder / name
        rel = path.relative_to(directory)
        if not path.is_file():
            raise IndexCorruptError(f"index {directory}: file {rel} listed in the manifest is missing")
        if path.stat().st_size != info["bytes"]:
            raise IndexCorruptError(
                f"index {directory}: file {rel} has {path.stat().st_size} bytes, the manifest says {info['bytes']}"
            )
        if verify and sha256_file(path) != info["sha256"]:
            raise IndexCorruptError(f"index {directory}: file {rel} is corrupt (sha256 does not match the manifest)")
    return folder, manifest
