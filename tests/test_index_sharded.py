"""ShardedIndex: shards by id hash in Ray actors give the same top-k as one index over the same rows."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from index_testlib import clustered_vectors
from voxsearch.index import IndexConfig, ShardedIndex, VectorIndex, shard_of


def top(hits):
    return [[(h.id, round(h.score, 5)) for h in row] for row in hits]


def test_sharded_equals_one_index(ray_session, tmp_path):
    n = 1500
    data = clustered_vectors(n, 16, n_clusters=15, seed=6, noise=0.6)
    ids = [f"series-{i}" for i in range(n)]
    metadata = pa.table({"modality": ["CT" if i % 3 else "MR" for i in range(n)], "n": list(range(n))})
    config = IndexConfig(factory="Flat", recall_queries=20)
    single = VectorIndex.build(ids, data, metadata, config)
    queries = data[::60] + 0.05
    with ShardedIndex.build(ids, data, metadata, num_shards=3, config=config, timeout=300) as sharded:
        shard_counts = [m["count"] for m in sharded.shard_manifests()]
        assert sum(shard_counts) == n and min(shard_counts) > n / 6  # the hash spreads rows over all shards
        assert top(sharded.search(queries, k=10)) == top(single.search(queries, k=10))
        filters = {"modality": "MR", "n": {"min": 100, "max": 1200}}
        assert top(sharded.search(queries, k=7, filters=filters)) == top(single.search(queries, k=7, filters=filters))

        gone = ids[::4]
        assert sharded.delete(gone) == single.delete(gone) == len(gone)
        extra = clustered_vectors(30, 16, n_clusters=15, seed=6, noise=0.6)
        new_ids = [f"late-{i}" for i in range(30)]
        assert sharded.add(new_ids, extra) == single.add(new_ids, extra) == 30
        assert len(sharded) == len(single)
        assert top(sharded.search(queries, k=10)) == top(single.search(queries, k=10))
        sharded.save(tmp_path / "sharded")
        assert sharded.manifest["recall_at_k"] == 1.0
    with ShardedIndex.load(tmp_path / "sharded", timeout=300) as reloaded:
        assert reloaded.num_shards == 3
        assert top(reloaded.search(queries, k=10)) == top(single.search(queries, k=10))
        assert sorted(reloaded.ids()) == sorted(single.ids())
        assert np.allclose(reloaded.vector("series-1"), single.vector("series-1"))

        # Another writer saves a new version of one shard after this load: updates go to that version.
        folder = tmp_path / "sharded"
        names = json.loads((folder / "sharded.json").read_text())["shards"]
        other = VectorIndex.load(folder / names[shard_of("interloper", 3)])
        other.add(["interloper"], extra[:1])
        other.save(folder / names[shard_of("interloper", 3)])
        assert reloaded.update(folder, "add", ["late-x"], extra[1:2]) == 1
        assert reloaded.update(folder, "delete", ["series-1"]) == 1
        assert reloaded.update(folder, "compact") == len(single) + 1
        on_disk = {i for name in names for i in VectorIndex.load(folder / name).ids()}
        assert on_disk == set(single.ids()) - {"series-1"} | {"interloper", "late-x"}
        assert on_disk == set(reloaded.ids())


def test_shard_routing_is_stable():
    assert [shard_of(f"id-{i}", 4) for i in range(6)] == [shard_of(f"id-{i}", 4) for i in range(6)]
    counts = np.bincount([shard_of(f"id-{i}", 4) for i in range(4000)], minlength=4)
    assert counts.min() > 800
    with pytest.raises(ValueError, match="num_shards"):
        ShardedIndex.build(["a"], np.ones((1, 4)), num_shards=0)
