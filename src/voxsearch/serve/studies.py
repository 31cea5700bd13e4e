"""The studies a server can show: catalog rows plus API-added rows, their reports and their pixels.

Holds the catalog in memory (a dict by series_id; ~1 KB a row, so 100k studies is ~100 MB) and a small
LRU of decoded volumes for slice rendering, which is what a user scrolling through a study hits.

The catalog changes under a running server (`voxsearch sync` adds shards and rewrites or deletes them
when sources go away), so the in-memory copy follows it: at most every `check_s` seconds a request
lists the row shards (one stat each; on object storage, one listing request) and, when the listing
differs, the catalog is read again. The catalog, and the volumes its rows point at, may be on s3:// or
gs:// (the catalog and volume readers fetch them).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from voxsearch.common.storage import ObjectPath, location
from voxsearch.serve.added_studies import AddedStudies
from voxsearch.serve.public import excerpt, public_metadata
from voxsearch.serve.render import PLANES, intensity_range, render_slice, slice_count


log = logging.getLogger(__name__)
CHECK_S = 1.0


class StudyNotFound(KeyError):
    pass


def catalog_stamp(catalog: str | Path | ObjectPath) -> tuple:
    """What changes whenever a catalog's rows do: every shard's name, inode, mtime and size.

    Writers add shards, or replace and delete them by rename and unlink, so a rewritten shard shows as
    a new inode even where mtimes are coarse.
    """
    from voxsearch.ingest.catalog import ROWS_DIR

    path = location(catalog)
    if isinstance(path, ObjectPath):
        return _object_stamp(path, ROWS_DIR)
    if path.is_file():
        st = path.stat()
        return ((path.name, st.st_ino, st.st_mtime_ns, st.st_size),)
    try:
        entries = list(os.scandir(path / ROWS_DIR))
    except FileNotFoundError:
        return ()
    stamp = []
    for entry in entries:
        if not _is_shard(entry.name):
            continue
        try:
            st = entry.stat()
        except FileNotFoundError:
            continue  # deleted since the listing; the next check sees the folder without it
        stamp.append((entry.name, st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(sorted(stamp))


def _is_shard(name: str) -> bool:
    return name.endswith(".parquet") and not name.startswith(".")  # not a writer's temp file


def _object_stamp(catalog: ObjectPath, rows_dir: str) -> tuple:
    """catalog_stamp of a catalog on object storage: every row object's name, size and modification time,
    from one listing. Objects have no inode and their times whole seconds, so an object replaced within a
    second by one of the same size would pass unseen; catalog writers name each shard by its run instead."""
    stamp = tuple((obj.name, size, mtime) for obj, size, mtime in (catalog / rows_dir).rglob_stats()
                  if _is_shard(obj.name))
    if stamp:
        return stamp
    try:
        return ((catalog.name, *catalog.stat()),)  # a catalog that is one Parquet object
    except FileNotFoundError:
        return ()


class StudyCatalog:
    def __init__(self, catalog: str | Path | ObjectPath, added_dir: str | Path, cache_size: int = 8,
                 excerpt_chars: int = 240, check_s: float = CHECK_S):
        self.catalog = location(catalog)
        self.added = AddedStudies(added_dir)
        self.cache_size = cache_size
        self.excerpt_chars = excerpt_chars
        self.check_s = check_s
        self.reloads = 0
        self._volumes: OrderedDict[str, tuple] = OrderedDict()
        self._lock = threading.Lock()
        self._reload_lock = threading.Lock()
        self._stamp = catalog_stamp(self.catalog)
        self._rows = self._read()
        self._checked = time.monotonic()

    def _read(self) -> dict[str, dict[str, Any]]:
        from voxsearch.ingest import read_catalog

        return {r["series_id"]: r for r in read_catalog(self.catalog).to_pylist()}

    @property
    def rows(self) -> dict[str, dict[str, Any]]:
        """The catalog rows by series_id, as of the catalog on disk at most `check_s` seconds ago."""
        if time.monotonic() - self._checked >= self.check_s:
            self.refresh()
        return self._rows

    def refresh(self) -> bool:
        """Read the catalog again if its shards changed; True when it was reloaded."""
        with self._reload_lock:
            self._checked = time.monotonic()
            stamp = catalog_stamp(self.catalog)
            if stamp == self._stamp:
                return False
            try:
                rows = self._read()
            except Exception as exc:  # noqa: BLE001 - a writer mid-round (shard gone between listing and read)
                # The stamp is left as it was, so the next check reads again.
                log.warning("catalog reload failed, still serving the previous rows: %s", type(exc).__name__)
                return False
            old, self._rows, self._stamp = self._rows, rows, stamp
            self.reloads += 1
        log.info("catalog changed on disk: now %d studies (was %d)", len(rows), len(old))
        self._drop_stale_volumes(old)
        return True

    def _drop_stale_volumes(self, old: dict[str, dict[str, Any]]) -> None:
        def same(sid: str) -> bool:
            before, now = old.get(sid), self._rows.get(sid)
            return before is None or (now is not None and all(
                before.get(k) == now.get(k) for k in ("source_path", "content_sha256")))

        with self._lock:
            for sid in [s for s in self._volumes if not same(s)]:
                del self._volumes[sid]

    def __len__(self) -> int:
        return len(self.rows) + len(self.added.rows())

    def row(self, series_id: str) -> dict[str, Any]:
        row = self.rows.get(series_id) or self.added.get(series_id)
        if row is None:
            raise StudyNotFound(series_id)
        return row

    def has(self, series_id: str) -> bool:
        return series_id in self.rows or self.added.get(series_id) is not None

    def find_content(self, content_sha256: str) -> str | None:
        """The series_id of a study with these voxels (voxsearch.common.hashing.content_sha256): a catalog
        row first, else a study added through the API."""
        for rows in (self.rows, self.added.rows()):
            hit = next((sid for sid, row in rows.items() if row.get("content_sha256") == content_sha256), None)
            if hit is not None:
                return hit
        return None

    def public(self, series_id: str, with_report: bool = False) -> dict[str, Any]:
        row = self.row(series_id)
        out = public_metadata(row)
        out["series_id"] = series_id
        out["report_excerpt"] = excerpt(row.get("report"), self.excerpt_chars)
        out["added_via_api"] = series_id not in self.rows
        if with_report:
            out["report"] = row.get("report")
        return out

    def describe_many(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        """Public metadata and report excerpt of each id; ids not in the catalog are left out."""
        out = {}
        for i in ids:
            try:
                out[i] = self.public(i)
            except StudyNotFound:
                continue
        return out

    def reports(self, ids: list[str]) -> dict[str, str | None]:
        out = {}
        for i in ids:
            try:
                out[i] = self.row(i).get("report")
            except StudyNotFound:
                continue
        return out

    def filter_values(self) -> dict[str, list]:
        counts: dict[str, Counter] = {"modality": Counter(), "body_part": Counter(), "split": Counter()}
        for row in list(self.rows.values()) + list(self.added.rows().values()):
            for key, counter in counts.items():
                if row.get(key):
                    counter[row[key]] += 1
        return {key: sorted(counter) for key, counter in counts.items()}

    def volume(self, series_id: str):
        """(array X,Y,Z, spacing, modality, display range) of a study, cached."""
        row = self.row(series_id)  # first: a study the catalog dropped is not served from the cache
        with self._lock:
            if series_id in self._volumes:
                self._volumes.move_to_end(series_id)
                return self._volumes[series_id]
        from voxsearch.ingest import read_volume_row

        vol = read_volume_row(row)
        array = np.asarray(vol.array, dtype=np.float32)
        modality = vol.modality or row.get("modality") or "CT"
        entry = (array, tuple(vol.spacing), modality, intensity_range(array, modality))
        with self._lock:
            if self._rows.get(series_id, row) is not row:
                return entry  # the catalog was reloaded while decoding: do not cache the old version
            self._volumes[series_id] = entry
            while len(self._volumes) > self.cache_size:
                self._volumes.popitem(last=False)
        return entry

    def slices(self, series_id: str) -> dict[str, int]:
        array, _, _, _ = self.volume(series_id)
        return {plane: slice_count(array.shape, plane) for plane in PLANES}

    def render(self, series_id: str, plane: str, index: int | None, window: str | None, max_side: int) -> bytes:
        array, spacing, modality, default_range = self.volume(series_id)
        value_range = None if (window and modality == "CT") else default_range
        return render_slice(array, spacing, modality, plane, index, window, max_side, value_range)

    def model_input(self, series_id: str, preprocess) -> np.ndarray:
        """The preprocessed (1, D, H, W) tensor of a known study, as the image encoder expects it."""
        from voxsearch.ingest import load_volume

        return np.asarray(load_volume(self.row(series_id), preprocess), dtype=np.float32)
