"""Sharded indexes on s3:// (moto's S3 server on 127.0.0.1, the `bucket` fixture in conftest.py): each shard
an index prefix of its own, loaded by its actor from the bucket, sharded.json published last."""

from __future__ import annotations

import json
import os
import re
import time

import numpy as np
import pyarrow as pa
import pytest

from index_testlib import clustered_vectors
from test_object_storage import _embedding_table
from voxsearch.common.storage import location
from voxsearch.index import IndexConfig, IndexCorruptError, IndexFormatError, ShardedIndex, VectorIndex, versions

pytestmark = pytest.mark.timeout(180)

SHARDS = ["shard-00000-of-00002", "shard-00001-of-00002"]


@pytest.fixture
def shard_actors(ray_session, bucket, monkeypatch):
    """Shard actors that reach moto. The session's Ray started its workers before `bucket` set the AWS_*
    variables, so the actors are given them (on a cluster each node has its own). Actors that a command
    leaves running (`index search` does) are ended after the test."""
    env = {name: os.environ[name] for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                               "AWS_REGION")}
    spawned = []
    spawn = ShardedIndex._spawn

    def with_env(num_shards, actor_options=None):
        actors = spawn(num_shards, {"num_cpus": 0.25, "runtime_env": {"env_vars": env}, **(actor_options or {})})
        spawned.extend(actors)
        return actors

    monkeypatch.setattr(ShardedIndex, "_spawn", staticmethod(with_env))
    yield spawned
    for actor in spawned:
        try:
            ray_session.kill(actor)
        except Exception:
            pass


def _data(n: int = 400):
    vectors = clustered_vectors(n, 16, n_clusters=8, seed=3, noise=0.6)
    ids = [f"s{i}" for i in range(n)]
    metadata = pa.table({"modality": ["CT" if i % 3 else "MR" for i in range(n)], "n": list(range(n))})
    return ids, vectors, metadata


def _build(ids, vectors, metadata=None) -> ShardedIndex:
    return ShardedIndex.build(ids, vectors, metadata, num_shards=2, config=IndexConfig(factory="Flat", recall_queries=10),
                              timeout=120)


def _assert_same_hits(got, want):
    assert [[h.id for h in row] for row in got] == [[h.id for h in row] for row in want]
    np.testing.assert_allclose([[h.score for h in row] for row in got], [[h.score for h in row] for row in want],
                               rtol=0, atol=1e-5)


