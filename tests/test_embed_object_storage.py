"""`voxsearch embed --out s3://...`: the run lease that keeps one writer per prefix (refused while another
run renews it, taken over once stale, checked before every write, deleted at the end), the folder's
writes on objects, and a run end to end against moto's S3 server (the `bucket` fixture is in conftest.py)."""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import pyarrow as pa
import pytest
from embed_testlib import make_checkpoint

from voxsearch.common.storage import location, read_parquet
from voxsearch.embed.config import EmbedError
from voxsearch.embed.lease import RunLease
from voxsearch.embed.shards import EmbeddingStore, ShardWriter, embedding_schema

pytestmark = pytest.mark.timeout(120)


def _lease(store: EmbeddingStore) -> dict:
    # Read as the runs read it: the test S3 server's overwrites are not atomic, so a raw read during a
    # heartbeat can see half a lease; RunLease.read reads such an object again.
    return RunLease(store.lock_path, "test-reader").read()


def _write_lease(store: EmbeddingStore, run_id: str, host: str, age_s: float, **extra) -> None:
    now = time.time()
    store.lock_path.write_text(json.dumps({"run_id": run_id, "host": host, "pid": 4242, "started": now - age_s - 5,
                                           "heartbeat": now - age_s, **extra}))


def _rows(ids: list[str]) -> pa.Table:
    schema = embedding_schema(pa.schema([]), 4, None, "float32")
    return pa.Table.from_pylist([{"id": i, "vector": [float(n)] * 4, "model_id": "m", "preprocess_id": "p",
                                  "content_sha256": f"c-{i}"} for n, i in enumerate(ids)], schema=schema)


def test_second_run_is_refused_while_the_first_holds_the_lease(bucket):
    uri = f"{bucket}/emb"
    store = EmbeddingStore(uri)
    with store.locked():
        lease = _lease(store)
        assert lease["run_id"] == store.run_id and lease["host"] and lease["pid"] > 0 and lease["heartbeat"] > 0
        with pytest.raises(EmbedError) as refused:
            with EmbeddingStore(uri).locked():
                pytest.fail("a second run got the lease")
        message = str(refused.value)
        assert uri in message and "another embed run" in message
        assert f"run {store.run_id} on host {lease['host']}" in message and "last heartbeat" in message
        assert "testing-key" not in message and "testing-secret" not in message
        assert _lease(store)["run_id"] == store.run_id  # the refused run left the lease alone
    assert not store.lock_path.exists() and store.run_id is None
    with EmbeddingStore(uri).locked() as again:  # released: the next run gets in
        assert _lease(again)["run_id"] == again.run_id


def test_a_stale_lease_is_taken_over_and_a_fresh_foreign_one_refused(bucket, caplog):
    store = EmbeddingStore(f"{bucket}/emb")
    _write_lease(store, "dead-run", "gone-host", age_s=3600)
    with caplog.at_level(logging.WARNING, logger="voxsearch.embed.lease"), store.locked():
        assert _lease(store)["run_id"] == store.run_id != "dead-run"
    assert "run dead-run on host gone-host" in caplog.text and "taking over" in caplog.text
    assert not store.lock_path.exists()
    # The holder's own timeout decides: one that promised to beat every few seconds is dead after 10 s.
    _write_lease(store, "quick-run", "h1", age_s=10, timeout_s=5)
    with store.locked():
        pass
    _write_lease(store, "live-run", "h2", age_s=30)  # default timeout (10 min): alive
    with pytest.raises(EmbedError, match="run live-run on host h2"):
        with store.locked():
            pass
    store.lock_path.write_text("oldhost 123")  # not a lease (a local lock file copied there): its age counts
    with pytest.raises(EmbedError, match="another embed run"):
        with store.locked():
            pass


def test_a_run_whose_lease_was_taken_over_stops_before_writing(bucket):
    store = EmbeddingStore(f"{bucket}/emb")
    with store.locked():
        writer = ShardWriter(store.root, _rows([]).schema, store.run_id, 2, before_write=store.check_lease)
        writer.add(_rows(["a", "b"]))
        store.mark_superseded(["x"])
        assert [p.name for p in store.embedding_files()] == [f"part-{store.run_id}-00000.parquet"]
        # Another run presumed this one dead and took the folder over.
        _write_lease(store, "usurper", "other-host", age_s=0)
        with pytest.raises(EmbedError, match="taken over by run usurper on host other-host"):
            writer.add(_rows(["c", "d"]))
        for write in (lambda: store.remove_ids(["a"]), lambda: store.mark_superseded(["y"]), store.clear_superseded):
            with pytest.raises(EmbedError, match="usurper"):
                write()
        assert len(store.embedding_files()) == 1 and store.superseded() == {"x"}  # nothing more written
    assert _lease(store)["run_id"] == "usurper"  # not ours to delete
    store.lock_path.unlink()
    with store.locked():  # a lease deleted under the run stops it too
        store.lock_path.unlink()
        with pytest.raises(EmbedError, match="deleted by someone else"):
            store.check_lease()


