"""VectorIndex: factory choice, search correctness against brute force, recall in the manifest,
per-query parameters and input validation."""

from __future__ import annotations

import faiss
import numpy as np
import pyarrow as pa
import pytest

from index_testlib import clustered_vectors
from voxsearch.index import IndexConfig, VectorIndex, choose_factory


def brute_force(data: np.ndarray, queries: np.ndarray, k: int, rows: np.ndarray | None = None) -> list[list[int]]:
    rows = np.arange(len(data)) if rows is None else rows
    unit = data[rows] / np.linalg.norm(data[rows], axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    scores = q @ unit.T
    return [rows[np.argsort(-s, kind="stable")[:k]].tolist() for s in scores]


@pytest.fixture(scope="module")
def data():
    return clustered_vectors(3000, 32, n_clusters=30, seed=1, noise=0.6)


def ids_of(n):
    return [f"series-{i}" for i in range(n)]


def test_flat_search_matches_brute_force_and_is_cosine(data):
    index = VectorIndex.build(ids_of(len(data)), data * 7.0, config=IndexConfig(factory="Flat"))
    queries = data[:20] * 3.0 + 0.01
    hits = index.search(queries, k=5)
    expected = brute_force(data, queries, 5)
    assert [[int(h.id.split("-")[1]) for h in row] for row in hits] == expected
    # Scores are cosine similarities: independent of the vectors' scale, and sorted best first.
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    assert hits[0][0].score == pytest.approx(float(q[0] @ (data[expected[0][0]] / np.linalg.norm(data[expected[0][0]]))), abs=1e-5)
    assert all(row[i].score >= row[i + 1].score for row in hits for i in range(4))
    assert index.manifest["recall"]["recall_at_k"] == 1.0 and index.manifest["factory"] == "Flat"


def test_choose_factory_follows_size_and_memory_budget():
    small = choose_factory(5_000, 768, IndexConfig())
    assert small.factory == "Flat"
    roomy = choose_factory(1_000_000, 768, IndexConfig(memory_budget_bytes=8 * 2**30))
    assert roomy.factory == "IVF2048,Flat" and not roomy.rerank
    tight = choose_factory(1_000_000, 768, IndexConfig(memory_budget_bytes=1 * 2**30))
    assert tight.factory == "IVF2048,SQ8"
    tiny = choose_factory(1_000_000, 768, IndexConfig(memory_budget_bytes=400 * 2**20))
    assert tiny.factory.startswith("IVF2048,PQ") and tiny.rerank and tiny.estimated_bytes <= 400 * 2**20
    # At 100M the lists are many: the coarse quantizer becomes an HNSW graph (build time), codes SQ8.
    assert choose_factory(100_000_000, 768, IndexConfig(memory_budget_bytes=96 * 2**30)).factory == "IVF16384_HNSW32,SQ8"
    with pytest.raises(ValueError, match="memory_budget_bytes"):
        choose_factory(100_000_000, 768, IndexConfig(memory_budget_bytes=2**30))
    forced = choose_factory(10, 768, IndexConfig(factory="HNSW32,Flat"))
    assert forced.factory == "HNSW32,Flat" and "forced" in forced.reason


def test_auto_ivf_records_a_true_recall_and_tuned_nprobe(data):
    index = VectorIndex.build(ids_of(len(data)), data, config=IndexConfig(flat_threshold=1000, target_recall=0.95))
    m = index.manifest
    assert m["factory"].startswith("IVF") and m["factory_auto"]
    nprobe = m["search_defaults"]["nprobe"]
    # Recompute recall on fresh queries with brute force: the manifest's estimate must be honest.
    queries = clustered_vectors(200, 32, n_clusters=30, seed=1, noise=0.6)  # same centres, new points
    hits = index.search(queries, k=10)
    truth = brute_force(data, queries, 10)
    measured = np.mean([len({int(h.id.split("-")[1]) for h in row} & set(t)) / 10 for row, t in zip(hits, truth)])
    assert m["recall"]["recall_at_k"] >= 0.95 and m["recall"]["reached_target"]
    assert measured >= 0.9
    assert abs(measured - m["recall"]["recall_at_k"]) < 0.08
    # The tuning curve is monotone in nprobe and stops at the first value reaching the target.
    assert m["recall"]["curve"][-1]["nprobe"] == nprobe


def test_nprobe_per_query_changes_the_search(data):
    index = VectorIndex.build(ids_of(len(data)), data, config=IndexConfig(factory="IVF64,Flat", nprobe=1))
    queries = data[::100]
    truth = brute_force(data, queries, 10)

    def recall(hits):
        return np.mean([len({int(h.id.split("-")[1]) for h in row} & set(t)) / 10 for row, t in zip(hits, truth)])

    assert recall(index.search(queries, k=10, params={"nprobe": 64})) == 1.0
    assert recall(index.search(queries, k=10)) < 1.0  # the default nprobe=1 misses neighbours in other lists
    with pytest.raises(ValueError, match="unknown search parameter"):
        index.search(queries, params={"n_probe": 3})


def test_hnsw_ef_search_is_tuned_and_overridable(data):
    index = VectorIndex.build(ids_of(len(data)), data, config=IndexConfig(factory="HNSW16,Flat", target_recall=0.99))
    m = index.manifest
    assert "efSearch" in m["search_defaults"] and m["recall"]["recall_at_k"] >= 0.95
    hits = index.search(data[:3], k=4, params={"efSearch": 200})
    assert [row[0].id for row in hits] == ids_of(3)


def test_pq_is_reranked_with_exact_vectors(data):
    plain = VectorIndex.build(ids_of(len(data)), data, config=IndexConfig(factory="IVF16,PQ4x4", rerank=False, nprobe=16))
    reranked = VectorIndex.build(ids_of(len(data)), data, config=IndexConfig(factory="IVF16,PQ4x4", nprobe=16))
    assert reranked.manifest["rerank"] and not plain.manifest["rerank"]
    assert reranked.manifest["recall"]["recall_at_k"] > plain.manifest["recall"]["recall_at_k"] + 0.2
    # Re-ranked scores are exact cosines.
    hit = reranked.search(data[5], k=5, params={"rerank_factor": 40})[0][0]
    assert hit.id == "series-5" and hit.score == pytest.approx(1.0, abs=1e-5)


def test_training_uses_a_random_sample_not_the_first_rows(monkeypatch):
    # Rows sorted by cluster: training on the first rows would only see the first clusters.
    data = clustered_vectors(24_000, 16, n_clusters=40, seed=3, noise=0.5)
    order = np.argsort(data[:, 0])
    data = data[order]
    seen = {}
    original = faiss.IndexIVFFlat.train

    def spy(self, x):
        seen["x"] = np.array(x)
        return original(self, x)

    monkeypatch.setattr(faiss.IndexIVFFlat, "train", spy)
    index = VectorIndex.build(ids_of(len(data)), data, config=IndexConfig(factory="IVF64,Flat", recall_queries=0))
    trained = seen["x"]
    assert len(trained) == index.manifest["train_rows"] < len(data)
    # A prefix would cover only the lowest values of the sort key; a random sample spans all of it.
    assert trained[:, 0].max() > np.quantile(data[:, 0], 0.95)
    assert not np.allclose(trained[:100], data[:100])


def test_bad_inputs_get_clear_errors(data):
    index = VectorIndex.build(ids_of(100), data[:100], config=IndexConfig(factory="Flat"))
    with pytest.raises(ValueError, match="dimension 8, the index has dimension 32"):
        index.search(np.ones((1, 8), np.float32))
    bad = data[:3].copy()
    bad[1, 0] = np.nan
    with pytest.raises(ValueError, match=r"row\(s\) \[1\] contain NaN"):
        VectorIndex.build(["a", "b", "c"], bad)
    with pytest.raises(ValueError, match="duplicate ids"):
        VectorIndex.build(["a", "a"], data[:2])
    with pytest.raises(ValueError, match="all-zero"):
        VectorIndex.build(["a", "b"], np.zeros((2, 32), np.float32))
    with pytest.raises(ValueError, match="invalid faiss factory string 'IVFbogus'"):
        VectorIndex.build(ids_of(100), data[:100], config=IndexConfig(factory="IVFbogus"))
    with pytest.raises(ValueError, match="metadata has 5 rows for 100 vectors"):
        VectorIndex.build(ids_of(100), data[:100], metadata=pa.table({"x": list(range(5))}))
    with pytest.raises(ValueError, match="k must be >= 1"):
        index.search(data[:1], k=0)


def test_batch_queries_and_k_larger_than_the_index(data):
    index = VectorIndex.build(ids_of(7), data[:7], config=IndexConfig(factory="Flat"))
    hits = index.search(data[:4], k=20)
    assert len(hits) == 4 and all(len(row) == 7 for row in hits)
    assert [row[0].id for row in hits] == ids_of(4)
    assert index.vector("series-2") == pytest.approx(data[2] / np.linalg.norm(data[2]), abs=1e-6)
