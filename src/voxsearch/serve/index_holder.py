"""The live index of a searcher replica, swapped for a new on-disk version without a pause in service.

A saved index directory names its live version in a CURRENT file that writers replace atomically (on
object storage, a CURRENT object replaced by one PUT: index/object_versions.py). The holder polls that
pointer; when it changes, the new version loads beside the old one, which keeps answering until a single
reference swap. Adds (from /embed) go through voxsearch.index.update_index: applied to the newest
on-disk version and saved with a compare-and-swap, so neither another replica nor a `voxsearch sync`
writing the same index loses them or has its rows lost; the other replicas then pick up the new version
the same way. On object storage that compare-and-swap has no lock behind it, so two writers publishing
within one round trip can still lose a change (object_versions.py): keep one writer there.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from voxsearch.common.storage import ObjectPath, location
from voxsearch.serve.config import ServeConfigError

log = logging.getLogger(__name__)


def index_pointer(directory: Path | ObjectPath) -> str:
    """What identifies the stored version: the CURRENT pointer, or file stats for other local layouts."""
    from voxsearch.index.versions import CURRENT

    if isinstance(directory, ObjectPath):
        return _object_pointer(directory / CURRENT)
    try:
        return (directory / CURRENT).read_text().strip()
    except OSError:
        stats = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in directory.iterdir() if p.is_file())
        return repr(stats)


def _object_pointer(current: ObjectPath) -> str:
    """The CURRENT object's text, or "" where there is none: the prefix holds no index, which loading it
    reports by its URI. A store that does not answer raises, so a poll keeps the live version."""
    try:
        return current.read_text().strip()
    except FileNotFoundError:
        return ""


def index_model_id(index) -> str | None:
    """The model whose vectors the index holds, as its builder recorded it; None where it did not."""
    return (dict(getattr(index, "manifest", {}) or {}).get("source") or {}).get("model_id")


def check_index_model(directory: str | Path | ObjectPath, index, model_id: str | None) -> None:
    """Refuse (ServeConfigError, naming both models) an index recorded as holding another model's vectors:
    they are not comparable with the queries the served checkpoint encodes."""
    indexed = index_model_id(index)
    if model_id and indexed and indexed != model_id:
        raise ServeConfigError(
            f"index {directory} holds vectors of model {indexed}, but the served checkpoint is model {model_id}; "
            "serve the checkpoint the index was embedded with, or embed the catalog with this checkpoint into "
            "a new index"
        )


def _hit(hit) -> dict[str, Any]:
    """An index hit as plain values, for the ingress (and for Serve to pickle)."""
    return {"id": hit.id, "score": float(hit.score), "metadata": dict(hit.metadata or {})}


class IndexHolder:
    def __init__(self, directory: str | Path | ObjectPath, model_id: str | None = None):
        """``directory``: a local folder or an s3:// / gs:// prefix. ``model_id``: the served checkpoint's;
        a version recorded as another model's is refused."""
        self.directory = location(directory)
        self.model_id = model_id
        self._lock = threading.Lock()
        self.index = None
        self.pointer = ""
        self.loaded_at = 0.0
        self.reloads = 0
        self.reload()

    def _load(self):
        from voxsearch.index import VectorIndex

        return self._check_model(VectorIndex.load(self.directory))

    def _check_model(self, index):
        check_index_model(self.directory, index, self.model_id)
        return index

    def reload(self) -> bool:
        """Load the on-disk version if it differs from the live one; True when swapped."""
        before = index_pointer(self.directory)
        if self.index is not None and before == self.pointer:
            return False
        fresh = self._load()
        after = index_pointer(self.directory)
        if after != before and self.index is not None:
            # A writer swapped versions while we read: keep serving the old one and retry next poll.
            return False
        with self._lock:
            self.index, self.pointer = fresh, after
            self.loaded_at = time.time()
            self.reloads += 1
        log.info("index %s: serving version %s (%d vectors)", self.directory, self.version, len(fresh))
        return True

    @property
    def version(self) -> str:
        return self.pointer.split()[0] if self.pointer else ""

    def search(self, vectors: np.ndarray, k: int, filters: dict | None) -> list[list[dict[str, Any]]]:
        index = self.index  # one read of the reference: a concurrent swap cannot mix two versions
        hits = index.search(np.asarray(vectors, dtype=np.float32), k=k, filters=filters or None)
        return [[_hit(h) for h in row] for row in hits]

    def query(self, vector: np.ndarray | None, k: int, filters: dict | None, *, from_id: str | None = None,
              exclude: str | None = None, with_vectors: bool = False) -> dict[str, Any]:
        """One search as a request needs it, from one version of the index: the query is ``vector`` or
        the stored vector of ``from_id``; ``exclude`` (and ``from_id``) is left out of the hits. With the
        hits come the version searched and, ``with_vectors``, the hits' stored vectors. ``found`` is False
        when ``from_id`` is not indexed (or its vector cannot be given back): nothing was searched."""
        with self._lock:
            index, version = self.index, self.version
        if from_id is not None:
            exclude = from_id
            try:
                vector = index.vector(from_id)
            except (KeyError, ValueError):
                return {"found": False, "version": version, "hits": [], "vectors": {}}
        extra = 1 if exclude is not None else 0
        (row,) = index.search(np.asarray(vector, dtype=np.float32).reshape(1, -1), k=k + extra, filters=filters or None)
        hits = [h for h in row if h.id != exclude][:k]
        vectors: dict[str, np.ndarray | None] = {}
        if with_vectors:
            vectors = self._stored(index, [h.id for h in hits])
        return {
            "found": True, "version": version, "vectors": vectors,
            "hits": [_hit(h) for h in hits],
        }

    def info(self) -> dict[str, Any]:
        index = self.index
        manifest = dict(getattr(index, "manifest", {}) or {})
        return {
            "version": self.version,
            "size": len(index),
            "dim": int(index.dim),
            "factory": manifest.get("factory"),
            "model_id": index_model_id(index),
            "recall_vs_exact": manifest.get("recall") or manifest.get("recall_estimate"),
            "loaded_at": self.loaded_at,
            "reloads": self.reloads,
        }

    def vectors(self, ids: list[str]) -> dict[str, np.ndarray | None]:
        """Stored vectors of indexed ids (None for unknown ids or an index that cannot give them back)."""
        return self._stored(self.index, ids)

    @staticmethod
    def _stored(index, ids: list[str]) -> dict[str, np.ndarray | None]:
        out: dict[str, np.ndarray | None] = {}
        for i in ids:
            try:
                out[i] = np.asarray(index.vector(i), dtype=np.float32)
            except (KeyError, ValueError):
                out[i] = None
        return out

    def contains(self, ids: list[str]) -> dict[str, bool]:
        index = self.index
        return {i: i in index for i in ids}

    def add(self, ids: list[str], vectors: np.ndarray, metadata) -> dict[str, Any]:
        """Add vectors to the newest on-disk version, save it as the next version and serve it."""
        from voxsearch.index import update_index
        from voxsearch.index.versions import pointer_line

        vectors = np.asarray(vectors, dtype=np.float32)

        def add_new(index) -> list[str]:
            # update_index hands over a private copy: readers of the live index never see a half-applied add.
            self._check_model(index)
            fresh = [i for i in ids if i not in index]
            if fresh:
                keep = [ids.index(i) for i in fresh]
                index.add(fresh, vectors[keep], metadata=metadata.take(keep) if metadata is not None else None)
            return fresh

        done = update_index(self.directory, add_new)
        if done.action == "changed":
            pointer = pointer_line(self.directory / done.index.version)
            with self._lock:
                self.index, self.pointer = done.index, pointer
                self.loaded_at = time.time()
        return {"added": done.result, "version": self.version, "size": len(self.index)}
