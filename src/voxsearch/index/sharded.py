"""ShardedIndex: N VectorIndex shards split by a hash of the id, each held by a Ray actor, searched in
parallel and merged. Every shard returns its own true top-k, so the merged top-k equals that of one
index over the same rows. Works on a local Ray or a cluster (shard folders must then be on storage
every node can reach: a shared folder, or an s3:// / gs:// prefix).

On object storage each shard is an index prefix of its own (object_versions.py: version prefixes, a
checksummed manifest, CURRENT written last) and sharded.json is written after every shard has published,
so a reader of a new prefix sees all shards or no index. The actors read and write their shards in the
bucket themselves (every node needs the storage settings, e.g. the same AWS_* variables)."""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa

from voxsearch.index.config import IndexConfig
from voxsearch.common.storage import ObjectPath, location, write_json
from voxsearch.index.errors import IndexCorruptError, IndexFormatError, VectorIndexError
from voxsearch.index.vector_index import Hit, VectorIndex, update_index

SHARDED_MANIFEST = "sharded.json"
SHARDED_FORMAT = "voxsearch-sharded-index"


def shard_of(item_id: str, num_shards: int) -> int:
    """Stable across processes and machines (unlike hash())."""
    return int.from_bytes(hashlib.blake2b(item_id.encode(), digest_size=8).digest(), "little") % num_shards


def sharded_folder(directory: str | Path | ObjectPath) -> Path | ObjectPath:
    """An absolute path (shard actors run elsewhere, with another working directory), or the s3:// /
    gs:// prefix as an ObjectPath."""
    directory = location(directory)
    return directory if isinstance(directory, ObjectPath) else directory.absolute()


def _shard_location(directory: Path | ObjectPath, name: str) -> str | ObjectPath:
    """What a shard actor is given: a path string, or the ObjectPath (which keeps a URI's query)."""
    return directory / name if isinstance(directory, ObjectPath) else str(directory / name)


def read_sharded_manifest(directory: str | Path | ObjectPath) -> dict:
    """sharded.json of a sharded index folder or prefix, checked to be one."""
    directory = sharded_folder(directory)
    path = directory / SHARDED_MANIFEST
    try:
        body = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise IndexFormatError(f"{directory} is not a sharded voxsearch index (no {SHARDED_MANIFEST})") from None
    try:
        manifest = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IndexCorruptError(f"{path} is not valid JSON ({exc})") from None
    if manifest.get("format") != SHARDED_FORMAT:
        raise IndexFormatError(f"{path}: format {manifest.get('format')!r} is not {SHARDED_FORMAT!r}")
    return manifest


class _Shard:
    """Body of the Ray actor holding one shard."""

    def __init__(self) -> None:
        self.index: VectorIndex | None = None

    def build(self, ids, vectors, metadata, config) -> int:
        self.index = VectorIndex.build(ids, vectors, metadata, config)
        return len(self.index)

    def load(self, directory: str | ObjectPath, mmap: bool, verify: bool) -> int:
        self.index = VectorIndex.load(directory, mmap=mmap, verify=verify)
        return len(self.index)

    def search(self, queries, k, filters, params) -> list[list[Hit]]:
        return self.index.search(queries, k=k, filters=filters, params=params)

    def add(self, ids, vectors, metadata, replace) -> int:
        return self.index.add(ids, vectors, metadata, replace=replace)

    def delete(self, ids) -> int:
        return self.index.delete(ids)

    def save(self, directory: str | ObjectPath) -> str:
        return str(self.index.save(directory))

    def compact(self) -> int:
        self.index.compact()
        return len(self.index)

    def update(self, directory: str | ObjectPath, action: str, args: tuple) -> int:
        """Apply add / delete / compact to the newest saved version of this shard and hold the result."""
        done = update_index(directory, lambda index: getattr(index, action)(*args))
        self.index = done.index
        return len(done.index) if action == "compact" else done.result

    def manifest(self) -> dict:
        return self.index.manifest

    def ids(self) -> list[str]:
        return self.index.ids()

    def vector(self, item_id: str):
        return self.index.vector(item_id)


def _partition(ids: Sequence[str], num_shards: int) -> list[np.ndarray]:
    owners = np.fromiter((shard_of(str(i), num_shards) for i in ids), dtype=np.int64, count=len(ids))
    return [np.flatnonzero(owners == s) for s in range(num_shards)]


