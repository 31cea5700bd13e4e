"""VectorIndex: one faiss index over string ids with metadata, cosine search, filters, add/delete,
crash-safe persistence and a recall estimate measured against exact search.

Rows are numbered in insertion order and that number is the faiss label, so ids, metadata and the
stored vectors are plain arrays indexed by label. Deleted rows stay in those arrays (marked dead)
until `compact()`; indexes that cannot remove entries (HNSW) keep them as tombstones that every
search excludes with an ID selector.

Writers of a saved index go through `update_index`, which re-applies a change to the newest version
whenever another writer saved first, so no writer's rows are lost.
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Generic, Mapping, Sequence, TypeVar

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from voxsearch.common.storage import ObjectPath, location
from voxsearch.index import versions
from voxsearch.index.config import IndexConfig
from voxsearch.index.errors import IndexConflictError, IndexCorruptError, ReadOnlyIndexError
from voxsearch.index.exact import exact_topk, rerank
from voxsearch.index.factory import choose_factory, training_rows
from voxsearch.index.filters import filter_mask
from voxsearch.index.recall import ground_truth, tune

log = logging.getLogger(__name__)

INDEX_FILE, IDS_FILE, VECTORS_FILE, METADATA_FILE = "index.faiss", "ids.parquet", "vectors.npy", "metadata.parquet"
RECALL_K = 10
DEFAULT_RERANK_FACTOR = 10
EF_CANDIDATES = [16, 32, 64, 128, 256, 512, 1024]
MAX_EF = 4096
EMPTY_FACTORY = "Flat"  # what an index holds once its last row is gone: needs no training, takes adds
_AUTO = object()
_PARAM_ALIASES = {"nprobe": "nprobe", "efSearch": "efSearch", "ef_search": "efSearch",
                  "rerank_factor": "rerank_factor", "k_factor": "rerank_factor"}


@dataclass(frozen=True)
class Hit:
    id: str
    score: float
    metadata: dict = field(default_factory=dict)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _as_matrix(vectors: Any, what: str, dim: int | None, normalize: bool) -> np.ndarray:
    array = np.asarray(vectors, dtype=np.float32)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2:
        raise ValueError(f"{what}: expected a (n, d) array of vectors, got shape {array.shape}")
    if dim is not None and array.shape[1] != dim:
        raise ValueError(f"{what}: vectors have dimension {array.shape[1]}, the index has dimension {dim}")
    if array.shape[1] == 0:
        raise ValueError(f"{what}: vectors have dimension 0")
    finite = np.isfinite(array).all(axis=1)
    if not finite.all():
        raise ValueError(f"{what}: row(s) {np.flatnonzero(~finite)[:5].tolist()} contain NaN or inf")
    array = np.array(array, dtype=np.float32, order="C", copy=True)
    if normalize:
        norms = np.linalg.norm(array, axis=1)
        if (norms == 0).any():
            raise ValueError(f"{what}: row(s) {np.flatnonzero(norms == 0)[:5].tolist()} are all-zero vectors (no direction)")
        array /= norms[:, None]
    return array


def _as_ids(ids: Sequence[str], n: int, what: str) -> np.ndarray:
    ids = np.asarray([str(i) for i in ids], dtype=object)
    if len(ids) != n:
        raise ValueError(f"{what}: {len(ids)} ids for {n} vectors")
    uniq, counts = np.unique(ids, return_counts=True) if len(ids) else (ids, np.array([]))
    if (counts > 1).any():
        raise ValueError(f"{what}: duplicate ids {uniq[counts > 1][:5].tolist()}")
    return ids


def _check_metadata(metadata: pa.Table | None, n: int, what: str) -> pa.Table | None:
    if metadata is None:
        return None
    if not isinstance(metadata, pa.Table):
        raise ValueError(f"{what}: metadata must be a pyarrow.Table, got {type(metadata).__name__}")
    if metadata.num_rows != n:
        raise ValueError(f"{what}: metadata has {metadata.num_rows} rows for {n} vectors")
    return metadata.combine_chunks()


def _new_faiss(factory: str, dim: int) -> faiss.Index:
    try:
        base = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ValueError(f"invalid faiss factory string {factory!r} for dimension {dim}: {str(exc).splitlines()[-1]}") from exc
    # IVF indexes carry their own labels; everything else gets an id map so labels survive removals.
    if faiss.try_extract_index_ivf(base) is not None or factory.startswith("IDMap"):
        return base
    return faiss.IndexIDMap2(base)


def _inner(index: faiss.Index) -> faiss.Index:
    index = faiss.downcast_index(index)
    return faiss.downcast_index(index.index) if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)) else index


def _gpu_count() -> int:
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


class VectorIndex:
    """Cosine / inner-product search over string ids. Build with `VectorIndex.build`, open with `load`."""

    def __init__(self, *, index: faiss.Index, dim: int, config: IndexConfig, ids: np.ndarray, alive: np.ndarray,
                 vectors: np.ndarray | None, metadata: pa.Table | None, info: dict, read_only: bool = False):
        self._index = index
        self._dim = dim
        self.config = config
        self._ids = ids
        self._alive = alive
        self._vectors = vectors
        self._metadata = metadata
        self._info = info  # factory, reason, rerank, search defaults, recall, source, timestamps
        self._read_only = read_only
        self._pos: dict[str, int] | None = None
        self._gpu_index = None
        self._gpu_failed = False
        self._changes = 0  # add / delete / compact calls that changed rows: update_index saves only then
        # (versions.identity of the folder, version name) it was loaded from or last saved to: what a save expects
        self._origin: tuple[str, str] | None = None

    # ----- construction -------------------------------------------------------------------------
    @classmethod
    def build(cls, ids: Sequence[str], vectors: np.ndarray, metadata: pa.Table | None = None,
              config: IndexConfig | None = None, source: dict | None = None) -> "VectorIndex":
        """Index `vectors` (n, d) under `ids`; picks (or uses the forced) factory, trains on a random
        sample, adds everything and measures recall@10 against exact search."""
        config = config or IndexConfig()
        if config.use_gpu is True and _gpu_count() == 0:
            # Only a build refuses: an index saved on a GPU machine still loads (on CPU) elsewhere.
            raise ValueError("IndexConfig.use_gpu=True but faiss sees no GPU (install the 'gpu' extra on a GPU machine)")
        started = time.perf_counter()
        matrix = _as_matrix(vectors, "build", None, config.normalize)
        n, dim = matrix.shape
        id_array = _as_ids(ids, n, "build")
        metadata = _check_metadata(metadata, n, "build")
        if n == 0:
            raise ValueError("build: no vectors given")
        choice = choose_factory(n, dim, config)
        index = _new_faiss(choice.factory, dim)
        log.info("building %s over %d x %d vectors (%s)", choice.factory, n, dim, choice.reason)
        info = {"factory": choice.factory, "factory_reason": choice.reason, "factory_auto": config.factory is None,
                "rerank": choice.rerank, "estimated_bytes": choice.estimated_bytes, "source": source or {},
                "created_at": _now()}
        self = cls(index=index, dim=dim, config=config, ids=id_array, alive=np.ones(n, dtype=bool),
                   vectors=matrix if config.store_vectors else None, metadata=metadata, info=info)
        if choice.rerank and not config.store_vectors:
            raise ValueError(f"factory {choice.factory} re-ranks with stored vectors: set store_vectors=True or rerank=False")
        self._train(matrix)
        self._add_to_faiss(matrix, np.arange(n, dtype=np.int64))
        self._info["build_seconds"] = round(time.perf_counter() - started, 3)
        self._calibrate(matrix)
        return self

    def _train(self, matrix: np.ndarray) -> None:
        inner = _inner(self._index)
        if inner.is_trained:
            return
        rng = np.random.default_rng(self.config.seed)
        count = training_rows(self._info["factory"], len(matrix))
        # A random sample, not the first rows: shards are often sorted by date or modality.
        rows = np.sort(rng.choice(len(matrix), size=count, replace=False))
        started = time.perf_counter()
        inner.train(np.ascontiguousarray(matrix[rows]))
        self._info["train_rows"] = int(count)
        self._info["train_seconds"] = round(time.perf_counter() - started, 3)

    def _add_to_faiss(self, matrix: np.ndarray, labels: np.ndarray) -> None:
        step = self.config.add_batch_size
        batches = range(0, len(matrix), step)
        for start in tqdm(batches, desc="index add", unit="batch", disable=len(batches) < 4, leave=False):
            self._index.add_with_ids(matrix[start:start + step], labels[start:start + step])
        self._gpu_index = None

    def _calibrate(self, matrix: np.ndarray) -> None:
        """Tune nprobe / efSearch to the target recall and record the measured recall@10."""
        alive = np.flatnonzero(self._alive)
        inner = _inner(self._index)
        ivf = faiss.try_extract_index_ivf(inner)
        knob, candidates, fixed = None, [], {}
        if ivf is not None:
            knob = "nprobe"
            candidates = [self.config.nprobe] if self.config.nprobe else [2**i for i in range(0, 20) if 2**i <= ivf.nlist]
        elif isinstance(inner, faiss.IndexHNSW):
            knob = "efSearch"
            candidates = [self.config.ef_search] if self.config.ef_search else EF_CANDIDATES
        if self._info["rerank"]:
            fixed["rerank_factor"] = self.config.rerank_factor or DEFAULT_RERANK_FACTOR
        k = min(RECALL_K, len(alive) - 1)
        if self.config.recall_queries <= 0 or k < 1:
            # Unmeasured: the user's value, else a middle-of-the-road setting rather than the cheapest.
            fallback = {"nprobe": min(16, ivf.nlist) if ivf is not None else 0, "efSearch": 64}
            default = {knob: candidates[0] if len(candidates) == 1 else fallback[knob]} if knob else {}
            self._info["search_defaults"] = {**fixed, **default}
            self._info["recall"] = {"recall_at_k": None, "k": RECALL_K,
                                    "note": "not measured (recall_queries=0 or fewer than 2 rows)"}
            return
        started = time.perf_counter()
        rows, queries, truth = ground_truth(matrix, alive, self.config.recall_queries, k, self.config.seed)

        def search(q: np.ndarray, kk: int, params: dict) -> np.ndarray:
            return self._search_labels(q, kk, None, params)[1]

        params, recall, curve = tune(search, queries, truth, rows, k, knob, candidates, self.config.target_recall, fixed)
        self._info["search_defaults"] = params
        self._info["recall"] = {
            "recall_at_k": round(float(recall), 4), "k": k, "queries": int(len(rows)), "params": params,
            "target": self.config.target_recall, "reached_target": bool(recall >= self.config.target_recall),
            "curve": curve, "rows_at_measurement": int(len(alive)), "measured_at": _now(),
            "seconds": round(time.perf_counter() - started, 3),
            "method": "recall@k vs exact inner-product search; queries sampled at random from the indexed "
                      "vectors, each query's own row excluded",
        }
        if recall < self.config.target_recall:
            log.warning("%s reaches recall@%d %.3f < target %.3f at best (%s)", self._info["factory"], k, recall,
                        self.config.target_recall, params)

    # ----- basic properties -----------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self._alive.sum())

    @property
    def dim(self) -> int:
        return self._dim

    def ids(self) -> list[str]:
        return self._ids[self._alive].tolist()

    def __contains__(self, item: str) -> bool:
        return item in self._positions

    @property
    def _positions(self) -> dict[str, int]:
        if self._pos is None:
            alive = np.flatnonzero(self._alive)
            self._pos = dict(zip(self._ids[alive].tolist(), alive.tolist()))
        return self._pos

    @property
    def manifest(self) -> dict:
        tombstones = int(self._index.ntotal) - len(self)
        return {
            **self._info,
            "dim": self._dim, "count": len(self), "rows": int(len(self._ids)),
            "deleted": int(len(self._ids) - len(self)), "tombstones": tombstones,
            "metric": "inner_product", "normalized": self.config.normalize,
            "stores_vectors": self._vectors is not None,
            "metadata_columns": self._metadata.column_names if self._metadata is not None else [],
            "config": self.config.to_dict(), "faiss_version": faiss.__version__,
            "gpu": self._gpu_enabled(),
        }

    @property
    def needs_compact(self) -> bool:
        """True once deleted rows are over a fifth of what is stored: time for `compact()`."""
        return len(self._ids) > 0 and (len(self._ids) - len(self)) / len(self._ids) > 0.2

    def vector(self, item_id: str) -> np.ndarray:
        """The stored (normalised) vector of an indexed id, e.g. to search by example."""
        if item_id not in self._positions:
            raise KeyError(f"id {item_id!r} is not in the index")
        row = self._positions[item_id]
        if self._vectors is not None:
            return np.array(self._vectors[row], dtype=np.float32)
        try:
            return self._index.reconstruct(row)
        except RuntimeError as exc:
            raise ValueError(f"index stores no vectors and {self._info['factory']} cannot reconstruct id {item_id!r}") from exc

    # ----- modification ---------------------------------------------------------------------------
    def _writable(self, action: str) -> None:
        if self._read_only:
            raise ReadOnlyIndexError(f"cannot {action}: this index was loaded with mmap=True (read-only); load it without mmap")

    def add(self, ids: Sequence[str], vectors: np.ndarray, metadata: pa.Table | None = None,
            replace: bool = False) -> int:
        """Add rows without rebuilding. Existing ids raise unless replace=True (then they are updated)."""
        self._writable("add")
        matrix = _as_matrix(vectors, "add", self._dim, self.config.normalize)
        id_array = _as_ids(ids, len(matrix), "add")
        metadata = _check_metadata(metadata, len(matrix), "add")
        existing = [i for i in id_array.tolist() if i in self._positions]
        if existing:
            if not replace:
                raise ValueError(f"add: ids already indexed: {existing[:5]} ({len(existing)} in all); pass replace=True to update them")
            self.delete(existing)
        if not len(matrix):
            return 0
        start = len(self._ids)
        labels = np.arange(start, start + len(matrix), dtype=np.int64)
        self._add_to_faiss(matrix, labels)
        self._ids = np.concatenate([self._ids, id_array])
        self._alive = np.concatenate([self._alive, np.ones(len(matrix), dtype=bool)])
        if self._vectors is not None:
            self._vectors = np.concatenate([np.asarray(self._vectors), matrix])
        self._metadata = self._append_metadata(metadata, len(matrix))
        positions = self._positions
        positions.update(zip(id_array.tolist(), labels.tolist()))
        self._info["updated_at"] = _now()
        self._changes += 1
        return len(matrix)

    def _append_metadata(self, metadata: pa.Table | None, n: int) -> pa.Table | None:
        if self._metadata is None and metadata is None:
            return None
        old = self._metadata
        if old is None:
            old = pa.table({c: pa.nulls(len(self._ids) - n, metadata.schema.field(c).type) for c in metadata.column_names})
        if metadata is None:
            metadata = pa.table({c: pa.nulls(n, old.schema.field(c).type) for c in old.column_names})
        try:
            return pa.concat_tables([old, metadata], promote_options="permissive").combine_chunks()
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise ValueError(f"add: metadata columns do not match the index's ({old.schema}): {exc}") from exc

    def delete(self, ids: Sequence[str]) -> int:
        """Remove ids (unknown ones are ignored); returns how many were removed."""
        self._writable("delete")
        positions = self._positions
        rows = np.array(sorted({positions[i] for i in map(str, ids) if i in positions}), dtype=np.int64)
        if not len(rows):
            return 0
        self._alive[rows] = False
        for row in rows.tolist():
            del positions[self._ids[row]]
        try:
            self._index.remove_ids(faiss.IDSelectorBatch(rows))
        except RuntimeError:
            pass  # e.g. HNSW: the rows stay as tombstones that searches exclude until compact()
        self._gpu_index = None
        self._info["updated_at"] = _now()
        self._changes += 1
        return int(len(rows))

    def compact(self) -> "VectorIndex":
        """Rebuild over the live rows (re-choosing the factory if it was automatic), drop tombstones,
        retrain and re-measure recall. Needs the stored vectors."""
        self._writable("compact")
        if self._vectors is None:
            raise ValueError("compact needs the stored vectors (the index was built with store_vectors=False)")
        alive = np.flatnonzero(self._alive)
        if not len(alive):
            self._empty_out()
            return self
        metadata = self._metadata.take(pa.array(alive)) if self._metadata is not None else None
        # The user's forced factory, else the one built (an emptied index was Flat only while empty).
        forced = self.config.factory or self._info["factory"]
        config = IndexConfig.from_dict({**self.config.to_dict(),
                                        "factory": None if self._info.get("factory_auto") else forced,
                                        "normalize": False})  # stored vectors are already normalised
        rebuilt = VectorIndex.build(self._ids[alive], np.asarray(self._vectors[alive]), metadata, config,
                                    source=self._info.get("source"))
        rebuilt.config = self.config
        rebuilt._info["factory_auto"] = self._info.get("factory_auto", False)
        rebuilt._info["created_at"] = self._info.get("created_at")
        rebuilt._info["compacted_at"] = _now()
        rebuilt._changes, rebuilt._origin = self._changes + 1, self._origin
        self.__dict__.update(rebuilt.__dict__)
        return self

    def _empty_out(self) -> None:
        """No rows left: an empty index that saves, loads, searches (no hits) and takes adds. An
        untrained IVF or PQ could take no adds, so it becomes Flat until a compact re-chooses."""
        self._index = _new_faiss(EMPTY_FACTORY, self._dim)
        self._ids = np.asarray([], dtype=object)
        self._alive = np.zeros(0, dtype=bool)
        self._vectors = np.zeros((0, self._dim), dtype=np.float32)
        self._metadata = self._metadata.schema.empty_table() if self._metadata is not None else None
        self._pos, self._gpu_index = None, None
        self._info.update(factory=EMPTY_FACTORY, factory_reason="empty: every row was deleted", rerank=False,
                          search_defaults={}, compacted_at=_now(),
                          recall={"recall_at_k": None, "k": RECALL_K, "note": "not measured (empty index)"})
        self._changes += 1

    # ----- search -----------------------------------------------------------------------------------
    def _gpu_enabled(self) -> bool:
        return self.config.use_gpu in ("auto", True) and not self._gpu_failed and _gpu_count() > 0

    def _faiss_for(self, with_selector: bool) -> faiss.Index:
        # GPU indexes take no ID selectors: filtered searches stay on the CPU copy.
        if with_selector or not self._gpu_enabled():
            return self._index
        if self._gpu_index is None:
            try:
                self._gpu_index = faiss.index_cpu_to_all_gpus(self._index)
            except (RuntimeError, AttributeError) as exc:
                log.warning("searching on CPU: %s cannot move to GPU (%s)", self._info["factory"], exc)
                self._gpu_failed = True
                return self._index
        return self._gpu_index

    def _knobs(self, params: Mapping | None) -> dict:
        knobs = dict(self._info.get("search_defaults", {}))
        for key, value in (params or {}).items():
            if key not in _PARAM_ALIASES:
                raise ValueError(f"unknown search parameter {key!r}; known: nprobe, efSearch (ef_search), rerank_factor")
            if int(value) < 1:
                raise ValueError(f"search parameter {key} must be >= 1, got {value}")
            knobs[_PARAM_ALIASES[key]] = int(value)
        return knobs

    def _faiss_params(self, knobs: dict, selector, widen: float):
        inner = _inner(self._index)
        ivf = faiss.try_extract_index_ivf(inner)
        if ivf is not None:
            nprobe = min(ivf.nlist, math.ceil(knobs.get("nprobe", ivf.nprobe) * widen))
            return faiss.SearchParametersIVF(sel=selector, nprobe=nprobe) if selector else faiss.SearchParametersIVF(nprobe=nprobe)
        if isinstance(inner, faiss.IndexHNSW):
            ef = min(MAX_EF, math.ceil(knobs.get("efSearch", inner.hnsw.efSearch) * widen))
            return faiss.SearchParametersHNSW(sel=selector, efSearch=ef) if selector else faiss.SearchParametersHNSW(efSearch=ef)
        return faiss.SearchParameters(sel=selector) if selector else None

    def _search_labels(self, queries: np.ndarray, k: int, mask: np.ndarray | None,
                       params: Mapping | None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, labels) (q, k) for normalised queries; -1 labels where fewer than k rows qualify."""
        nq = len(queries)
        empty = (np.full((nq, k), -np.inf, dtype=np.float32), np.full((nq, k), -1, dtype=np.int64))
        knobs = self._knobs(params)
        factor = knobs.pop("rerank_factor", DEFAULT_RERANK_FACTOR) if self._info["rerank"] else 1
        ntotal = int(self._index.ntotal)
        selector, bitmap, widen, passing = None, None, 1.0, None
        if mask is not None:
            passing = np.flatnonzero(mask)
            if not len(passing) or ntotal == 0:
                return empty
            if self._vectors is not None and len(passing) <= max(self.config.exact_filter_max, k):
                return exact_topk(queries, self._vectors, passing, k)
            bitmap = np.packbits(mask, bitorder="little")
            selector = faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(bitmap))
            # Few passing rows per probed list: probe proportionally more so k of them are still found.
            widen = ntotal / len(passing)
        if ntotal == 0:
            return empty
        fetch = min(k * factor, ntotal)
        index = self._faiss_for(selector is not None)
        scores, labels = index.search(queries, fetch, params=self._faiss_params(knobs, selector, widen))
        if self._info["rerank"] and self._vectors is not None:
            scores, labels = rerank(queries, self._vectors, labels, k)
        elif fetch < k:
            pad = k - fetch
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
            labels = np.pad(labels, ((0, 0), (0, pad)), constant_values=-1)
        if passing is not None and self._vectors is not None:
            # The guarantee: k passing rows whenever k exist. Rare misses fall back to exact search.
            short = np.flatnonzero((labels >= 0).sum(axis=1) < min(k, len(passing)))
            if len(short):
                s, l = exact_topk(queries[short], self._vectors, passing, k)
                scores[short], labels[short] = s, l
        return scores, labels

    def search(self, queries: np.ndarray, k: int = 10, filters: Mapping | None = None,
               params: Mapping | None = None) -> list[list[Hit]]:
        """Top-k cosine matches per query row, best first. `filters` keeps only rows whose metadata
        passes ({"modality": "CT", "split": ["train", "test"], "study_date": {"min": "2020-01-01"}});
        `params` overrides nprobe / efSearch / rerank_factor for this call."""
        if int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = _as_matrix(queries, "search queries", self._dim, self.config.normalize)
        mask = None
        if filters:
            mask = filter_mask(self._metadata, filters, len(self._ids)) & self._alive
        elif int(self._index.ntotal) != len(self):
            mask = self._alive
        scores, labels = self._search_labels(q, int(k), mask, params)
        return self._hits(scores, labels)

    def _hits(self, scores: np.ndarray, labels: np.ndarray) -> list[list[Hit]]:
        valid = labels >= 0
        flat = labels[valid]
        rows = self._metadata.take(pa.array(flat)).to_pylist() if self._metadata is not None and len(flat) else [{}] * len(flat)
        ids = self._ids[flat].tolist()
        out, cursor = [], 0
        for qi in range(labels.shape[0]):
            hits = []
            for score in scores[qi][valid[qi]].tolist():
                hits.append(Hit(ids[cursor], float(score), rows[cursor]))
                cursor += 1
            out.append(hits)
        return out

    # ----- persistence ------------------------------------------------------------------------------
    @property
    def version(self) -> str | None:
        """The version folder this object was loaded from or last saved to ("v000003")."""
        return self._origin[1] if self._origin else None

    def save(self, directory: str | Path | ObjectPath, expected: str | None | object = _AUTO) -> Path | ObjectPath:
        """Write a new version of the index folder atomically; returns the version folder. `directory`
        may be an s3:// or gs:// URI (see versions.py for what holds there).

        `expected` is the version the caller read there (None: no index yet; versions.ANY_VERSION: replace
        whatever is there). By default an index loaded from or saved to `directory` expects the version
        it last saw, so a version another writer saved meanwhile raises IndexConflictError instead of
        being overwritten; any other index (a fresh build) replaces what the folder holds."""
        writers = {
            INDEX_FILE: lambda p: faiss.write_index(self._index, str(p)),
            IDS_FILE: lambda p: pq.write_table(pa.table({"id": pa.array(self._ids.tolist(), pa.string()),
                                                          "alive": pa.array(self._alive)}), p),
        }
        if self._vectors is not None:
            writers[VECTORS_FILE] = lambda p: _save_npy(p, self._vectors)
        if self._metadata is not None:
            writers[METADATA_FILE] = lambda p: pq.write_table(self._metadata, p)
        manifest = {k: v for k, v in self.manifest.items() if k not in ("gpu", "files", "directory")}
        manifest["saved_at"] = _now()
        directory = location(directory)
        if expected is _AUTO:
            mine = self._origin is not None and self._origin[0] == versions.identity(directory)
            expected = self._origin[1] if mine else versions.ANY_VERSION
        folder = versions.write_version(directory, writers, manifest, expected=expected)
        written = json.loads((folder / versions.MANIFEST).read_text())
        self._info.update(files=written["files"], saved_at=manifest["saved_at"], directory=str(directory))
        self._origin = (versions.identity(directory), folder.name)
        return folder

    @classmethod
    def load(cls, directory: str | Path | ObjectPath, mmap: bool = False, verify: bool = True,
             config: IndexConfig | None = None) -> "VectorIndex":
        """Open a saved index, verifying every file's checksum. mmap=True maps the index file instead
        of reading it (for indexes larger than RAM); such an index is read-only. From an s3:// or gs://
        URI the files are downloaded to a temp folder first (mmap then maps that local copy)."""
        directory = location(directory)
        with versions.open_version(directory, verify=verify) as (folder, manifest, name):
            loaded = cls._from_folder(directory, folder, manifest, mmap, config)
        loaded._origin = (versions.identity(directory), name)
        return loaded

    @classmethod
    def _from_folder(cls, directory, folder: Path, manifest: dict, mmap: bool,
                     config: IndexConfig | None) -> "VectorIndex":
        """The index in a checked version folder; `directory` names it in errors."""
        flags = (faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY) if mmap else 0
        try:
            index = faiss.read_index(str(folder / INDEX_FILE), flags)
        except RuntimeError as exc:
            raise IndexCorruptError(f"index {directory}: {INDEX_FILE} cannot be read by faiss: {str(exc).splitlines()[-1]}") from exc
        ids_table = pq.read_table(folder / IDS_FILE)
        ids = np.asarray(ids_table.column("id").to_pylist(), dtype=object)
        alive = ids_table.column("alive").to_numpy(zero_copy_only=False).astype(bool)
        dim = int(manifest["dim"])
        problems = []
        if index.d != dim:
            problems.append(f"{INDEX_FILE} has dimension {index.d}, the manifest says {dim}")
        if len(ids) != manifest["rows"] or int(alive.sum()) != manifest["count"]:
            problems.append(f"{IDS_FILE} has {len(ids)} rows / {int(alive.sum())} live, the manifest says {manifest['rows']} / {manifest['count']}")
        if int(index.ntotal) != manifest["count"] + manifest["tombstones"]:
            problems.append(f"{INDEX_FILE} holds {index.ntotal} vectors, the manifest says {manifest['count'] + manifest['tombstones']}")
        vectors = None
        if (folder / VECTORS_FILE).is_file():
            # Always memory-mapped: only exact filtering, re-ranking and compaction read it.
            vectors = np.load(folder / VECTORS_FILE, mmap_mode="r")
            if vectors.shape != (len(ids), dim):
                problems.append(f"{VECTORS_FILE} has shape {vectors.shape}, expected {(len(ids), dim)}")
        metadata = None
        if (folder / METADATA_FILE).is_file():
            metadata = pq.read_table(folder / METADATA_FILE, memory_map=mmap)
            if metadata.num_rows != len(ids):
                problems.append(f"{METADATA_FILE} has {metadata.num_rows} rows, expected {len(ids)}")
        if problems:
            raise IndexCorruptError(f"index {directory} is inconsistent: " + "; ".join(problems))
        config = config or IndexConfig.from_dict(manifest.get("config", {}))
        info_keys = ("factory", "factory_reason", "factory_auto", "rerank", "estimated_bytes", "source", "created_at",
                     "updated_at", "compacted_at", "build_seconds", "train_rows", "train_seconds", "search_defaults",
                     "recall", "saved_at", "files", "format_version")
        info = {k: manifest[k] for k in info_keys if k in manifest}
        info["directory"] = str(directory)
        return cls(index=index, dim=dim, config=config, ids=ids, alive=alive, vectors=vectors,
                   metadata=metadata, info=info, read_only=mmap)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as handle:
        np.save(handle, np.asarray(array, dtype=np.float32))


