"""The embedding folder: Parquet shards written atomically, the state a rerun resumes from, a run lock.

Layout of an output folder EMB:
    part-<run>-<seq>.parquet          embedding rows ("Embedding shards" schema)
    _errors/part-<run>-<seq>.parquet  one row per catalog row that could not be embedded
    _embed.json                       model id and preprocessing every row was made with
    _superseded.json                  ids re-embedded since the index last saw them
    .lock                             flock-ed by the one run writing here (its host and pid inside);
                                      on object storage the run's lease (lease.py)

Names starting with "_" or "." are skipped by pyarrow's dataset discovery, so `pq.read_table(EMB)`,
`voxsearch.index.read_embeddings(EMB)` and `voxsearch.index.build_from_embeddings(EMB)` read exactly the
embedding rows.

Invariant (what makes reruns exactly-once): at any moment each id has at most one row, embedding or
error, over all shards. Shards appear whole (temp file + rename) or not at all, rows are only removed by
rewriting a shard the same way, and a run only writes ids that no shard holds.

The folder may be an s3:// or gs:// prefix. Shards are then whole objects (one PUT from memory: there is
no temp name, nothing for remove_temp_files to clear), a shard rewrite replaces its object, and the JSON
state files are objects too. The invariant rests on one writer per folder. Locally the flock gives that,
and the kernel drops it when its holder dies; an object store has no such lock, so there `locked` holds a
run lease instead (lease.py: a heartbeat-renewed .lock object, refused while another run renews it, taken
over once stale, checked again before every write). The lease is read-then-write, not atomic: two runs
started within one round trip of each other can both proceed, so on object storage the rule stays one
embed run per prefix at a time; the lease catches a second run started later and a dead run's leftover.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter
from typing import Callable

import pyarrow as pa

from voxsearch.common.storage import ObjectPath, location, read_parquet, write_json, write_parquet
from voxsearch.embed.config import EmbedError
from voxsearch.embed.lease import LEASE_TIMEOUT_S, RunLease, new_run_id

log = logging.getLogger(__name__)

FORMAT = "voxsearch-embeddings"
VERSION = 1
KEY_COLUMNS = ("id", "content_sha256", "model_id", "preprocess_id")
META_COLUMNS = ("study_id", "modality", "body_part", "split", "study_date", "abnormal")
# Used where the catalog lacks a metadata column, so every shard of a folder has one schema.
META_DEFAULT_TYPES = {"study_date": pa.date32(), "abnormal": pa.bool_()}
REPORT_EXCERPT_CHARS = 300

ERROR_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("content_sha256", pa.string()),
        ("model_id", pa.string()),
        ("preprocess_id", pa.string()),
        ("stage", pa.string()),  # "load" (read + preprocess) or "model"
        ("error", pa.string()),
        ("failed_at", pa.timestamp("s", tz="UTC")),
    ]
)


def embedding_schema(catalog_schema: pa.Schema, dim: int, text_dim: int | None, vector_dtype: str) -> pa.Schema:
    value_type = pa.float16() if vector_dtype == "float16" else pa.float32()
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("vector", pa.list_(value_type, dim), nullable=False),
        pa.field("model_id", pa.string()),
        pa.field("preprocess_id", pa.string()),
        pa.field("content_sha256", pa.string()),
    ]
    for name in META_COLUMNS:
        if name in catalog_schema.names:
            fields.append(pa.field(name, catalog_schema.field(name).type))
        else:
            fields.append(pa.field(name, META_DEFAULT_TYPES.get(name, pa.string())))
    fields.append(pa.field("report_excerpt", pa.string()))
    if text_dim:
        fields.append(pa.field("text_vector", pa.list_(value_type, text_dim)))
    return pa.schema(fields)


@dataclass
class StoredRow:
    content_sha256: str
    kind: str  # "embedded" | "failed"


class ShardWriter:
    """Buffers rows and writes them as shards of `shard_rows` rows; `close` writes the remainder."""

    def __init__(self, directory: Path | ObjectPath, schema: pa.Schema, run_id: str, shard_rows: int,
                 before_write: Callable[[], None] | None = None):
        self.directory = directory
        # Called before each shard is written; raises to stop the run (EmbeddingStore.check_lease).
        self.before_write = before_write
        self.schema = schema
        self.run_id = run_id
        self.shard_rows = shard_rows
        self.files: list[Path | ObjectPath] = []
        self.rows_written = 0
        self.seconds = 0.0
        self._buffer: list[pa.Table] = []
        self._buffered = 0

    def add(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self._buffer.append(table.cast(self.schema) if table.schema != self.schema else table)
        self._buffered += table.num_rows
        while self._buffered >= self.shard_rows:
            self._flush(self.shard_rows)

    def close(self) -> None:
        if self._buffered:
            self._flush(self._buffered)

    def _flush(self, n: int) -> None:
        start = perf_counter()
        pending = pa.concat_tables(self._buffer)
        shard, rest = pending.slice(0, n), pending.slice(n)
        path = self.directory / f"part-{self.run_id}-{len(self.files):05d}.parquet"
        if self.before_write is not None:
            self.before_write()
        if isinstance(self.directory, Path):
            self.directory.mkdir(parents=True, exist_ok=True)
        # Its hidden temp file ".<name>.*.tmp" is what remove_temp_files clears after a crash (an object
        # is written whole, with no temp name).
        write_parquet(path, shard)
        self.files.append(path)
        self.rows_written += shard.num_rows
        self._buffer = [rest] if rest.num_rows else []
        self._buffered = rest.num_rows
        self.seconds += perf_counter() - start


class EmbeddingStore:
    def __init__(self, root: Path | ObjectPath | str):
        self.root = location(root)
        self.errors_dir = self.root / "_errors"
        self.manifest_path = self.root / "_embed.json"
        self.superseded_path = self.root / "_superseded.json"
        self.lock_path = self.root / ".lock"
        self.run_id: str | None = None  # set while `locked`
        self.lease: RunLease | None = None  # held while `locked` on object storage

    # -- run lock ------------------------------------------------------------------------------------
    @contextmanager
    def locked(self, lease_timeout: float = LEASE_TIMEOUT_S, heartbeat: float | None = None):
        """One writer per folder, held for the run's life. Locally an flock on .lock: the kernel drops it
        when its process dies, so a killed run's lock needs no takeover and two runs can never both hold
        it. On object storage a run lease (lease.py; `lease_timeout` and `heartbeat` seconds), which is
        not atomic: see the module docstring. Sets `run_id`, the name this run's shards carry."""
        if isinstance(self.root, ObjectPath):
            lease = RunLease(self.lock_path, new_run_id(), lease_timeout, heartbeat)
            lease.acquire(self.root)
            self.lease, self.run_id = lease, lease.run_id
            try:
                yield self
            finally:
                self.lease, self.run_id = None, None
                lease.release()
            return
        self.root.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                host, _, pid = self._lock_owner().partition(" ")
                raise EmbedError(f"{self.root} is being written by another embed run (host {host or '?'}, "
                                 f"pid {pid or '?'})") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.lock_path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # a run released (unlinked) the file between our open and flock: lock the new one
        try:
            left = self._lock_owner()
            if left:  # a released lock file is unlinked: this one's run died holding it
                log.warning("%s: the run that held it (%s) is gone; taking over", self.lock_path, left)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{socket.gethostname()} {os.getpid()}".encode(), 0)
            self.run_id = new_run_id()
            yield self
        finally:
            self.run_id = None
            self.lock_path.unlink(missing_ok=True)  # before the unlock: a waiter then sees a new inode
            os.close(fd)

    def check_lease(self) -> None:
        """Before each write: on object storage, raise EmbedError unless this run still holds its lease
        (another run may have taken it over, presuming this one dead). Locally, and outside `locked`,
        nothing to check: the flock cannot be taken from a live holder."""
        if self.lease is not None:
            self.lease.check()

    def _lock_owner(self) -> str:
        try:
            return self.lock_path.read_text().strip()
        except FileNotFoundError:
            return ""

    def remove_temp_files(self) -> int:
        """Temp files of a killed run (only safe while holding the lock). Objects have none: each is
        written with one PUT, which leaves nothing when cut short."""
        if isinstance(self.root, ObjectPath):
            return 0
        removed = 0
        for folder in (self.root, self.errors_dir):
            if folder.is_dir():
                for tmp in folder.glob(".*.tmp"):
                    tmp.unlink(missing_ok=True)
                    removed += 1
        return removed

    # -- manifest ------------------------------------------------------------------------------------
    def manifest(self) -> dict | None:
        if not self.manifest_path.exists():
            return None
        return json.loads(self.manifest_path.read_text())

    def bind(self, model_id: str, preprocess_id: str, fixed: dict, info: dict) -> None:
        """A folder holds vectors of one model, one preprocessing and one row layout (`fixed`): mixing
        them would make an index built from it meaningless or its shards unreadable as one table."""
        wanted = {"model_id": model_id, "preprocess_id": preprocess_id, **fixed}
        current = self.manifest()
        if current is None:
            if self.embedding_files() or self.error_files():
                raise EmbedError(f"{self.root} holds Parquet shards but no {self.manifest_path.name}: not an embed folder")
            self.check_lease()
            write_json(self.manifest_path, {"format": FORMAT, "version": VERSION, **wanted, **info}, sort_keys=True)
            return
        if current.get("format") != FORMAT:
            raise EmbedError(f"{self.manifest_path} is not a {FORMAT} manifest")
        differ = {k: (current.get(k), v) for k, v in wanted.items() if current.get(k) != v}
        if differ:
            what = ", ".join(f"{k} {old!r} (this run: {new!r})" for k, (old, new) in differ.items())
            raise EmbedError(f"{self.root} was written with {what}. Write to a new --out folder.")

    # -- shards --------------------------------------------------------------------------------------
    @staticmethod
    def _shards(folder: Path | ObjectPath) -> list[Path | ObjectPath]:
        if isinstance(folder, ObjectPath):
            # A listing, not is_dir: a prefix is a "directory" to some stores only where a marker names
            # it, and a shard missed here would be embedded twice. An absent prefix lists nothing.
            return sorted(folder.glob("part-*.parquet"))
        return sorted(folder.glob("part-*.parquet")) if folder.is_dir() else []

    def embedding_files(self) -> list[Path | ObjectPath]:
        return self._shards(self.root)

    def error_files(self) -> list[Path | ObjectPath]:
        return self._shards(self.errors_dir)

    def state(self) -> dict[str, StoredRow]:
        """id -> what is stored for it. Reads only the two key columns of each shard."""
        stored: dict[str, StoredRow] = {}
        for kind, files in (("embedded", self.embedding_files()), ("failed", self.error_files())):
            for path in files:
                try:
                    table = read_parquet(path, columns=["id", "content_sha256"])
                except Exception as e:  # a shard we cannot read must stop the run, not be overwritten
                    raise EmbedError(f"cannot read embedding shard {path}: {e}") from e
                for id_, sha in zip(table.column("id").to_pylist(), table.column("content_sha256").to_pylist()):
                    if id_ in stored:
                        raise EmbedError(f"{self.root} holds two rows for one series (in {path}); the folder was edited by hand")
                    stored[id_] = StoredRow(sha, kind)
        return stored

    def remove_ids(self, ids) -> int:
        """Drop rows of these ids from every shard, each shard rewritten atomically (or deleted if emptied)."""
        from voxsearch.ingest.forget import drop_rows

        # pyarrow's default compression, as ShardWriter writes them; on object storage each rewrite or
        # delete waits on the lease check.
        return drop_rows(self.embedding_files() + self.error_files(), "id", ids, compression="snappy",
                         before_write=self.check_lease)

    # -- ids the index has not caught up with ---------------------------------------------------------
    def superseded(self) -> set[str]:
        if not self.superseded_path.exists():
            return set()
        return set(json.loads(self.superseded_path.read_text()))

    def mark_superseded(self, ids) -> None:
        """Recorded before old rows are dropped, so an index updated by a later run still deletes them."""
        ids = set(ids) | self.superseded()
        if ids:
            self.check_lease()
            write_json(self.superseded_path, sorted(ids), sort_keys=True)

    def clear_superseded(self) -> None:
        self.check_lease()
        self.superseded_path.unlink(missing_ok=True)
