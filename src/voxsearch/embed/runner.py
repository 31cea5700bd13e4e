"""`run_embedding`: catalog -> Ray Data (read tasks -> model actors) -> Parquet shards -> index.

The driver is the only writer. Workers send back small rows (id position, vector, error) and the driver
appends them to shards, so a worker that dies and is retried by Ray cannot write anything twice, and a
driver that dies leaves only whole shards, which the next run skips.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from voxsearch.common.storage import ObjectPath
from voxsearch.embed.config import FUSE_BELOW_CPUS, EmbedConfig, EmbedError, EmbedSummary
from voxsearch.embed.mapper import BulkEncoder, ReadAndEncode, load_row
from voxsearch.embed.reader import Plan, load_catalog, loader_blocks, plan_rows, rows_per_task
from voxsearch.embed.shards import (
    ERROR_SCHEMA,
    META_COLUMNS,
    REPORT_EXCERPT_CHARS,
    EmbeddingStore,
    ShardWriter,
    embedding_schema,
)
from voxsearch.embed.lease import new_run_id

log = logging.getLogger(__name__)


@dataclass
class ModelInfo:
    model_id: str
    preprocess: object  # voxsearch.ingest.PreprocessConfig
    dim: int


def resolve_model(checkpoint: Path | ObjectPath) -> ModelInfo:
    """Model id and preprocessing of the checkpoint (its contract: see voxsearch.encoders.open_checkpoint)."""
    from voxsearch.encoders import open_checkpoint
    from voxsearch.ingest import PreprocessConfig

    try:
        opened = open_checkpoint(checkpoint)
        return ModelInfo(opened.model_id, PreprocessConfig.from_dict(opened.preprocess), opened.embed_dim)
    except (OSError, ValueError) as e:
        raise EmbedError(f"cannot use checkpoint {checkpoint}: {e}") from e


def _absolute(checkpoint: Path | ObjectPath) -> str | ObjectPath:
    """The checkpoint as the model actors open it: a local folder by its absolute path (they may start in
    another working directory), a URI as it is (each fetches its own copy; see open_checkpoint)."""
    return str(checkpoint.resolve()) if isinstance(checkpoint, Path) else checkpoint


def actor_plan(cfg: EmbedConfig, cluster_cpus: float, cluster_gpus: float) -> dict:
    """How many image-tower actors and what each reserves. One per GPU where there are GPUs; on CPUs,
    half the cluster by default, always leaving room for at least one read task (else nothing feeds them)."""
    fused = cfg.read_in_model_actor
    if fused is None:
        fused = cluster_gpus < 1 and cluster_cpus < FUSE_BELOW_CPUS
    if fused:
        size = cfg.concurrency or 1
        each = cfg.actor_cpus + cfg.read_cpus
        if size * each > cluster_cpus:
            raise EmbedError(f"{size} model actors reading their own rows x {each:g} CPUs (actor_cpus + read_cpus) "
                             f"exceed the cluster's {cluster_cpus:g} CPUs; lower concurrency or the CPUs per actor")
        gpu = 1 if cluster_gpus >= 1 else 0
        return {"size": size, "num_cpus": each, "num_gpus": gpu, "threads": max(1, int(each)), "reads_in_actor": True}
    if cluster_gpus >= 1:
        size = cfg.concurrency or int(cluster_gpus)
        if size > cluster_gpus:
            raise EmbedError(f"concurrency {size} asks for more GPU actors than the cluster's {int(cluster_gpus)} GPUs")
        return {"size": size, "num_cpus": 1.0, "num_gpus": 1, "threads": 1, "reads_in_actor": False}
    size = cfg.concurrency or max(1, int(cluster_cpus / 2 // cfg.actor_cpus))
    if size * cfg.actor_cpus + cfg.read_cpus > cluster_cpus:
        raise EmbedError(
            f"{size} model actors x {cfg.actor_cpus} CPUs + {cfg.read_cpus} CPU for reading exceeds the "
            f"cluster's {cluster_cpus:g} CPUs; lower concurrency or actor_cpus"
        )
    return {"size": size, "num_cpus": cfg.actor_cpus, "num_gpus": 0, "threads": max(1, int(cfg.actor_cpus)),
            "reads_in_actor": False}


def _fixed_list(matrix: np.ndarray, dtype, mask: np.ndarray | None = None) -> pa.Array:
    flat = pa.array(np.ascontiguousarray(matrix, dtype=dtype).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, matrix.shape[1], mask=None if mask is None else pa.array(mask))


@dataclass
class _Batches:
    """Turns the pipeline's numpy batches into shard rows, tracking what arrived."""

    meta: pa.Table  # todo rows: series_id, content_sha256, metadata, report_excerpt
    schema: pa.Schema
    model_id: str
    preprocess_id: str
    vector_dtype: type
    seen: np.ndarray = None
    stage_seconds: dict = field(default_factory=lambda: {"read": 0.0, "preprocess": 0.0, "model": 0.0})

    def __post_init__(self):
        self.seen = np.zeros(self.meta.num_rows, bool)

    def split(self, batch: dict) -> tuple[pa.Table, pa.Table, int]:
        index = np.asarray(batch["row_index"], np.int64)
        repeat = self.seen[index]
        if repeat.any():  # a retried task re-sent rows the driver already has: drop them, never write twice
            log.warning("dropping %d rows delivered twice", int(repeat.sum()))
            keep = ~repeat
            batch = {k: np.asarray(v)[keep] for k, v in batch.items()}
            index = index[keep]
        self.seen[index] = True
        self.stage_seconds["read"] += float(np.sum(batch["t_read"]))
        self.stage_seconds["preprocess"] += float(np.sum(batch["t_preprocess"]))
        self.stage_seconds["model"] += float(np.sum(batch["t_model"]))
        failed = np.asarray(batch["error"]).astype(str) != ""
        return self._embedded(batch, index, ~failed), self._errors(batch, index, failed), int(index.size)

    def _common(self, rows: np.ndarray) -> tuple[pa.Table, dict]:
        m = self.meta.take(pa.array(rows, pa.int64()))
        n = m.num_rows
        return m, {
            "id": m.column("series_id"),
            "model_id": pa.array([self.model_id] * n, pa.string()),
            "preprocess_id": pa.array([self.preprocess_id] * n, pa.string()),
            "content_sha256": m.column("content_sha256"),
        }

    def _embedded(self, batch: dict, index: np.ndarray, ok: np.ndarray) -> pa.Table:
        rows = index[ok]
        m, cols = self._common(rows)
        cols["vector"] = _fixed_list(np.asarray(batch["vector"])[ok], self.vector_dtype)
        for name in META_COLUMNS:
            cols[name] = m.column(name) if name in m.column_names else pa.nulls(len(rows), self.schema.field(name).type)
        cols["report_excerpt"] = m.column("report_excerpt")
        if "text_vector" in self.schema.names:
            has_text = np.asarray(batch["has_text"])[ok]
            cols["text_vector"] = _fixed_list(np.asarray(batch["text_vector"])[ok], self.vector_dtype, ~has_text)
        return pa.table({f.name: cols[f.name] for f in self.schema}).cast(self.schema)

    def _errors(self, batch: dict, index: np.ndarray, failed: np.ndarray) -> pa.Table:
        rows = index[failed]
        _, cols = self._common(rows)
        cols["stage"] = pa.array(np.asarray(batch["stage"])[failed].astype(str).tolist(), pa.string())
        cols["error"] = pa.array(np.asarray(batch["error"])[failed].astype(str).tolist(), pa.string())
        cols["failed_at"] = pa.array([int(time.time())] * len(rows), ERROR_SCHEMA.field("failed_at").type)
        return pa.table({f.name: cols[f.name] for f in ERROR_SCHEMA}).cast(ERROR_SCHEMA)