def test_the_heartbeat_renews_the_lease_and_a_run_that_cannot_renew_stops(bucket, monkeypatch):
    store = EmbeddingStore(f"{bucket}/emb")
    with store.locked(lease_timeout=30, heartbeat=0.05):
        first = _lease(store)["heartbeat"]
        deadline = time.monotonic() + 20
        while _lease(store)["heartbeat"] == first and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _lease(store)["heartbeat"] > first and store.lease.beats >= 1
        store.check_lease()
    assert not store.lock_path.exists()

    def unreachable(self):
        raise OSError("store unreachable")

    with store.locked(lease_timeout=1.0, heartbeat=0.1), monkeypatch.context() as patch:
        patch.setattr(RunLease, "_write", unreachable)  # every renewal fails from now on
        time.sleep(1.2)
        with pytest.raises(EmbedError, match="could not renew its lease"):
            store.check_lease()


def test_object_folder_shards_are_listed_rewritten_and_deleted_like_local_ones(bucket, tmp_path):
    stores = [EmbeddingStore(tmp_path / "emb"), EmbeddingStore(f"{bucket}/emb")]
    for store in stores:
        with store.locked():
            assert store.remove_temp_files() == 0 and store.state() == {}
            writer = ShardWriter(store.root, _rows([]).schema, store.run_id, 2, before_write=store.check_lease)
            writer.add(_rows(["a", "b", "c", "d", "e"]))
            writer.close()
            assert store.remove_ids(["a", "c", "d"]) == 3  # shard 0 rewritten, shard 1 deleted
            names = [p.name for p in store.embedding_files()]
            assert names == [f"part-{store.run_id}-00000.parquet", f"part-{store.run_id}-00002.parquet"]
        assert sorted(store.state()) == ["b", "e"]
    local, remote = ([read_parquet(p) for p in s.embedding_files()] for s in stores)
    assert [t.column("id").to_pylist() for t in local] == [t.column("id").to_pylist() for t in remote]


# --- end to end, on Ray ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.getbasetemp() / "embed_checkpoint")


def _table(store: EmbeddingStore, errors: bool = False) -> pa.Table:
    """Every row of the folder's shards, listed here rather than by the store under test."""
    folder = store.errors_dir if errors else store.root
    files = sorted(location(folder).glob("part-*.parquet"))
    if not files:
        return pa.table({"id": pa.array([], pa.string())})
    return pa.concat_tables([read_parquet(f) for f in files], promote_options="default").sort_by("id")


def test_embed_to_s3_equals_local_and_a_rerun_embeds_nothing(ray_session, tiny_catalog, checkpoint, bucket, tmp_path,
                                                              capsys):
    from voxsearch.cli import main
    from voxsearch.common.runtime import RayConfig
    from voxsearch.embed import EmbedConfig, run_embedding
    from voxsearch.index import VectorIndex

    local = run_embedding(EmbedConfig(catalog=tiny_catalog, checkpoint=checkpoint, out=tmp_path / "emb", shard_rows=4,
                                      batch_size=3, progress=False, ray=RayConfig(num_cpus=2)))
    args = ["embed", "--catalog", str(tiny_catalog), "--checkpoint", str(checkpoint), "--out", f"{bucket}/emb",
            "--index", f"{bucket}/idx", "--shard-rows", "4", "--batch-size", "3", "--no-progress", "--json"]
    assert main(args) == 0, capsys.readouterr().err
    first = json.loads(capsys.readouterr().out)
    assert (first["embedded"], first["failed"]) == (local.embedded, local.failed) and first["embedded"] > 0
    remote, here = EmbeddingStore(f"{bucket}/emb"), EmbeddingStore(tmp_path / "emb")
    got, want = _table(remote), _table(here)
    assert got.column("id").to_pylist() == want.column("id").to_pylist()
    assert len(set(got.column("id").to_pylist())) == got.num_rows == local.embedded
    np.testing.assert_allclose(np.array(got.column("vector").to_pylist()), np.array(want.column("vector").to_pylist()),
                               atol=1e-5)
    assert _table(remote, errors=True).column("id").to_pylist() == _table(here, errors=True).column("id").to_pylist()
    assert remote.manifest()["model_id"] == here.manifest()["model_id"] and not remote.lock_path.exists()
    assert len(VectorIndex.load(f"{bucket}/idx")) == local.embedded
    objects = [(p.name, size) for p, size, _ in location(f"{bucket}/emb").rglob_stats()]

    assert main(args) == 0, capsys.readouterr().err  # exactly once: nothing is embedded again
    again = json.loads(capsys.readouterr().out)
    assert (again["embedded"], again["failed"], again["skipped"]) == (0, 0, local.embedded + local.failed)
    assert again["index"]["action"] == "unchanged"
    assert [(p.name, size) for p, size, _ in location(f"{bucket}/emb").rglob_stats()] == objects
