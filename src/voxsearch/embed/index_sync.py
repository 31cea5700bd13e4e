"""Bring a vector index in line with an embedding folder: build it, or add what it lacks."""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from voxsearch.common.storage import ObjectPath, location, read_parquet
from voxsearch.embed.config import EmbedError
from voxsearch.embed.shards import EmbeddingStore
from voxsearch.index.embeddings import split_embedding_table

log = logging.getLogger(__name__)


def _rows_for(store: EmbeddingStore, wanted: set[str] | None) -> pa.Table | None:
    """Embedding rows of these ids (all rows when None), reading only the shards that hold them."""
    parts = []
    for path in store.embedding_files():
        if wanted is not None:
            ids = read_parquet(path, columns=["id"]).column("id")
            mask = pc.is_in(ids, value_set=pa.array(sorted(wanted), pa.string()))
            if not pc.any(mask).as_py():
                continue
            parts.append(read_parquet(path).filter(mask))
        else:
            parts.append(read_parquet(path))
    if not parts:
        return None
    return pa.concat_tables(parts, promote_options="default")


def sync_index(index_dir: Path | ObjectPath, store: EmbeddingStore, model_id: str, index_config=None) -> dict:
    """Build `index_dir` from every embedding row, or update it: add ids it lacks, replace re-embedded ids,
    delete ids whose new content failed. Works from the folder's state, so a run killed between writing
    shards and saving the index is repaired by the next run; goes through update_index, so rows another
    writer (the server's /embed) saved meanwhile stay."""
    from voxsearch.index import IndexConfig, VectorIndex, update_index

    index_dir = location(index_dir)
    root = store.root
    source = {"embeddings": str(root.resolve() if isinstance(root, Path) else root), "model_id": model_id}

    def build() -> VectorIndex | None:
        table = _rows_for(store, None)
        if table is None:
            return None
        ids, matrix, metadata = split_embedding_table(table, store.root)
        return VectorIndex.build(ids, matrix, metadata, index_config or IndexConfig(), source=source)

    def catch_up(index: VectorIndex) -> tuple[int, int]:
        indexed_model = index.manifest.get("source", {}).get("model_id")
        if indexed_model not in (None, model_id):
            raise EmbedError(f"index {index_dir} holds vectors of model {indexed_model}, not {model_id}; use a new --index")
        embedded = set()
        for path in store.embedding_files():
            embedded.update(read_parquet(path, columns=["id"]).column("id").to_pylist())
        superseded = store.superseded()
        wanted = (embedded - set(index.ids())) | (superseded & embedded)
        deleted = index.delete(sorted(superseded - embedded))
        added = 0
        if wanted:
            ids, matrix, metadata = split_embedding_table(_rows_for(store, wanted), store.root)
            if matrix.shape[1] != index.dim:
                raise EmbedError(f"index {index_dir} has dimension {index.dim}, the embeddings have {matrix.shape[1]}")
            added = index.add(ids, matrix, metadata, replace=True)
        if (added or deleted) and index.needs_compact:
            index.compact()  # the last row gone leaves an empty index that still loads and searches
        return added, deleted

    done = update_index(index_dir, catch_up, create=build)
    if done.index is None:
        return {"path": str(index_dir), "action": "unchanged", "added": 0, "deleted": 0, "size": 0}
    store.clear_superseded()
    if done.action == "created":
        return {"path": str(index_dir), "action": "built", "added": len(done.index), "deleted": 0,
                "size": len(done.index)}
    added, deleted = done.result
    action = "updated" if added or deleted else "unchanged"
    log.info("index %s %s: +%d -%d, %d vectors", index_dir, action, added, deleted, len(done.index))
    return {"path": str(index_dir), "action": action, "added": added, "deleted": deleted, "size": len(done.index)}
