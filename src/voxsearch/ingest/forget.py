"""Remove series from a catalog when their source deleted them (the PACS sync's deletions).

Each shard holding such rows is rewritten without them, temp file then rename, so a crash leaves every
shard either old or new; the caller recomputes what is still to remove, which makes a retry complete it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from voxsearch.common.storage import location, read_parquet, write_parquet
from voxsearch.ingest.catalog import ROWS_DIR, _shards


def drop_rows(shards, column: str, ids, compression: str = "zstd",
              before_write: Callable[[], None] | None = None) -> int:
    """Rewrite each Parquet shard (a file atomically, an s3:// / gs:// object with one PUT; with
    `compression`) without the rows whose `column` is in `ids` (a shard left empty is deleted). Returns
    the number of rows removed. `before_write` runs before each rewrite or delete and may raise to stop."""
    wanted = pa.array(sorted(set(ids)), pa.string())
    if not len(wanted):
        return 0
    removed = 0
    for shard in map(location, shards):
        table = read_parquet(shard)
        drop = pc.is_in(table.column(column), value_set=wanted)
        n = pc.sum(drop).as_py() or 0
        if not n:
            continue
        kept = table.filter(pc.invert(drop))
        if before_write is not None:
            before_write()
        if kept.num_rows:
            write_parquet(shard, kept, compression=compression)
        else:
            shard.unlink()
        removed += n
    return removed


def forget_series(catalog: Path, series_ids) -> int:
    """Drop every row (all versions) of these series; returns the number of rows removed."""
    return drop_rows(_shards(Path(catalog) / ROWS_DIR), "series_id", series_ids)