def _driver_meta(todo: pa.Table) -> pa.Table:
    """What the driver keeps per row to write shards: keys, metadata and a short report excerpt."""
    keep = ["series_id", "content_sha256"] + [c for c in META_COLUMNS if c in todo.column_names]
    meta = todo.select(keep)
    if "report" in todo.column_names:
        excerpt = pc.utf8_slice_codeunits(todo.column("report").cast(pa.string()), 0, REPORT_EXCERPT_CHARS)
    else:
        excerpt = pa.nulls(todo.num_rows, pa.string())
    return meta.append_column("report_excerpt", excerpt)


def _run_pipeline(cfg: EmbedConfig, plan: Plan, model: ModelInfo, store: EmbeddingStore, schema: pa.Schema) -> dict:
    from voxsearch.common.runtime import init_ray

    ray = init_ray(cfg.ray)
    import ray.data

    resources = ray.cluster_resources()
    cpus, gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    actors = actor_plan(cfg, cpus, gpus)
    n = plan.todo.num_rows
    blocks = loader_blocks(plan.todo, cfg.with_text, rows_per_task(n, cpus, cfg.max_rows_per_task))
    log.info("embedding %d series: %d blocks, %d model actor(s) on %s%s", n, len(blocks), actors["size"],
             "GPU" if actors["num_gpus"] else "CPU", ", reading their own rows" if actors["reads_in_actor"] else "")

    context = ray.data.DataContext.get_current()
    # Ours counts series end to end; Ray Data's per-operator bars would interleave with it. Datasets copy
    # the context when created and some bars read the global one while running: off for the whole run.
    ray_bars, context.enable_progress_bars = context.enable_progress_bars, False
    try:
        ds = ray.data.from_arrow(blocks)
        encoder = {"checkpoint": _absolute(cfg.checkpoint), "with_text": cfg.with_text, "threads": actors["threads"]}
        if actors["reads_in_actor"]:
            stage, batch_format = ReadAndEncode, "pyarrow"
            encoder["preprocess"] = model.preprocess.to_dict()
        else:
            stage, batch_format = BulkEncoder, "numpy"
            ds = ds.map(load_row, fn_kwargs={"preprocess": model.preprocess.to_dict(), "threads": max(1, int(cfg.read_cpus))},
                        # Distinct resources also keep Ray Data from fusing reads into the model actors, which
                        # would leave the model idle while its actor reads files.
                        num_cpus=cfg.read_cpus, memory=cfg.read_memory)
        ds = ds.map_batches(
            stage,
            fn_constructor_kwargs=encoder,
            batch_size=cfg.batch_size,
            batch_format=batch_format,
            compute=ray.data.ActorPoolStrategy(size=actors["size"]),
            num_cpus=actors["num_cpus"],
            num_gpus=actors["num_gpus"],
        )
        batches, written = _consume(ds, cfg, plan, model, store, schema)
    finally:
        context.enable_progress_bars = ray_bars
    missing = int((~batches.seen).sum())
    if missing:
        raise EmbedError(f"the pipeline returned {n - missing} of {n} rows; rerun to embed the rest")
    return {"embedded": written["embedded"], "failed": written["failed"], "actors": actors,
            "stage_seconds": {**batches.stage_seconds, "write": written["write_seconds"]},
            "arrivals": written["arrivals"]}


