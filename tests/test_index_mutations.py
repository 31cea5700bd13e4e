"""Incremental add / delete by id without rebuilding, tombstones on HNSW, and compact."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from index_testlib import clustered_vectors
from voxsearch.index import IndexConfig, VectorIndex


@pytest.fixture(scope="module")
def data():
    return clustered_vectors(2000, 24, n_clusters=20, seed=4, noise=0.6)


def meta(n, start=0):
    return pa.table({"modality": ["CT" if (i % 3) else "MR" for i in range(start, start + n)]})


@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat", "HNSW16,Flat"])
def test_add_and_delete_without_rebuild(data, factory):
    ids = [f"a{i}" for i in range(1500)]
    index = VectorIndex.build(ids, data[:1500], meta(1500), IndexConfig(factory=factory, nprobe=16, recall_queries=50))
    faiss_before = index._index
    assert index.add([f"b{i}" for i in range(500)], data[1500:], meta(500, 1500)) == 500
    assert index._index is faiss_before  # same faiss object: nothing was rebuilt
    assert len(index) == 2000 and index.search(data[1700], k=1)[0][0].id == "b200"
    assert index.search(data[1700], k=1)[0][0].metadata == {"modality": "CT" if 1700 % 3 else "MR"}

    gone = [f"a{i}" for i in range(0, 1500, 2)] + ["never-indexed"]
    assert index.delete(gone) == 750
    assert len(index) == 1250 and "a0" not in index and "a1" in index
    hits = index.search(data[:40], k=10)
    assert not {h.id for row in hits for h in row} & set(gone)
    # Filters see deletions too, and the remaining rows are the exact answer on Flat.
    filtered = index.search(data[:5], k=10, filters={"modality": "MR"})
    assert all(h.metadata["modality"] == "MR" and h.id not in gone for row in filtered for h in row)
    if factory == "HNSW16,Flat":
        assert index.manifest["tombstones"] == 750  # HNSW cannot remove: tombstones until compact
    else:
        assert index.manifest["tombstones"] == 0
    assert index.needs_compact

    index.compact()
    m = index.manifest
    assert m["count"] == m["rows"] == 1250 and m["tombstones"] == 0 and m["deleted"] == 0
    assert m["recall"]["rows_at_measurement"] == 1250
    assert sorted(index.ids()) == sorted(set(ids + [f"b{i}" for i in range(500)]) - set(gone))
    assert index.search(data[1], k=1)[0][0].id == "a1"
    assert index.search(data[1], k=1)[0][0].metadata["modality"] == "CT"


def test_duplicate_add_needs_replace(data):
    index = VectorIndex.build(["x", "y"], data[:2], config=IndexConfig(factory="Flat"))
    with pytest.raises(ValueError, match=r"already indexed: \['x'\]"):
        index.add(["x"], data[5:6])
    index.add(["x"], data[5:6], replace=True)
    assert len(index) == 2 and index.search(data[5], k=1)[0][0].id == "x"
    with pytest.raises(ValueError, match="dimension 3"):
        index.add(["z"], np.ones((1, 3)))


def test_add_metadata_columns_are_unified(data):
    index = VectorIndex.build(["x", "y"], data[:2], pa.table({"modality": ["CT", "MR"]}), IndexConfig(factory="Flat"))
    index.add(["z"], data[2:3])  # no metadata: nulls
    index.add(["w"], data[3:4], pa.table({"modality": ["CT"], "split": ["test"]}))
    assert index.search(data[2], k=1)[0][0].metadata == {"modality": None, "split": None}
    assert index.search(data[3], k=1)[0][0].metadata == {"modality": "CT", "split": "test"}
    assert [h.id for h in index.search(data[3], k=4, filters={"modality": "CT"})[0]] == ["w", "x"]
