"""Read embedding vectors from any source: Parquet shards (the embed stage's output, or anyone's with
an id column and a fixed-size-list vector column) or a .npy matrix with an ids file, in local folders
or under s3:// / gs:// prefixes."""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from voxsearch.common.storage import ObjectPath, location, read_parquet
from voxsearch.index.config import IndexConfig

log = logging.getLogger(__name__)

# Columns of an embedding shard that describe the embedding itself rather than the scan.
_NOT_METADATA = {"id", "vector", "text_vector"}


@dataclass
class Embeddings:
    ids: list[str]
    vectors: np.ndarray
    metadata: pa.Table | None
    source: dict


def _is_data(relative_parts: Sequence[str], suffixes: Sequence[str]) -> bool:
    # As pyarrow's dataset discovery: names starting with "_" or "." (error tables, temp files) are not
    # data, so an embed output folder reads as its embedding rows alone.
    return Path(relative_parts[-1]).suffix in suffixes and not any(part.startswith(("_", ".")) for part in relative_parts)


def _files(paths: Iterable[str | Path | ObjectPath], suffixes: Sequence[str]) -> list[Path | ObjectPath]:
    found: list[Path | ObjectPath] = []
    for raw in paths:
        path = location(raw)
        if isinstance(path, ObjectPath):
            if path.is_file():
                found.append(path)
            elif objects := path.rglob_files():
                found.extend(o for o in objects if _is_data(o.path[len(path.path) + 1:].split("/"), suffixes))
            else:
                raise FileNotFoundError(f"embedding input not found: {path}")
        elif path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if _is_data(p.relative_to(path).parts, suffixes)))
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"embedding input not found: {path}")
    if not found:
        raise ValueError(f"no {'/'.join(suffixes)} files under {[str(p) for p in paths]}")
    return found


def _vectors_of(column: pa.ChunkedArray, path, name: str) -> np.ndarray:
    typ = column.type
    if not (pa.types.is_fixed_size_list(typ) or pa.types.is_list(typ) or pa.types.is_large_list(typ)):
        raise ValueError(f"{path}: column {name!r} is {typ}, expected a list of floats")
    array = column.combine_chunks()
    if array.null_count:
        raise ValueError(f"{path}: column {name!r} has {array.null_count} null vectors")
    if pa.types.is_fixed_size_list(typ):
        dim = typ.list_size
    else:
        lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False)
        if len(lengths) and (lengths != lengths[0]).any():
            raise ValueError(f"{path}: column {name!r} mixes vector lengths {sorted(set(lengths.tolist()))[:5]}")
        dim = int(lengths[0]) if len(lengths) else 0
    values = array.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return values.reshape(len(array), dim)


def split_embedding_table(table: pa.Table, origin, vector_column: str = "vector") -> tuple[list[str], np.ndarray, pa.Table]:
    """(ids, (n, d) float32 vectors, metadata columns) of a table of embedding rows; `origin` names the
    table in errors."""
    for needed in ("id", vector_column):
        if needed not in table.column_names:
            raise ValueError(f"{origin}: missing column {needed!r} (has {table.column_names})")
    ids = [str(i) for i in table.column("id").to_pylist()]
    vectors = _vectors_of(table.column(vector_column), origin, vector_column)
    metadata = table.drop_columns([c for c in table.column_names if c in _NOT_METADATA | {vector_column}])
    return ids, vectors, metadata


