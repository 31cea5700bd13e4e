"""voxsearch's user cache, and local copies of object-storage folders kept in it.

Some readers need real files (safetensors maps its file into memory, transformers opens a tokenizer
folder by path), and a worker on a cluster sees none of the driver's. Such a folder in object storage is
copied once per machine into cache_root()/<kind>/<hash of the URI>/<hash of the listing>, the listing
being each object's name, size and modification time: a folder whose objects changed lists differently
and is copied again into a new folder, while processes still reading the old copy keep theirs. (Stores
give modification times to the second: an object rewritten with the same size within the second it was
listed is not noticed.) Copies are never deleted here: remove the cache folder to reclaim the space.

A copy is downloaded into a temporary folder and renamed into place once complete, so a reader finds a
whole copy or none. An flock makes the processes of one machine (a node's actors, starting together)
wait for one download instead of each fetching the folder.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from voxsearch.common.durable import fsync_dir, fsync_tree
from voxsearch.common.storage import ObjectPath, location


def cache_root() -> Path:
    """voxsearch's user cache: $VOXSEARCH_CACHE, else $XDG_CACHE_HOME/voxsearch, else ~/.cache/voxsearch."""
    if os.environ.get("VOXSEARCH_CACHE"):
        return Path(os.environ["VOXSEARCH_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "voxsearch"


def local_copy(prefix: ObjectPath, kind: str) -> Path:
    """A local folder holding every object under `prefix` at its relative name, downloaded unless this
    machine already holds a copy of the objects as they are now. FileNotFoundError naming the URI when
    there are no objects under it."""
    listing = prefix.rglob_stats()
    if not listing:
        raise FileNotFoundError(f"{prefix.uri}: no objects under it")
    names = [_relative(prefix, obj) for obj, _, _ in listing]
    # Named by the URI without its query string, which may hold keys: new keys must not mean a new copy.
    folder = cache_root() / kind / _digest(prefix.uri) / _digest(
        [[name, size, mtime] for name, (_, size, mtime) in zip(names, listing)])
    if folder.is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(folder.parent / f"{folder.name}.lock"):
        if not folder.is_dir():  # another process may have copied it while this one waited
            _download(listing, names, folder)
    return folder


def local_folder(directory: "str | os.PathLike | ObjectPath", kind: str = "checkpoints") -> tuple[Path, str]:
    """The folder to read and the name errors give it: for an s3:// or gs:// URI its local copy
    (local_copy), named by the URI without its query string; a local folder as it is, by its path.
    Model folders (CLIP checkpoints, report models) are read this way."""
    where = location(directory)
    if isinstance(where, ObjectPath):
        return local_copy(where, kind), where.uri
    return where, str(where)


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()[:24]


def _relative(prefix: ObjectPath, obj: ObjectPath) -> str:
    """The object's name under the prefix, refused where it would land outside the local copy."""
    name = obj.path[len(prefix.path) + 1:]
    if any(part in ("", ".", "..") for part in name.split("/")):
        raise ValueError(f"{obj.uri}: an object name that cannot be a local file name")
    return name


@contextmanager
def _exclusive(lock: Path) -> Iterator[None]:
    with open(lock, "a") as handle:  # closing the file releases the lock, also when the process dies
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _download(listing: list[tuple[ObjectPath, int, int | None]], names: list[str], folder: Path) -> None:
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        for (obj, size, _), name in zip(listing, names):
            target = staging / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if obj.download(target)[0] != size:
                raise OSError(f"{obj.uri} changed while it was being copied; try again")
        fsync_tree(staging)
        try:
            os.rename(staging, folder)
        except OSError:
            if not folder.is_dir():
                raise
            # Copied meanwhile by a process the lock did not reach (a cache on a file system without
            # flock): the copies are alike, keep theirs.
            shutil.rmtree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_dir(folder.parent)
