"""The studies a server can show: catalog rows plus API-added rows, their reports and their pixels.

Holds the catalog in memory (a dict by series_id; ~1 KB a row, so 100k studies is ~100 MB) and a small
LRU of decoded volumes for slice rendering, which is what a user scrolling through a study hits.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from voxsearch.serve.added_store import AddedStudies
from voxsearch.serve.public import excerpt, public_metadata
from voxsearch.serve.render import PLANES, intensity_range, render_slice, slice_count


class StudyNotFound(KeyError):
    pass


class StudyCatalog:
    def __init__(self, catalog: str | Path, added_dir: str | Path, cache_size: int = 8, excerpt_chars: int = 240):
        from voxsearch.ingest import read_catalog

        table = read_catalog(catalog)
        self.rows: dict[str, dict[str, Any]] = {r["series_id"]: r for r in table.to_pylist()}
        self.added = AddedStudies(added_dir)
        self.cache_size = cache_size
        self.excerpt_chars = excerpt_chars
        self._volumes: OrderedDict[str, tuple] = OrderedDict()
        self._lock = threading.Lock()

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
        hit = self.added.find_content(content_sha256)
        return hit["series_id"] if hit else None

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
        return {i: self.public(i) for i in ids if self.has(i)}

    def reports(self, ids: list[str]) -> dict[str, str | None]:
        return {i: self.row(i).get("report") for i in ids if self.has(i)}

    def filter_values(self) -> dict[str, list]:
        counts: dict[str, Counter] = {"modality": Counter(), "body_part": Counter(), "split": Counter()}
        for row in list(self.rows.values()) + list(self.added.rows().values()):
            for key, counter in counts.items():
                if row.get(key):
                    counter[row[key]] += 1
        return {key: sorted(counter) for key, counter in counts.items()}

    def volume(self, series_id: str):
        """(array X,Y,Z, spacing, modality, display range) of a study, cached."""
        with self._lock:
            if series_id in self._volumes:
                self._volumes.move_to_end(series_id)
                return self._volumes[series_id]
        row = self.row(series_id)
        from voxsearch.ingest import read_volume_row

        vol = read_volume_row(row)
        array = np.asarray(vol.array, dtype=np.float32)
        modality = vol.modality or row.get("modality") or "CT"
        entry = (array, tuple(vol.spacing), modality, intensity_range(array, modality))
        with self._lock:
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
