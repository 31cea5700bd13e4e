"""The catalog on disk: Parquet shards of series rows and of errors, written temp-then-rename.

Layout of a catalog folder:
  rows/part-<run>-<n>.parquet     one row per series (schema below + manifest columns named by --keep-column)
  errors/part-<run>-<n>.parquet   path, stage, reason, severity, run_id
  catalog.json                    schema version and the history of runs
A crash loses at most the shard being written; nothing half-written is ever read (readers skip
temporary names) and the next run redoes what is missing (incremental by file hash).

The folder may be an s3:// or gs:// prefix: shards and catalog.json are then each written as one whole
object (no temp names; a PUT appears whole or not at all). catalog.json is read, extended and rewritten
by `close` without a lock, here as locally: one writer per catalog at a time.

Each row carries both hashes of voxsearch.common.hashing: `file_sha256` (the source bytes; what
incremental runs skip by) and `content_sha256` (the decoded voxels and spacing). Schema 1 had only
`content_sha256`, holding the file hash: read back, such rows get it as `file_sha256` too (see _upgrade).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import pyarrow as pa
from voxsearch.common.storage import ObjectPath, location, read_parquet, write_json, write_parquet

CATALOG_SCHEMA_VERSION = 2
ROWS_DIR, ERRORS_DIR, META_FILE = "rows", "errors", "catalog.json"

SCHEMA = pa.schema([
    ("study_id", pa.string()),
    ("series_id", pa.string()),
    ("patient_key", pa.string()),
    ("source_path", pa.string()),
    ("source_format", pa.string()),
    ("source_files", pa.list_(pa.string())),
    ("file_sha256", pa.string()),
    ("content_sha256", pa.string()),
    ("modality", pa.string()),
    ("body_part", pa.string()),
    ("shape", pa.list_(pa.int32())),
    ("spacing", pa.list_(pa.float64())),
    ("orientation", pa.string()),
    ("intensity_units", pa.string()),
    ("window_center", pa.float64()),
    ("window_width", pa.float64()),
    ("report", pa.string()),
    ("split", pa.string()),
    ("findings", pa.string()),
    ("abnormal", pa.bool_()),
    ("study_date", pa.date32()),
    ("schema_version", pa.int32()),
    ("ingested_at", pa.timestamp("us", tz="UTC")),
    ("run_id", pa.string()),
])
ERRORS_SCHEMA = pa.schema([
    ("path", pa.string()),
    ("stage", pa.string()),
    ("reason", pa.string()),
    ("severity", pa.string()),  # "error": the input is not in the catalog; "warning": it is, with a gap
    ("run_id", pa.string()),
    ("at", pa.timestamp("us", tz="UTC")),
])


def parse_findings(value, series_id: str | None = None) -> list[dict]:
    """The findings of a catalog `findings` cell (JSON text or a list): its entries that name a type.
    Empty for a normal study ("[]") and for one without ground truth (null, ""); ValueError, naming the
    series, for anything but a JSON list."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return []
    where = f"series {series_id}: " if series_id is not None else ""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}findings column is not JSON ({exc})") from None
    if isinstance(value, (str, Mapping)) or not isinstance(value, Iterable):
        raise ValueError(f"{where}findings must be a JSON list, got {type(value).__name__}")
    return [dict(f) for f in value if isinstance(f, Mapping) and f.get("type")]


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def rows_table(rows: list[dict]) -> pa.Table:
    """Known columns typed by SCHEMA; kept manifest columns (--keep-column) appended as strings."""
    extras = sorted({k for r in rows for k in r} - set(SCHEMA.names))
    fields = list(SCHEMA) + [pa.field(k, pa.string()) for k in extras]
    return pa.Table.from_pylist(rows, schema=pa.schema(fields, metadata={"voxsearch_schema_version": str(CATALOG_SCHEMA_VERSION)}))


def _write_atomic(table: pa.Table, folder: Path | ObjectPath, run_id: str, seq: int) -> Path | ObjectPath:
    if isinstance(folder, Path):
        folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"part-{run_id}-{seq:05d}.parquet"
    write_parquet(final, table, compression="zstd")
    return final