def _consume(ds, cfg: EmbedConfig, plan: Plan, model: ModelInfo, store: EmbeddingStore, schema: pa.Schema):
    """The driver's loop: rows arrive as the pipeline finishes them and go to shards, whole or not at all."""
    from tqdm import tqdm

    run_id = store.run_id or new_run_id()
    dtype = np.float16 if cfg.vector_dtype == "float16" else np.float32
    batches = _Batches(_driver_meta(plan.todo), schema, model.model_id, model.preprocess.id, dtype)
    # On object storage each shard write first checks that this run still holds the folder's lease.
    embedded_writer = ShardWriter(store.root, schema, run_id, cfg.shard_rows, before_write=store.check_lease)
    error_writer = ShardWriter(store.errors_dir, ERROR_SCHEMA, run_id, cfg.shard_rows, before_write=store.check_lease)
    failed = 0
    arrivals: list[tuple[float, int]] = []  # (time, rows) of each batch: start-up and steady rate
    bar = tqdm(total=plan.todo.num_rows, unit="series", desc="embed", disable=not cfg.progress, dynamic_ncols=True)
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            ok_rows, error_rows, arrived = batches.split(batch)
            arrivals.append((perf_counter(), arrived))
            embedded_writer.add(ok_rows)
            error_writer.add(error_rows)
            failed += error_rows.num_rows
            bar.update(arrived)
            bar.set_postfix(failed=failed, refresh=False)
    finally:
        # Rows that arrived are complete: keep them even when the run stops early.
        embedded_writer.close()
        error_writer.close()
        bar.close()
    return batches, {"embedded": embedded_writer.rows_written, "failed": error_writer.rows_written,
                     "write_seconds": embedded_writer.seconds + error_writer.seconds, "arrivals": arrivals}


