"""Which catalog rows a run must embed, given what the output folder already holds."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from voxsearch.embed.config import EmbedError
from voxsearch.embed.shards import StoredRow

REQUIRED_COLUMNS = ("series_id", "content_sha256", "source_path")
# Catalog columns the read tasks never need: keep them out of the Ray objects.
NOT_FOR_LOADING = ("findings", "report")


@dataclass
class Plan:
    todo: pa.Table  # catalog rows to embed, in catalog order
    skipped: int  # already embedded (or failed, without retry) for the same content
    superseded: list[str] = field(default_factory=list)  # stored for older content: redo
    retried: list[str] = field(default_factory=list)  # failed before, redone on request
    deferred: int = 0  # left for a later run by `limit`


def load_catalog(path: Path) -> pa.Table:
    from voxsearch.ingest import read_catalog

    try:
        table = read_catalog(path)
    except EmbedError:
        raise
    except Exception as e:
        raise EmbedError(f"cannot read catalog {path}: {e}") from e
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise EmbedError(f"catalog {path} lacks columns {missing}")
    ids = table.column("series_id")
    if ids.null_count or len(pc.unique(ids)) != table.num_rows:
        raise EmbedError(f"catalog {path} has empty or repeated series_id values")
    return table


def plan_rows(catalog: pa.Table, stored: dict[str, StoredRow], retry_failed: bool = False, limit: int | None = None) -> Plan:
    """Keyed by (series_id, content_sha256): same content already stored is skipped, changed content redone."""
    keep: list[int] = []
    skipped = 0
    superseded: list[str] = []
    retried: list[str] = []
    for i, (id_, sha) in enumerate(zip(catalog.column("series_id").to_pylist(), catalog.column("content_sha256").to_pylist())):
        row = stored.get(id_)
        if row is None:
            keep.append(i)
        elif row.content_sha256 != sha:
            superseded.append(id_)
            keep.append(i)
        elif row.kind == "failed" and retry_failed:
            retried.append(id_)
            keep.append(i)
        else:
            skipped += 1
    deferred = 0
    if limit is not None and len(keep) > limit:
        deferred = len(keep) - limit
        keep = keep[:limit]
        chosen = set(catalog.column("series_id").take(pa.array(keep, pa.int64())).to_pylist())
        superseded = [i for i in superseded if i in chosen]
        retried = [i for i in retried if i in chosen]
    todo = catalog.take(pa.array(keep, pa.int64()))
    return Plan(todo=todo, skipped=skipped, superseded=superseded, retried=retried, deferred=deferred)


def rows_per_task(n_rows: int, cluster_cpus: float, max_rows: int) -> int:
    """About four read tasks per CPU: small runs still use every CPU, big runs keep the task count sane."""
    return max(1, min(max_rows, math.ceil(n_rows / max(1.0, 4 * cluster_cpus))))


def loader_blocks(todo: pa.Table, with_text: bool, rows_per_block: int) -> list[pa.Table]:
    """The slices handed to Ray Data: one read task each, carrying `row_index` back to the driver."""
    drop = [c for c in NOT_FOR_LOADING if c in todo.column_names and not (c == "report" and with_text)]
    table = todo.drop_columns(drop).append_column("row_index", pa.array(range(todo.num_rows), pa.int64()))
    return [table.slice(start, rows_per_block) for start in range(0, table.num_rows, rows_per_block)]