def read_parquet_embeddings(paths: Iterable[str | Path | ObjectPath] | str | Path | ObjectPath,
                            vector_column: str = "vector") -> Embeddings:
    """All rows of the shards; a later shard's row wins over an earlier one with the same id (re-embedded)."""
    if isinstance(paths, (str, Path, ObjectPath)):
        paths = [paths]
    files = _files(paths, (".parquet",))
    ids, vectors, metas = [], [], []
    for path in tqdm(files, desc="read embeddings", unit="shard", disable=len(files) < 4, leave=False):
        try:
            table = read_parquet(path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise ValueError(f"{path}: not a readable Parquet file ({exc})") from exc
        shard_ids, shard_vectors, shard_metadata = split_embedding_table(table, path, vector_column)
        ids.extend(shard_ids)
        vectors.append(shard_vectors)
        metas.append(shard_metadata)
    dims = {v.shape[1] for v in vectors if len(v)}
    if len(dims) > 1:
        raise ValueError(f"embedding shards mix vector dimensions {sorted(dims)}: {[str(f) for f in files]}")
    matrix = np.concatenate(vectors) if vectors else np.zeros((0, 0), np.float32)
    metadata = pa.concat_tables(metas, promote_options="permissive") if metas else None
    source = {"files": [str(f) for f in files], "vector_column": vector_column}
    if metadata is not None and "model_id" in metadata.column_names:
        models = sorted({m for m in metadata.column("model_id").to_pylist() if m is not None})
        if len(models) > 1:
            raise ValueError(f"embedding shards come from different models {models}: their vectors are not comparable; "
                             "index one model at a time")
        source["model_id"] = models[0] if models else None
    if metadata is not None and "preprocess_id" in metadata.column_names:
        source["preprocess_id"] = sorted({m for m in metadata.column("preprocess_id").to_pylist() if m is not None})
    ids_arr = np.asarray(ids, dtype=object)
    # Keep the last occurrence of each id: later shards hold re-embedded rows.
    _, last_rev = np.unique(ids_arr[::-1], return_index=True)
    keep = np.sort(len(ids_arr) - 1 - last_rev)
    if len(keep) < len(ids_arr):
        log.warning("%d duplicate ids across embedding shards: keeping the last row of each", len(ids_arr) - len(keep))
    if metadata is not None and not metadata.column_names:
        metadata = None
    return Embeddings(ids_arr[keep].tolist(), matrix[keep],
                      metadata.take(pa.array(keep)) if metadata is not None else None, source)


def read_npy_embeddings(path: str | Path | ObjectPath, ids_path: str | Path | ObjectPath | None = None) -> Embeddings:
    """A (n, d) .npy matrix; ids from a text file (one per line) or '<file stem>:<row>'."""
    path = location(path)
    try:
        # An object cannot be memory-mapped: it is read whole.
        matrix = (np.load(io.BytesIO(path.read_bytes())) if isinstance(path, ObjectPath)
                  else np.load(path, mmap_mode="r"))
    except (ValueError, OSError) as exc:
        raise ValueError(f"{path}: not a readable .npy array ({exc})") from exc
    if matrix.ndim != 2:
        raise ValueError(f"{path}: expected a 2-d (n, d) array, got shape {matrix.shape}")
    if ids_path is not None:
        ids = [line.strip() for line in location(ids_path).read_text().splitlines() if line.strip()]
        if len(ids) != len(matrix):
            raise ValueError(f"{ids_path}: {len(ids)} ids for {len(matrix)} vectors in {path}")
    else:
        ids = [f"{Path(path.name).stem}:{i}" for i in range(len(matrix))]
    return Embeddings(ids, np.asarray(matrix, dtype=np.float32), None, {"files": [str(path)]})


def read_embeddings(paths: Sequence[str | Path | ObjectPath] | str | Path | ObjectPath, vector_column: str = "vector",
                    ids_path: str | Path | ObjectPath | None = None) -> Embeddings:
    """Parquet shards (files or folders, local or s3:// / gs://) or a single .npy file."""
    if isinstance(paths, (str, Path, ObjectPath)):
        paths = [paths]
    paths = [location(p) for p in paths]
    if len(paths) == 1 and paths[0].name.endswith(".npy"):
        return read_npy_embeddings(paths[0], ids_path)
    if any(p.name.endswith(".npy") for p in paths):
        raise ValueError("give either one .npy file or Parquet shards, not a mix")
    return read_parquet_embeddings(paths, vector_column)


def build_from_embeddings(path_or_paths, config: IndexConfig | None = None, vector_column: str = "vector",
                          ids_path: str | Path | None = None):
    """A VectorIndex over embedding shards (their metadata columns become filterable)."""
    from voxsearch.index.vector_index import VectorIndex

    emb = read_embeddings(path_or_paths, vector_column, ids_path)
    return VectorIndex.build(emb.ids, emb.vectors, emb.metadata, config or IndexConfig(), source=emb.source)
