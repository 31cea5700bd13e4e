"""Typed settings and results of a bulk embedding run."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from voxsearch.common.runtime import RayConfig
from voxsearch.common.storage import ObjectPath, location


class EmbedError(RuntimeError):
    """A run cannot start or finish (bad output folder, model mismatch, lock held); names the input."""


FUSE_BELOW_CPUS = 4


@dataclass
class EmbedConfig:
    catalog: Path | ObjectPath  # s3:// and gs:// too
    checkpoint: Path | ObjectPath  # s3:// and gs:// too: each worker fetches its own copy
    out: Path | ObjectPath  # s3:// and gs:// too: one run per prefix at a time, under a run lease (lease.py)
    # Built when missing, updated in place (add new ids, drop changed ones) when it exists.
    index: Path | ObjectPath | None = None
    # Volumes per forward pass of the image tower.
    batch_size: int = 4
    # Image-tower actors. None: one per GPU when the cluster has GPUs, else one CPU actor.
    concurrency: int | None = None
    # CPUs reserved by each CPU actor; also its torch thread count.
    actor_cpus: float = 1.0
    # CPUs reserved by each read+preprocess task (one volume at a time, single-threaded torch).
    read_cpus: float = 1.0
    # Memory reserved by each read task (a decoded series plus its resampled copies), so a node with
    # many cores and little RAM runs fewer reads at once instead of running out of memory.
    read_memory: int = 1 << 30
    # Upper bound of catalog rows per read task; fewer for small runs so every CPU gets work.
    max_rows_per_task: int = 64
    # Read and preprocess inside the model actors instead of in tasks of their own. None: yes on a
    # cluster without GPUs and with fewer than FUSE_BELOW_CPUS CPUs, where one actor then gets the CPUs
    # of one model actor and one read task together (actor_cpus + read_cpus, all as torch threads):
    # with two cores, splitting them leaves the model at one thread and volumes crossing the object store.
    read_in_model_actor: bool | None = None
    # Embed report text with the text tower in the same pass (column text_vector).
    with_text: bool = True
    # Rows per Parquet shard: a killed run loses at most this many finished rows.
    shard_rows: int = 256
    vector_dtype: str = "float32"  # or "float16": halves the shards, ~1e-3 relative error
    # Rerun rows that failed before (their old error rows are replaced).
    retry_failed: bool = False
    # Embed at most this many new rows (trial runs on a big archive).
    limit: int | None = None
    progress: bool = True
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self):
        self.catalog = location(self.catalog)
        self.checkpoint = location(self.checkpoint)
        self.out = location(self.out)
        self.index = location(self.index) if self.index is not None else None
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.read_memory <= 0:
            raise ValueError(f"read_memory must be positive, got {self.read_memory}")
        if self.shard_rows < 1:
            raise ValueError(f"shard_rows must be >= 1, got {self.shard_rows}")
        if self.vector_dtype not in ("float32", "float16"):
            raise ValueError(f"vector_dtype must be float32 or float16, got {self.vector_dtype!r}")


@dataclass
class EmbedSummary:
    embedded: int
    skipped: int
    failed: int
    seconds: float
    model_id: str
    preprocess_id: str
    # Rows whose source changed since they were embedded: their old rows were removed and redone.
    superseded: int = 0
    # Summed busy seconds per stage over all workers: read, preprocess, model (actors), write (driver).
    stage_seconds: dict = field(default_factory=dict)
    # Model actors and what each held: {"size", "num_cpus", "num_gpus", "threads"}.
    actors: dict = field(default_factory=dict)
    # Index update: {"path", "action": "built"|"updated"|"unchanged", "added", "deleted", "size"}.
    index: dict | None = None
    # Seconds from the start until the first rows came back (worker start-up: imports, model load, first
    # batch), and series/s from then to the last rows: the rate a long run settles at.
    startup_seconds: float | None = None
    steady_series_per_s: float | None = None

    @property
    def throughput(self) -> float:
        """Series per second over the whole run (embedded and failed rows both cost work)."""
        done = self.embedded + self.failed
        return done / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "embedded": self.embedded,
            "skipped": self.skipped,
            "failed": self.failed,
            "superseded": self.superseded,
            "seconds": round(self.seconds, 3),
            "series_per_s": round(self.throughput, 4),
            "model_id": self.model_id,
            "preprocess_id": self.preprocess_id,
            "stage_seconds": {k: round(v, 3) for k, v in self.stage_seconds.items()},
            "actors": self.actors,
            "index": self.index,
            "startup_seconds": None if self.startup_seconds is None else round(self.startup_seconds, 3),
            "steady_series_per_s": None if self.steady_series_per_s is None else round(self.steady_series_per_s, 4),
        }
