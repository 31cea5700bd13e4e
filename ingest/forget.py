"""Remove series from a catalog when their source deleted them (the PACS sync's deletions).

Each shard holding such rows is rewritten without them, temp file then rename, so a crash leaves every
shard either old or new; the caller recomputes what is still to remove, which makes a retry complete it.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from voxsearch.ingest.catalog import ROWS_DIR, _shards


def forget_series(catalog: Path, series_ids) -> int:
    """Drop every row (all versions) of these series; returns the number of rows removed."""
    wanted = pa.array(sorted(set(series_ids)), pa.string())
    if not len(wanted):
        return 0
    removed = 0
    for shard in _shards(Path(catalog) / ROWS_DIR):
        table = pq.read_table(shard)
        drop = pc.is_in(table.column("series_id"), value_set=wanted)
        n = pc.sum(drop).as_py() or 0
        if not n:
            continue
        kept = table.filter(pc.invert(drop))
        if kept.num_rows:
            tmp = shard.with_name(f".{shard.name}.tmp-{uuid.uuid4().hex[:8]}")
            pq.write_table(kept, tmp, compression="zstd")
            os.replace(tmp, shard)
        else:
            shard.unlink()
        removed += n
    return removed
