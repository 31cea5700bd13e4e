"""Crash-safe index directories.

Layout: DIR/CURRENT names the live version folder (DIR/v000003/) and the sha256 of its manifest;
each version folder holds the index file(s), the id map, metadata and manifest.json with the size
and sha256 of every file. A save writes a fresh hidden folder, renames it to the next version and
only then swaps CURRENT with os.replace (atomic), so a writer killed at any point leaves the
previous version loadable. The newest two versions are kept so a reader that opened the old one
while a writer swapped it can finish.

Several processes write one index (the server's /embed, `voxsearch sync`, `voxsearch index add`): the
swap happens under an exclusive lock on DIR/.write-lock and only if CURRENT still names the version the
writer read (compare-and-swap), so no writer silently replaces a version it never saw. Files are written
before the lock is taken, each writer into its own temp folder that it holds locked until it is renamed.

`directory` may also be an s3:// or gs:// URI (or a voxsearch.common.storage.ObjectPath): object_versions.py
keeps the same layout there, without rename or locks.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from voxsearch.common.durable import atomic_write_text, fsync_tree
from voxsearch.common.hashing import sha256_bytes, sha256_file
from voxsearch.common.storage import ObjectPath, location
from voxsearch.index.errors import IndexConflictError, IndexCorruptError, IndexFormatError, IndexLockTimeout

FORMAT = "voxsearch-index"
FORMAT_VERSION = 1
CURRENT = "CURRENT"
MANIFEST = "manifest.json"
KEEP_VERSIONS = 2
LOCK_FILE = ".write-lock"
LOCK_TIMEOUT_S = 120.0
# write_version(expected=ANY_VERSION) replaces whatever the folder holds (a rebuild saved over an index).
ANY_VERSION = object()
_VERSION_RE = re.compile(r"^v(\d{6})$")


def _object_versions():
    from voxsearch.index import object_versions  # it builds on this module's constants

    return object_versions


def identity(directory) -> str:
    """What tells two spellings of one index folder (or prefix) apart from another one."""
    directory = location(directory)
    return directory.uri if isinstance(directory, ObjectPath) else str(directory.resolve())


def is_index_dir(directory: Path) -> bool:
    directory = location(directory)
    if isinstance(directory, ObjectPath):
        return _object_versions().is_index_dir(directory)
    return (directory / CURRENT).is_file()


def _versions(directory: Path) -> list[int]:
    return sorted(int(m.group(1)) for p in directory.iterdir() if (m := _VERSION_RE.match(p.name)))


def current_version(directory: Path) -> str | None:
    """The version folder name CURRENT points at ("v000003"), or None where the folder holds no index."""
    directory = location(directory)
    if isinstance(directory, ObjectPath):
        return _object_versions().current_version(directory)
    try:
        parts = (Path(directory) / CURRENT).read_text().split()
    except FileNotFoundError:
        return None
    return parts[0] if parts else None


def pointer_line(folder: Path | ObjectPath) -> str:
    """What CURRENT holds when it points at this version folder (or version prefix)."""
    if isinstance(folder, ObjectPath):
        return f"{folder.name} {sha256_bytes((folder / MANIFEST).read_bytes())}"
    return f"{folder.name} {sha256_file(folder / MANIFEST)}"


class _HeldLock:
    """One process's hold on one index folder's lock file: a thread lock keeps the process's own threads
    out (flock does not), depth makes it re-entrant for the thread that holds it."""

    def __init__(self) -> None:
        self.threads = threading.RLock()
        self.depth = 0
        self.handle = None


_held: dict[str, _HeldLock] = {}
_held_guard = threading.Lock()


def _flock_until(handle, deadline: float) -> bool:
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)


@contextmanager
def write_lock(directory: Path, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold the exclusive write lock of the index folder `directory` (created if missing). Re-entrant in
    the thread that holds it; raises IndexLockTimeout naming the folder after `timeout` seconds."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with _held_guard:
        held = _held.setdefault(str(directory.resolve()), _HeldLock())
    deadline = time.monotonic() + timeout
    busy = IndexLockTimeout(f"index {directory} is being written by another writer: its write lock "
                            f"({LOCK_FILE}) stayed held for {timeout:g} s; try again later")
    if not held.threads.acquire(timeout=max(timeout, 0.0)):
        raise busy
    try:
        if held.depth == 0:
            handle = open(directory / LOCK_FILE, "a")
            if not _flock_until(handle, deadline):
                handle.close()
                raise busy
            held.handle = handle
        held.depth += 1
        try:
            yield
        finally:
            held.depth -= 1
            if held.depth == 0:
                held.handle.close()  # closing the last descriptor releases the flock
                held.handle = None
    finally:
        held.threads.release()


def _hold_folder(path: Path) -> int:
    """Lock a writer's temp folder for as long as it writes there, so _prune can tell it from a dead one's."""
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def write_version(directory: Path, writers: dict[str, Callable[[Path], None]], manifest: dict, *,
                  expected: str | None | object, lock_timeout: float = LOCK_TIMEOUT_S) -> Path | ObjectPath:
    """Write one new version of the index at `directory` and make it current; returns its folder.

    `expected` is the version the caller read (None: it read no index there). If CURRENT names another
    version by the time of the swap, IndexConflictError is raised and nothing changes: the caller
    reloads and re-applies its change. ANY_VERSION skips the check."""
    directory = location(directory)
    if isinstance(directory, ObjectPath):
        return _object_versions().write_version(directory, writers, manifest, expected=expected)
    if directory.exists() and not directory.is_dir():
        raise IndexFormatError(f"cannot save an index to {directory}: it is a file")
    if directory.is_dir() and not is_index_dir(directory) and any(
        not p.name.startswith(".tmp-") and p.name != LOCK_FILE for p in directory.iterdir()
    ):
        raise IndexFormatError(f"refusing to save an index into {directory}: it is a non-empty folder that holds no index")
    tmp = directory / f".tmp-{uuid.uuid4().hex}"
    with write_lock(directory, lock_timeout):  # _prune runs under this lock: it never sees tmp unlocked
        tmp.mkdir()
        guard = _hold_folder(tmp)
    try:
        files = {}
        for name, write in writers.items():
            path = tmp / name
            write(path)
            files[name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
        manifest = {**manifest, "format": FORMAT, "format_version": FORMAT_VERSION, "files": files}
        manifest_path = tmp / MANIFEST
        manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        fsync_tree(tmp)
        with write_lock(directory, lock_timeout):
            found = current_version(directory)
            if expected is not ANY_VERSION and found != expected:
                raise IndexConflictError(directory, expected, found)
            number = (_versions(directory) or [0])[-1] + 1
            final = directory / f"v{number:06d}"
            os.rename(tmp, final)
            atomic_write_text(directory / CURRENT, pointer_line(final) + "\n")  # fsyncs the folder: both renames
            _prune(directory, keep=final.name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(guard)
    return final


def _prune(directory: Path, keep: str) -> None:
    """Drop versions beyond the newest KEEP_VERSIONS and what writers that died left behind. Runs under
    the write lock: a temp folder whose lock can be taken has no live writer; pointer temp files are
    only written under the write lock, so any found here are a dead writer's."""
    for number in _versions(directory)[:-KEEP_VERSIONS]:
        if f"v{number:06d}" != keep:
            shutil.rmtree(directory / f"v{number:06d}", ignore_errors=True)
    for path in [*directory.glob(".tmp-*"), *directory.glob(f".{CURRENT}.*.tmp")]:
        if not path.is_dir():
            path.unlink(missing_ok=True)
            continue
        try:
            fd = _hold_folder(path)
        except (BlockingIOError, FileNotFoundError):
            continue  # another writer is filling it, or has just renamed it into a version
        try:
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)


def parse_manifest(directory, body: bytes) -> dict:
    """A version's manifest.json, checked to be one this code can read."""
    try:
        manifest = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IndexCorruptError(f"index {directory}: manifest is not valid JSON ({exc})") from exc
    if manifest.get("format") != FORMAT:
        raise IndexFormatError(f"{directory}: manifest format {manifest.get('format')!r} is not {FORMAT!r}")
    if int(manifest.get("format_version", -1)) > FORMAT_VERSION:
        raise IndexFormatError(
            f"{directory}: written by a newer voxsearch (format version {manifest.get('format_version')}, "
            f"this one reads <= {FORMAT_VERSION}); upgrade voxsearch"
        )
    return manifest


@contextmanager
def open_version(directory, verify: bool = True) -> Iterator[tuple[Path, dict, str]]:
    """(local folder of the current version, its manifest, the version's name), checked as read_version
    does. For an index on object storage the folder is a temp copy, deleted on exit."""
    directory = location(directory)
    if isinstance(directory, ObjectPath):
        with _object_versions().open_version(directory, verify) as opened:
            yield opened
        return
    folder, manifest = read_version(directory, verify)
    yield folder, manifest, folder.name


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
    manifest = parse_manifest(directory, manifest_path.read_bytes())
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