class CatalogWriter:
    """Buffers rows and errors; flushes a shard every `shard_rows` rows."""

    def __init__(self, root: Path | ObjectPath | str, run_id: str, shard_rows: int = 1000):
        self.root, self.run_id, self.shard_rows = location(root), run_id, shard_rows
        self.rows: list[dict] = []
        self.errors: list[dict] = []
        self.seq = 0
        self.written_rows = 0
        self.written_errors = 0

    def add_row(self, row: dict) -> None:
        self.rows.append(row)
        if len(self.rows) >= self.shard_rows:
            self.flush()

    def add_error(self, path: str, stage: str, reason: str, severity: str = "error") -> None:
        self.errors.append({"path": path, "stage": stage, "reason": reason, "severity": severity,
                            "run_id": self.run_id, "at": now_utc()})

    def flush(self) -> None:
        if self.rows:
            _write_atomic(rows_table(self.rows), self.root / ROWS_DIR, self.run_id, self.seq)
            self.written_rows += len(self.rows)
            self.rows = []
            self.seq += 1
        if self.errors:
            _write_atomic(pa.Table.from_pylist(self.errors, schema=ERRORS_SCHEMA), self.root / ERRORS_DIR, self.run_id, self.seq)
            self.written_errors += len(self.errors)
            self.errors = []
            self.seq += 1

    def close(self, summary: dict) -> None:
        self.flush()
        meta = read_meta(self.root)
        meta["schema_version"] = CATALOG_SCHEMA_VERSION
        meta.setdefault("runs", []).append({"run_id": self.run_id, **summary})
        write_json(self.root / META_FILE, meta, indent=1, default=str)


def read_meta(root: Path | ObjectPath | str) -> dict:
    path = location(root) / META_FILE
    if not path.is_file():
        return {"schema_version": CATALOG_SCHEMA_VERSION, "runs": []}
    meta = json.loads(path.read_text())
    if int(meta.get("schema_version", 0)) > CATALOG_SCHEMA_VERSION:
        raise ValueError(f"{root}: catalog schema version {meta['schema_version']} is newer than this code "
                         f"({CATALOG_SCHEMA_VERSION}); upgrade voxsearch")
    return meta


def _shards(folder: Path | ObjectPath) -> list[Path | ObjectPath]:
    return sorted(p for p in folder.glob("part-*.parquet") if not p.name.startswith("."))


def _concat(tables: list[pa.Table], schema: pa.Schema) -> pa.Table:
    if not tables:
        return schema.empty_table()
    return pa.concat_tables(tables, promote_options="default")


def _upgrade(rows: pa.Table) -> pa.Table:
    """Rows of a schema 1 shard: their content_sha256 is a hash of the file bytes, so it becomes their
    file_sha256 as well, and incremental runs keep skipping them. It stays their content_sha256: embedding
    folders are keyed by it, and being a hash of other bytes it never equals a voxel hash, so it matches
    no other scan."""
    if "file_sha256" in rows.column_names or "content_sha256" not in rows.column_names:
        return rows
    return rows.add_column(rows.schema.get_field_index("content_sha256"), "file_sha256", rows.column("content_sha256"))


def read_all_rows(path) -> pa.Table:
    """Every row ever written (older versions of changed series included)."""
    path = location(path)
    if path.is_file():
        return _upgrade(read_parquet(path))
    return _concat([_upgrade(read_parquet(p)) for p in _shards(path / ROWS_DIR)], SCHEMA)


def read_catalog(path) -> pa.Table:
    """The catalog: all shards, newest row per series_id, sorted by series_id."""
    table = read_all_rows(path)
    if table.num_rows == 0:
        return table
    import pyarrow.compute as pc

    order = pc.sort_indices(table, sort_keys=[("series_id", "ascending"), ("ingested_at", "descending")])
    table = table.take(order)
    ids = table.column("series_id").to_pylist()
    keep = [i for i, s in enumerate(ids) if i == 0 or s != ids[i - 1]]
    return table.take(pa.array(keep, type=pa.int64()))


def read_errors(path, all_runs: bool = False) -> pa.Table:
    """Errors and warnings of the latest run (or of every run)."""
    table = _concat([read_parquet(p) for p in _shards(location(path) / ERRORS_DIR)], ERRORS_SCHEMA)
    if all_runs or table.num_rows == 0:
        return table
    runs = read_meta(path).get("runs", [])
    latest = runs[-1]["run_id"] if runs else max(table.column("run_id").to_pylist())
    import pyarrow.compute as pc

    return table.filter(pc.equal(table.column("run_id"), latest))