def _rates(arrivals: list[tuple[float, int]], start: float) -> dict:
    """Start-up seconds (until the first rows came back) and the steady rate after them."""
    if not arrivals:
        return {}
    first, first_rows = arrivals[0]
    rates = {"startup_seconds": first - start}
    later = sum(rows for _, rows in arrivals[1:])
    if later and arrivals[-1][0] > first:
        rates["steady_series_per_s"] = later / (arrivals[-1][0] - first)
    return rates


def run_embedding(cfg: EmbedConfig) -> EmbedSummary:
    """Embed every catalog row not yet embedded for this model and preprocessing; then build/update the index."""
    start = perf_counter()
    model = resolve_model(cfg.checkpoint)
    store = EmbeddingStore(cfg.out)
    with store.locked():
        store.bind(
            model.model_id,
            model.preprocess.id,
            fixed={"vector_dtype": cfg.vector_dtype, "with_text": cfg.with_text},
            info={"preprocess": model.preprocess.to_dict(), "dim": model.dim, "checkpoint": str(_absolute(cfg.checkpoint))},
        )
        if store.remove_temp_files():
            log.info("removed temp files of an interrupted run in %s", store.root)
        catalog = load_catalog(cfg.catalog)
        plan = plan_rows(catalog, store.state(), cfg.retry_failed, cfg.limit)
        if plan.superseded:
            log.info("%d series changed since they were embedded: redoing them", len(plan.superseded))
            store.mark_superseded(plan.superseded)
        store.remove_ids(plan.superseded + plan.retried)
        result = {"embedded": 0, "failed": 0, "stage_seconds": {}, "arrivals": []}
        if plan.todo.num_rows:
            schema = embedding_schema(catalog.schema, model.dim, model.dim if cfg.with_text else None, cfg.vector_dtype)
            result = _run_pipeline(cfg, plan, model, store, schema)
        index_info = None
        if cfg.index is not None:
            from voxsearch.embed.index_sync import sync_index

            index_info = sync_index(cfg.index, store, model.model_id)
    summary = EmbedSummary(
        embedded=result["embedded"],
        skipped=plan.skipped,
        failed=result["failed"],
        seconds=perf_counter() - start,
        model_id=model.model_id,
        preprocess_id=model.preprocess.id,
        superseded=len(plan.superseded),
        stage_seconds=result["stage_seconds"],
        actors=result.get("actors", {}),
        index=index_info,
        **_rates(result["arrivals"], start),
    )
    log.info("embed summary: %s", summary.to_dict())
    return summary