def _take(metadata: pa.Table | None, rows: np.ndarray) -> pa.Table | None:
    return metadata.take(pa.array(rows)) if metadata is not None else None


class ShardedIndex:
    def __init__(self, actors: list, dim: int, timeout: float):
        self._actors = actors
        self._dim = dim
        self.timeout = timeout

    @staticmethod
    def _spawn(num_shards: int, actor_options: Mapping | None) -> list:
        from voxsearch.common.runtime import init_ray

        ray = init_ray()
        if actor_options is None:
            # Fit all shards on a laptop's CPUs; on a cluster each shard gets a whole CPU, and SPREAD puts
            # the shards on different nodes (Ray's default packs them onto the driver's node while it has
            # room), so one node's memory and cores do not hold them all.
            cpus = ray.cluster_resources().get("CPU", 1.0)
            actor_options = {"num_cpus": min(1.0, cpus / num_shards), "scheduling_strategy": "SPREAD"}
        actor = ray.remote(_Shard).options(**actor_options)
        return [actor.remote() for _ in range(num_shards)]

    def _get(self, refs):
        """ray.get; a shard's index error is raised as itself (its message names the shard's folder or
        URI), not wrapped in Ray's RayTaskError."""
        import ray

        try:
            return ray.get(refs, timeout=self.timeout)
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, VectorIndexError):
                raise exc.cause from None
            raise

    @classmethod
    def build(cls, ids: Sequence[str], vectors: np.ndarray, metadata: pa.Table | None = None, num_shards: int = 2,
              config: IndexConfig | None = None, actor_options: Mapping | None = None,
              timeout: float = 3600.0) -> "ShardedIndex":
        if num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {num_shards}")
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) != len(ids):
            raise ValueError(f"ShardedIndex.build: {len(ids)} ids for vectors of shape {vectors.shape}")
        parts = _partition(ids, num_shards)
        empty = [s for s, rows in enumerate(parts) if not len(rows)]
        if empty:
            raise ValueError(f"ShardedIndex.build: shards {empty} would be empty ({len(ids)} rows, {num_shards} shards)")
        self = cls(cls._spawn(num_shards, actor_options), vectors.shape[1], timeout)
        ids = np.asarray([str(i) for i in ids], dtype=object)
        config = config or IndexConfig()
        with self._closed_on_error():
            self._get([a.build.remote(ids[rows].tolist(), vectors[rows], _take(metadata, rows), config)
                       for a, rows in zip(self._actors, parts)])
        return self

    @classmethod
    def load(cls, directory: str | Path | ObjectPath, mmap: bool = False, verify: bool = True,
             actor_options: Mapping | None = None, timeout: float = 3600.0) -> "ShardedIndex":
        """Each actor loads its shard itself (from an s3:// / gs:// prefix: downloads it on its node)."""
        directory = sharded_folder(directory)
        manifest = read_sharded_manifest(directory)
        self = cls(cls._spawn(manifest["num_shards"], actor_options), manifest["dim"], timeout)
        with self._closed_on_error():
            self._get([a.load.remote(_shard_location(directory, name), mmap, verify)
                       for a, name in zip(self._actors, manifest["shards"])])
        return self

    @contextmanager
    def _closed_on_error(self) -> Iterator[None]:
        """The actors end when building or loading fails: nothing else would free the CPUs they hold."""
        try:
            yield
        except BaseException:
            self.close()
            raise

    @property
    def num_shards(self) -> int:
        return len(self._actors)

    @property
    def dim(self) -> int:
        return self._dim

    def __len__(self) -> int:
        return sum(m["count"] for m in self.shard_manifests())

    def shard_manifests(self) -> list[dict]:
        return self._get([a.manifest.remote() for a in self._actors])

    @property
    def manifest(self) -> dict:
        shards = self.shard_manifests()
        recalls = [m.get("recall", {}).get("recall_at_k") for m in shards]
        known = [(r, m["count"]) for r, m in zip(recalls, shards) if r is not None]
        return {"format": SHARDED_FORMAT, "num_shards": self.num_shards, "dim": self._dim,
                "count": sum(m["count"] for m in shards), "factories": [m["factory"] for m in shards],
                # Row-weighted mean of the shards' measured recall (each vs exact search on its shard).
                "recall_at_k": round(sum(r * c for r, c in known) / sum(c for _, c in known), 4) if known else None,
                "shards": shards}

    def ids(self) -> list[str]:
        return [i for part in self._get([a.ids.remote() for a in self._actors]) for i in part]

    def vector(self, item_id: str) -> np.ndarray:
        """The stored vector of an indexed id (asks only the shard that owns it)."""
        return self._get(self._actors[shard_of(str(item_id), self.num_shards)].vector.remote(str(item_id)))

    def search(self, queries: np.ndarray, k: int = 10, filters: Mapping | None = None,
               params: Mapping | None = None) -> list[list[Hit]]:
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim == 1:
            queries = queries[None, :]
        if queries.shape[-1] != self._dim:
            raise ValueError(f"search queries: dimension {queries.shape[-1]}, the index has dimension {self._dim}")
        per_shard = self._get([a.search.remote(queries, k, filters, params) for a in self._actors])
        merged = []
        for qi in range(len(queries)):
            hits = [h for shard in per_shard for h in shard[qi]]
            hits.sort(key=lambda h: (-h.score, h.id))
            merged.append(hits[:k])
        return merged

    def add(self, ids: Sequence[str], vectors: np.ndarray, metadata: pa.Table | None = None,
            replace: bool = False) -> int:
        vectors = np.asarray(vectors, dtype=np.float32)
        ids = np.asarray([str(i) for i in ids], dtype=object)
        parts = _partition(ids, self.num_shards)
        refs = [a.add.remote(ids[rows].tolist(), vectors[rows], _take(metadata, rows), replace)
                for a, rows in zip(self._actors, parts) if len(rows)]
        return sum(self._get(refs))

    def delete(self, ids: Sequence[str]) -> int:
        ids = np.asarray([str(i) for i in ids], dtype=object)
        parts = _partition(ids, self.num_shards)
        return sum(self._get([a.delete.remote(ids[rows].tolist()) for a, rows in zip(self._actors, parts) if len(rows)]))

    def compact(self) -> int:
        """Compact every shard in parallel; returns the live row count."""
        return sum(self._get([a.compact.remote() for a in self._actors]))

    def update(self, directory: str | Path, action: str, ids: Sequence[str] = (), vectors: np.ndarray | None = None,
               metadata: pa.Table | None = None, replace: bool = False) -> int:
        """`action` ("add", "delete" or "compact") applied to the saved shards in `directory`, each shard
        through update_index so a concurrent writer's version is re-applied to, never overwritten; the
        actors then hold the new versions. Returns rows added / deleted, or the live count for compact."""
        directory = sharded_folder(directory)
        names = read_sharded_manifest(directory)["shards"]
        ids = np.asarray([str(i) for i in ids], dtype=object)
        vectors = np.asarray(vectors, dtype=np.float32) if vectors is not None else None

        def args(rows: np.ndarray) -> tuple:
            if action == "add":
                return ids[rows].tolist(), vectors[rows], _take(metadata, rows), replace
            return (ids[rows].tolist(),)

        if action == "compact":
            calls = [(a, name, ()) for a, name in zip(self._actors, names)]
        else:
            parts = _partition(ids, self.num_shards)
            calls = [(a, name, args(rows)) for a, name, rows in zip(self._actors, names, parts) if len(rows)]
        return sum(self._get([a.update.remote(_shard_location(directory, name), action, args)
                              for a, name, args in calls]))

    @property
    def needs_compact(self) -> bool:
        return any(m["deleted"] / max(m["rows"], 1) > 0.2 for m in self.shard_manifests())

    def save(self, directory: str | Path | ObjectPath) -> Path | ObjectPath:
        """Each shard saves crash-safely into its own folder (or prefix: each actor uploads its shard),
        then sharded.json is swapped in (on object storage: written, one PUT, after every shard)."""
        directory = sharded_folder(directory)
        if isinstance(directory, Path):
            directory.mkdir(parents=True, exist_ok=True)
        names = [f"shard-{s:05d}-of-{self.num_shards:05d}" for s in range(self.num_shards)]
        self._get([a.save.remote(_shard_location(directory, name)) for a, name in zip(self._actors, names)])
        manifest = {"format": SHARDED_FORMAT, "format_version": 1, "num_shards": self.num_shards, "dim": self._dim,
                    "shards": names, "hash": "blake2b-64(id) mod num_shards"}
        write_json(directory / SHARDED_MANIFEST, manifest)
        return directory

    def close(self) -> None:
        import ray

        for actor in self._actors:
            ray.kill(actor)
        self._actors = []

    def __enter__(self) -> "ShardedIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