T = TypeVar("T")


@dataclass
class IndexUpdate(Generic[T]):
    index: VectorIndex | None  # the version now on disk (None: no index and nothing to create)
    result: T | None  # what `change` returned
    action: str  # "created" | "changed" | "unchanged"


def update_index(directory: str | Path | ObjectPath, change: Callable[[VectorIndex], T], *,
                 create: Callable[[], VectorIndex | None] | None = None, retries: int = 3,
                 lock_timeout: float = versions.LOCK_TIMEOUT_S) -> IndexUpdate[T]:
    """The one way to change a saved index: load its newest version, apply `change` (which mutates the
    index and may return a result), save it with a compare-and-swap on the version read; when another
    writer saved first, reload and apply `change` again. Nothing is saved if `change` changed no rows.
    `create` builds the index when the folder holds none (returning None leaves it absent).

    The first `retries` attempts hold no lock while `change` runs, so a slow change (a compact) never
    blocks quick writers such as the server's /embed; the last attempt holds the folder's write lock
    throughout, so a writer that keeps losing the race still finishes. On object storage there is no
    lock to hold: the last attempt can lose the race as well (versions.py, object_versions.py)."""
    directory = location(directory)
    if create is None and not versions.is_index_dir(directory):
        VectorIndex.load(directory)  # raises, naming the folder
    attempt = 0
    while True:
        last = attempt >= retries
        with versions.write_lock(directory, lock_timeout) if last and isinstance(directory, Path) else nullcontext():
            if versions.is_index_dir(directory):
                read = versions.current_version(directory)
                try:
                    index, created = VectorIndex.load(directory), False
                except (OSError, IndexCorruptError):
                    if last or versions.current_version(directory) == read:
                        raise
                    attempt += 1  # writers swapped twice while we read: our version was pruned under us
                    continue
            else:
                index, created = create(), True
                if index is None:
                    return IndexUpdate(None, None, "unchanged")
            before = index._changes
            result = None if created else change(index)
            if not created and index._changes == before:
                return IndexUpdate(index, result, "unchanged")
            try:
                index.save(directory, expected=None if created else index.version)
            except IndexConflictError as exc:
                if last:
                    raise
                attempt += 1
                log.info("%s; re-applying the change to the new version", exc)
                continue
            return IndexUpdate(index, result, "created" if created else "changed")
