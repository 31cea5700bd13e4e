"""`run_ingest`: archive -> catalog, reads and checks spread over Ray Data actors.

The driver discovers work items, streams them through an actor pool (one ItemProcessor per
actor, so MONAI/pydicom load once per worker), and writes Parquet shards as results arrive.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from voxsearch.common.runtime import RayConfig, init_ray, init_ray_while
from voxsearch.common.storage import ObjectPath, location
from voxsearch.ingest.catalog import CatalogWriter, read_all_rows
from voxsearch.ingest.checks import DEFAULT_MAX_VOXELS
from voxsearch.ingest.deid import IdentifierSeal, load_or_create_salt
from voxsearch.ingest.discover import discover, keep_columns
from voxsearch.ingest.preprocess import PreprocessConfig
from voxsearch.ingest.worker import ItemProcessor

# Inputs per Ray Data block at most (rows of a block reach the catalog together when it finishes).
ITEMS_PER_BLOCK = 8

log = logging.getLogger(__name__)


@dataclass
class IngestConfig:
    archive: Path | ObjectPath  # or an s3:// / gs:// prefix of NIfTI, .npy and DICOM-zip objects
    out: Path | ObjectPath  # an s3:// / gs:// catalog needs `salt` or $VOXSEARCH_SALT
    manifest: Path | None = None  # default: ARCHIVE/manifest.csv or .parquet if present
    engine: str = "ray"  # "ray" (Ray Data actor pool) or "local" (this process; debugging, baseline)
    workers: int | None = None  # actors; None = all CPUs of the Ray cluster
    ray_address: str | None = None
    salt: str | None = None  # None: $VOXSEARCH_SALT, else a per-catalog secret in OUT/.salt
    max_voxels: int = DEFAULT_MAX_VOXELS
    # Every volume is run through this pipeline once so unusable ones fail here, not at embed time.
    check_preprocess: PreprocessConfig | None = field(default_factory=lambda: PreprocessConfig(spatial_size=(32, 64, 64)))
    shard_rows: int = 1000
    progress: bool = True
    # Only these discovered inputs (files or series folders) are read; the caller knows the rest is
    # unchanged (a PACS mirror knows what it fetched), which spares re-reading a whole archive to hash it.
    only: tuple[Path, ...] | None = None
    # Manifest columns copied into the catalog besides the known ones (scrubbed; never identifiers).
    keep_columns: tuple[str, ...] = ()

    def __post_init__(self):
        self.archive, self.out = location(self.archive), location(self.out)
        self.keep_columns = tuple(sorted(keep_columns(self.keep_columns)))
        if self.only is not None:
            self.only = tuple(Path(p).resolve() for p in self.only)
        if self.engine not in ("ray", "local"):
            raise ValueError(f"engine must be 'ray' or 'local', got {self.engine!r}")


@dataclass
class IngestSummary:
    added: int = 0
    skipped: int = 0  # already in the catalog with the same file bytes (or a duplicate in this run)
    failed: int = 0
    warnings: int = 0
    discovered: int = 0
    seconds: float = 0.0
    catalog: Path | ObjectPath | None = None
    run_id: str = ""
    failures_by_stage: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {**self.__dict__, "catalog": str(self.catalog)}


class _RayWorker:
    """Ray Data actor: batches of JSON-encoded items in, JSON-encoded result lists out."""

    def __init__(self, ctx: dict):
        import warnings

        warnings.filterwarnings("ignore", message=".*NvImgCodecPydicomReader.*")
        self.process = ItemProcessor(**ctx)

    def __call__(self, batch: dict) -> dict:
        out = [json.dumps(self.process(json.loads(s)), default=_json_default) for s in batch["item"]]
        return {"results": out}


def _json_default(value):
    if isinstance(value, (dt.datetime, dt.date)):
        return {"__date__": value.isoformat(), "__dt__": isinstance(value, dt.datetime)}
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _json_hook(obj):
    if "__date__" in obj:
        return dt.datetime.fromisoformat(obj["__date__"]) if obj["__dt__"] else dt.date.fromisoformat(obj["__date__"])
    return obj


def _results_ray(items: list[dict], ctx: dict, cfg: IngestConfig):
    ray = init_ray(RayConfig(address=cfg.ray_address))
    data_ctx = ray.data.DataContext.get_current()
    data_ctx.enable_progress_bars = False  # ours counts studies, not blocks
    cpus = int(ray.cluster_resources().get("CPU", 1))
    size = max(1, min(cfg.workers or cpus, len(items)))
    # Ray Data schedules and ships each block on its own: a block per input cost more than preprocessing
    # a small series. A few inputs per block, and several blocks per actor so that none waits idle.
    blocks = min(len(items), max(size * 4, math.ceil(len(items) / ITEMS_PER_BLOCK)))
    ds = ray.data.from_items([{"item": json.dumps(i)} for i in items], override_num_blocks=blocks)
    ds = ds.map_batches(_RayWorker, fn_constructor_kwargs={"ctx": ctx}, batch_size=1, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=size), num_cpus=1)
    for row in ds.iter_rows():
        yield json.loads(row["results"], object_hook=_json_hook)


def _results_local(items: list[dict], ctx: dict):
    process = ItemProcessor(**ctx)
    for item in items:
        yield json.loads(json.dumps(process(item), default=_json_default), object_hook=_json_hook)


def run_ingest(cfg: IngestConfig) -> IngestSummary:
    from tqdm import tqdm

    start = time.perf_counter()
    out = cfg.out
    if isinstance(out, Path):
        out = out.resolve()
        out.mkdir(parents=True, exist_ok=True)
    run_id = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    salt = load_or_create_salt(out, cfg.salt)
    writer = CatalogWriter(out, run_id, shard_rows=cfg.shard_rows)
    summary = IngestSummary(catalog=out, run_id=run_id)

    def find():
        return discover(cfg.archive, salt, manifest=cfg.manifest, keep=frozenset(cfg.keep_columns))

    if cfg.engine == "ray" and (cfg.only is None or cfg.only):
        found = init_ray_while(find, RayConfig(address=cfg.ray_address))
    else:
        found = find()
    if cfg.only is not None:
        wanted = {str(p) for p in cfg.only}
        found.items = [item for item in found.items if item["source_path"] in wanted]
        found.errors = [err for err in found.errors if err["path"] in wanted]
    summary.discovered = len(found.items)
    seal = IdentifierSeal()
    items = [{**{k: v for k, v in item.items() if k != "identifiers"},
              "sealed_identifiers": seal.seal(item.get("identifiers"))} for item in found.items]
    failures: Counter = Counter()
    failed_paths: set = set()
    for err in found.errors:
        writer.add_error(err["path"], err["stage"], err["reason"])
        failed_paths.add(err["path"])
        failures[err["stage"]] += 1
    existing = read_all_rows(out)
    known = set(existing.column("file_sha256").to_pylist()) if existing.num_rows else set()
    ctx = {"salt": salt, "known_hashes": sorted(known), "max_voxels": cfg.max_voxels, "run_id": run_id,
           "preprocess": cfg.check_preprocess.to_dict() if cfg.check_preprocess else None,
           "identifier_key": seal.key}
    log.info("ingest %s: %d inputs, %d already catalogued series", cfg.archive, len(items), len(known))
    seen = set(known)
    results = _results_ray(items, ctx, cfg) if cfg.engine == "ray" and items else _results_local(items, ctx)
    bar = tqdm(total=len(items), desc="ingest", unit="input", disable=not cfg.progress)
    try:
        for result_list in results:
            for res in result_list:
                kind = res["kind"]
                if kind == "row":
                    digest = res["row"]["file_sha256"]
                    if digest in seen:  # the same bytes under a second path: one row only
                        summary.skipped += 1
                        continue
                    seen.add(digest)
                    writer.add_row(res["row"])
                    summary.added += 1
                elif kind == "skip":
                    summary.skipped += 1
                elif kind == "warning":
                    writer.add_error(res["path"], res["stage"], res["reason"], severity="warning")
                    summary.warnings += 1
                else:
                    writer.add_error(res["path"], res["stage"], res["reason"])
                    if res["path"] not in failed_paths:  # one input may log several bad slices
                        failed_paths.add(res["path"])
                        failures[res["stage"]] += 1
            bar.update(1)
            bar.set_postfix(added=summary.added, failed=sum(failures.values()), refresh=False)
    finally:
        bar.close()
        summary.failed = sum(failures.values())
        summary.failures_by_stage = dict(failures)
        summary.seconds = round(time.perf_counter() - start, 3)
        writer.close({k: v for k, v in summary.to_dict().items() if k not in ("catalog",)})
    log.info("ingest done: %d added, %d skipped, %d failed, %d warnings in %.1f s", summary.added, summary.skipped,
             summary.failed, summary.warnings, summary.seconds)
    return summary
