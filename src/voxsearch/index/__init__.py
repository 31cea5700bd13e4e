"""voxsearch.index: faiss vector indexes over embedding ids, with metadata filters, add/delete,
crash-safe persistence, measured recall and Ray-sharded search.

The index knows vectors, ids and metadata columns, never models.
"""

from voxsearch.index.config import IndexConfig
from voxsearch.index.embeddings import Embeddings, build_from_embeddings, read_embeddings
from voxsearch.index.errors import (
    IndexConflictError,
    IndexCorruptError,
    IndexFormatError,
    IndexLockTimeout,
    ReadOnlyIndexError,
)
from voxsearch.index.factory import FactoryChoice, choose_factory
from voxsearch.index.sharded import ShardedIndex, shard_of
from voxsearch.index.vector_index import Hit, IndexUpdate, VectorIndex, update_index

__all__ = [
    "IndexConfig", "VectorIndex", "Hit", "ShardedIndex", "shard_of", "build_from_embeddings", "read_embeddings",
    "Embeddings", "IndexCorruptError", "IndexFormatError", "ReadOnlyIndexError", "FactoryChoice", "choose_factory",
    "IndexConflictError", "IndexLockTimeout", "IndexUpdate", "update_index",
]