def test_sharded_index_on_s3_searches_like_the_local_copy(shard_actors, bucket, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where Path("s3://b/x") would have made a folder "s3:"
    ids, vectors, metadata = _data()
    prefix = f"{bucket}/indexes/sharded"
    with _build(ids, vectors, metadata) as built:
        built.save(tmp_path / "local")
        assert built.save(prefix) == location(prefix)
    assert sorted(p.name for p in location(prefix).iterdir()) == SHARDS + ["sharded.json"]
    assert json.loads(location(f"{prefix}/sharded.json").read_text())["shards"] == SHARDS
    for name in SHARDS:  # each shard an object-storage index: CURRENT and one version prefix
        shard = location(f"{prefix}/{name}")
        assert sorted(p.name for p in shard.iterdir()) == ["CURRENT", versions.current_version(shard)]
    assert sorted(os.listdir(tmp_path)) == ["local"]

    queries = vectors[::40] + 0.05
    filters = {"modality": "MR", "n": {"min": 50, "max": 350}}
    with ShardedIndex.load(tmp_path / "local", timeout=120) as local, ShardedIndex.load(prefix, timeout=120) as remote:
        assert remote.num_shards == 2 and len(remote) == len(local) == len(ids)
        _assert_same_hits(remote.search(queries, k=10), local.search(queries, k=10))
        _assert_same_hits(remote.search(queries, k=5, filters=filters), local.search(queries, k=5, filters=filters))
        assert [h.metadata for h in remote.search(queries[:1], k=3)[0]] == \
            [h.metadata for h in local.search(queries[:1], k=3)[0]]

        # Updates go through the bucket, shard by shard.
        extra = clustered_vectors(2, 16, n_clusters=8, seed=4, noise=0.6)
        assert remote.update(prefix, "add", ["late-0", "late-1"], extra) == 2
        assert remote.update(prefix, "delete", ["s1", "s2"]) == 2
    on_s3 = {i for name in SHARDS for i in VectorIndex.load(f"{prefix}/{name}").ids()}
    assert on_s3 == set(ids) - {"s1", "s2"} | {"late-0", "late-1"}


def test_sharded_json_is_published_after_every_shard(shard_actors, bucket):
    ids, vectors, _ = _data(200)
    prefix = f"{bucket}/half"
    location(f"{prefix}/{SHARDS[1]}/stray-object").write_text("not an index")  # the second shard cannot save
    with _build(ids, vectors) as built:
        with pytest.raises(IndexFormatError, match=re.escape(f"refusing to save an index into {prefix}/{SHARDS[1]}")):
            built.save(prefix)
        deadline = time.monotonic() + 60  # the save raised on the first failure; the other shard's goes on
        while not versions.is_index_dir(f"{prefix}/{SHARDS[0]}") and time.monotonic() < deadline:
            time.sleep(0.2)
    assert versions.is_index_dir(f"{prefix}/{SHARDS[0]}")  # one shard got there ...
    assert not location(f"{prefix}/sharded.json").exists()  # ... but no reader sees a sharded index
    with pytest.raises(IndexFormatError, match=re.escape(f"{prefix} is not a sharded voxsearch index")):
        ShardedIndex.load(prefix, timeout=120)


def test_missing_or_corrupt_shard_object_names_its_uri(shard_actors, bucket, ray_session):
    ids, vectors, _ = _data(200)
    prefix = f"{bucket}/damaged"
    with _build(ids, vectors) as built:
        built.save(prefix)
    shard = location(f"{prefix}/{SHARDS[1]}")
    obj = shard / versions.current_version(shard) / "ids.parquet"
    data = bytearray(obj.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum can tell
    obj.write_bytes(bytes(data))
    with pytest.raises(IndexCorruptError, match=re.escape(f"{obj.uri} is corrupt")):
        ShardedIndex.load(prefix, timeout=120)
    # A failed load ends its actors. ray.kill only asks: a call sent at once can still reach an actor that
    # has not died yet (it then fails on the shard it never loaded), so ask again until the actor is gone.
    deadline = time.monotonic() + 60
    with pytest.raises(ray_session.exceptions.RayActorError):
        while time.monotonic() < deadline:
            try:
                ray_session.get(shard_actors[-1].ids.remote(), timeout=60)
            except ray_session.exceptions.RayTaskError:  # not dead yet; RayActorError is not one of these
                pass
            time.sleep(0.5)

    obj.unlink()
    with pytest.raises(IndexCorruptError, match=re.escape(f"object {obj.uri} listed in the manifest is missing")):
        ShardedIndex.load(prefix, timeout=120)
    (shard / "CURRENT").unlink()
    with pytest.raises(IndexFormatError, match=re.escape(f"no index at {shard.uri}")):
        ShardedIndex.load(prefix, timeout=120)
    location(f"{prefix}/sharded.json").unlink()
    with pytest.raises(IndexFormatError, match=re.escape(f"{prefix} is not a sharded voxsearch index")):
        ShardedIndex.load(prefix, timeout=120)


def test_cli_builds_searches_and_deletes_in_a_sharded_index_on_s3(shard_actors, bucket, tmp_path, capsys,
                                                                  monkeypatch):
    from voxsearch.cli import main
    from voxsearch.embed.shards import ShardWriter
    from voxsearch.index import read_embeddings

    monkeypatch.chdir(tmp_path)
    table = _embedding_table([f"e{i}" for i in range(40)], 3)
    writer = ShardWriter(location(f"{bucket}/emb"), table.schema, "r1", shard_rows=16)
    writer.add(table)
    writer.close()
    out = f"{bucket}/sharded"
    assert main(["index", "build", f"{bucket}/emb", "--out", out, "--shards", "2", "--factory", "Flat"]) == 0
    assert "built 2 shards (40 vectors" in capsys.readouterr().out
    assert sorted(p.name for p in location(out).iterdir()) == SHARDS + ["sharded.json"]

    assert main(["index", "search", out, "--id", "e4", "-k", "5", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out.splitlines()[-1])
    emb = read_embeddings(f"{bucket}/emb")
    single = VectorIndex.build(emb.ids, emb.vectors, config=IndexConfig(factory="Flat"))
    want = single.search(emb.vectors[emb.ids.index("e4")], k=5)[0]
    assert [h["id"] for h in answer["hits"]] == [h.id for h in want]
    np.testing.assert_allclose([h["score"] for h in answer["hits"]], [h.score for h in want], atol=1e-5)

    assert main(["index", "delete", out, "e0", "e1"]) == 0
    assert "deleted 2 of 2 ids; 38 remain" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())
