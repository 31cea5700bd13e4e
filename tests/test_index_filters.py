"""Metadata filters return the true top-k among passing rows (checked against brute force) on exact,
IVF and HNSW indexes, through both the exact small-set path and the faiss ID-selector path."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pytest

from index_testlib import clustered_vectors
from voxsearch.index import IndexConfig, VectorIndex

N, D = 3000, 32


@pytest.fixture(scope="module")
def corpus():
    rng = np.random.default_rng(7)
    data = clustered_vectors(N, D, n_clusters=30, seed=2, noise=0.6)
    start = dt.date(2018, 1, 1)
    metadata = pa.table({
        "modality": pa.array(rng.choice(["CT", "MR"], N, p=[0.7, 0.3])),
        "body_part": pa.array([None if r < 0.1 else b for r, b in zip(rng.random(N), rng.choice(["head", "chest", "abdomen"], N))]),
        "split": pa.array(rng.choice(["train", "validation", "test"], N)),
        "study_date": pa.array([start + dt.timedelta(days=int(x)) for x in rng.integers(0, 2000, N)], pa.date32()),
        "abnormal": pa.array(rng.random(N) < 0.2),
    })
    return [f"s{i}" for i in range(N)], data, metadata


def truth(data, metadata, queries, k, keep) -> list[list[str]]:
    rows = np.flatnonzero(keep)
    scores = queries @ data[rows].T
    return [[f"s{rows[j]}" for j in np.argsort(-s, kind="stable")[:k]] for s in scores]


def passing(metadata, modality=None, dates=None, abnormal=None, body_parts=None):
    keep = np.ones(metadata.num_rows, bool)
    if modality:
        keep &= np.asarray(metadata.column("modality").to_pylist()) == modality
    if dates:
        col = metadata.column("study_date").to_pylist()
        keep &= np.array([dates[0] <= d <= dates[1] for d in col])
    if abnormal is not None:
        keep &= np.asarray(metadata.column("abnormal").to_pylist()) == abnormal
    if body_parts:
        keep &= np.isin(np.asarray(metadata.column("body_part").to_pylist(), dtype=object), body_parts)
    return keep


FILTERS = [
    ({"modality": "CT"}, dict(modality="CT")),
    ({"modality": "MR", "abnormal": True}, dict(modality="MR", abnormal=True)),
    ({"study_date": {"min": "2019-01-01", "max": "2019-06-30"}, "body_part": ["head", "chest"]},
     dict(dates=(dt.date(2019, 1, 1), dt.date(2019, 6, 30)), body_parts=["head", "chest"])),
]


_BUILT: dict = {}


@pytest.mark.parametrize("factory,exact_max", [("Flat", 50_000), ("Flat", 0), ("IVF32,Flat", 50_000), ("HNSW16,Flat", 50_000)])
@pytest.mark.parametrize("filters,spec", FILTERS)
def test_filtered_top_k_is_the_true_top_k(corpus, factory, exact_max, filters, spec):
    ids, data, metadata = corpus
    key = (factory, exact_max)
    if key not in _BUILT:  # one build per index type, shared by the filter cases
        _BUILT[key] = VectorIndex.build(ids, data, metadata, IndexConfig(factory=factory, exact_filter_max=exact_max,
                                                                         recall_queries=0))
    index = _BUILT[key]
    queries = data[::150]
    hits = index.search(queries, k=10, filters=filters)
    expected = truth(data, metadata, queries, 10, passing(metadata, **spec))
    assert [[h.id for h in row] for row in hits] == expected
    for row in hits:
        for h in row:
            if "modality" in filters:
                assert h.metadata["modality"] == filters["modality"]


def test_selector_path_on_ivf_keeps_k_results_and_recall(corpus):
    """With the exact shortcut disabled, IVF searches through an ID selector, probing more lists when
    few rows pass; it must still return k passing rows and near-exact neighbours."""
    ids, data, metadata = corpus
    index = VectorIndex.build(ids, data, metadata, IndexConfig(factory="IVF32,Flat", nprobe=2, exact_filter_max=0,
                                                               recall_queries=0))
    queries = data[::100]
    filters = {"modality": "MR", "abnormal": True}  # about 6% of rows pass
    hits = index.search(queries, k=10, filters=filters)
    expected = truth(data, metadata, queries, 10, passing(metadata, modality="MR", abnormal=True))
    assert all(len(row) == 10 for row in hits)
    assert all(h.metadata["modality"] == "MR" and h.metadata["abnormal"] for row in hits for h in row)
    recall = np.mean([len({h.id for h in row} & set(t)) / 10 for row, t in zip(hits, expected)])
    assert recall >= 0.9


def test_filter_errors_and_edge_cases(corpus):
    ids, data, metadata = corpus
    index = VectorIndex.build(ids, data, metadata, IndexConfig(factory="Flat", recall_queries=0))
    with pytest.raises(ValueError, match="unknown filter column 'organ'"):
        index.search(data[:1], filters={"organ": "liver"})
    with pytest.raises(ValueError, match="cannot compare 'yesterday'"):
        index.search(data[:1], filters={"study_date": {"min": "yesterday"}})
    with pytest.raises(ValueError, match="range"):
        index.search(data[:1], filters={"study_date": {"from": "2019-01-01"}})
    assert index.search(data[:2], filters={"modality": "PET"}) == [[], []]
    nulls = index.search(data[:1], k=5, filters={"body_part": None})[0]
    assert len(nulls) == 5 and all(h.metadata["body_part"] is None for h in nulls)
    bare = VectorIndex.build(ids[:50], data[:50], config=IndexConfig(factory="Flat", recall_queries=0))
    with pytest.raises(ValueError, match="stores no metadata"):
        bare.search(data[:1], filters={"modality": "CT"})
