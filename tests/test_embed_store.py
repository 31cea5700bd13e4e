"""The embedding folder on its own (no Ray): atomic shards, resume state, lock, planning."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from voxsearch.embed.config import EmbedConfig, EmbedError
from voxsearch.embed.reader import loader_blocks, plan_rows, rows_per_task
from voxsearch.embed.runner import _fixed_list, actor_plan
from voxsearch.embed.shards import ERROR_SCHEMA, EmbeddingStore, ShardWriter, StoredRow, embedding_schema


def _catalog(n: int) -> pa.Table:
    return pa.table({
        "series_id": [f"s{i}" for i in range(n)],
        "content_sha256": [f"h{i}" for i in range(n)],
        "source_path": [f"/data/{i}.nii.gz" for i in range(n)],
        "study_id": [f"st{i}" for i in range(n)],
        "modality": ["CT"] * n,
        "report": [f"report {i}" for i in range(n)],
        "findings": ["[]"] * n,
    })


def _rows(schema: pa.Schema, ids: list[str], sha: str = "h") -> pa.Table:
    n = len(ids)
    cols = {
        "id": pa.array(ids, pa.string()),
        "vector": _fixed_list(np.ones((n, 4), np.float32), np.float32),
        "model_id": pa.array(["m"] * n),
        "preprocess_id": pa.array(["p"] * n),
        "content_sha256": pa.array([sha + i[1:] for i in ids]),
    }
    for f in schema:
        if f.name not in cols:
            cols[f.name] = pa.nulls(n, f.type)
    return pa.table({f.name: cols[f.name] for f in schema}).cast(schema)


def test_shard_writer_writes_whole_shards_and_the_remainder(tmp_path):
    schema = embedding_schema(_catalog(1).schema, 4, None, "float32")
    writer = ShardWriter(tmp_path, schema, "run", shard_rows=3)
    writer.add(_rows(schema, ["s0", "s1"]))
    assert writer.files == []  # below one shard: nothing on disk yet
    writer.add(_rows(schema, ["s2", "s3", "s4", "s5", "s6"]))
    assert [pq.read_metadata(f).num_rows for f in writer.files] == [3, 3]
    writer.close()
    assert [pq.read_metadata(f).num_rows for f in writer.files] == [3, 3, 1]
    assert not list(tmp_path.glob(".*"))  # no temp files left behind
    ids = pa.concat_tables([pq.read_table(f) for f in writer.files]).column("id").to_pylist()
    assert ids == [f"s{i}" for i in range(7)]


def test_schema_follows_the_contract():
    schema = embedding_schema(_catalog(1).schema, 8, 8, "float16")
    for name in ("id", "vector", "model_id", "preprocess_id", "content_sha256", "study_id", "modality",
                 "body_part", "split", "study_date", "abnormal", "text_vector"):
        assert name in schema.names
    assert schema.field("vector").type == pa.list_(pa.float16(), 8)
    assert schema.field("study_date").type == pa.date32()  # absent from the catalog: typed default
    assert "text_vector" not in embedding_schema(_catalog(1).schema, 8, None, "float32").names


def test_state_remove_ids_and_pyarrow_sees_only_embeddings(tmp_path):
    store = EmbeddingStore(tmp_path)
    schema = embedding_schema(_catalog(1).schema, 4, None, "float32")
    ShardWriter(tmp_path, schema, "a", 2).add(_rows(schema, ["s0", "s1"]))
    errors = ShardWriter(store.errors_dir, ERROR_SCHEMA, "a", 1)
    errors.add(pa.table({"id": ["s2"], "content_sha256": ["h2"], "model_id": ["m"], "preprocess_id": ["p"],
                         "stage": ["read"], "error": ["IngestError: x"], "failed_at": pa.array([0], pa.timestamp("s", tz="UTC"))}))
    state = store.state()
    assert state == {"s0": StoredRow("h0", "embedded"), "s1": StoredRow("h1", "embedded"), "s2": StoredRow("h2", "failed")}
    # Error shards and manifests live under "_"-prefixed names: a plain pyarrow read sees embeddings only.
    assert sorted(pq.read_table(tmp_path).column("id").to_pylist()) == ["s0", "s1"]
    assert store.remove_ids(["s1", "s2"]) == 2
    assert store.state() == {"s0": StoredRow("h0", "embedded")}
    assert store.error_files() == []  # emptied shard deleted, not left empty


def test_duplicate_rows_in_a_folder_are_refused(tmp_path):
    schema = embedding_schema(_catalog(1).schema, 4, None, "float32")
    ShardWriter(tmp_path, schema, "a", 1).add(_rows(schema, ["s0"]))
    ShardWriter(tmp_path, schema, "b", 1).add(_rows(schema, ["s0"]))
    with pytest.raises(EmbedError, match="two rows"):
        EmbeddingStore(tmp_path).state()


def test_plan_skips_same_content_and_redoes_changed_content():
    catalog = _catalog(5)
    stored = {"s0": StoredRow("h0", "embedded"), "s1": StoredRow("OLD", "embedded"),
              "s2": StoredRow("h2", "failed"), "s3": StoredRow("OLD", "failed")}
    plan = plan_rows(catalog, stored)
    assert plan.todo.column("series_id").to_pylist() == ["s1", "s3", "s4"]
    assert plan.skipped == 2 and sorted(plan.superseded) == ["s1", "s3"] and plan.retried == []
    retry = plan_rows(catalog, stored, retry_failed=True)
    assert retry.todo.column("series_id").to_pylist() == ["s1", "s2", "s3", "s4"] and retry.retried == ["s2"]
    limited = plan_rows(catalog, stored, limit=1)
    assert limited.todo.num_rows == 1 and limited.deferred == 2 and limited.superseded == ["s1"]


def test_loader_blocks_cover_every_row_once_without_heavy_columns():
    todo = _catalog(10)
    blocks = loader_blocks(todo, with_text=False, rows_per_block=rows_per_task(10, 2, 64))
    assert len(blocks) > 1  # several read tasks even for a small run
    joined = pa.concat_tables(blocks)
    assert joined.column("row_index").to_pylist() == list(range(10))
    assert "findings" not in joined.column_names and "report" not in joined.column_names
    assert "report" in loader_blocks(todo, with_text=True, rows_per_block=4)[0].column_names


def test_bind_refuses_a_folder_made_with_another_model(tmp_path):
    store = EmbeddingStore(tmp_path)
    store.bind("m1", "p1", fixed={"vector_dtype": "float32"}, info={})
    store.bind("m1", "p1", fixed={"vector_dtype": "float32"}, info={})  # same: fine
    with pytest.raises(EmbedError, match="m1"):
        store.bind("m2", "p1", fixed={"vector_dtype": "float32"}, info={})
    with pytest.raises(EmbedError, match="vector_dtype"):
        store.bind("m1", "p1", fixed={"vector_dtype": "float16"}, info={})


def test_lock_refuses_a_live_writer_and_takes_over_a_dead_ones(tmp_path):
    store = EmbeddingStore(tmp_path)
    with store.locked():
        with pytest.raises(EmbedError, match="another embed run"):
            with EmbeddingStore(tmp_path).locked():
                pass
    assert not store.lock_path.exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store.lock_path.write_text(f"{os.uname().nodename} {dead.pid}")
    with store.locked():  # the pid is gone: its lock is stale
        assert store.lock_path.read_text().endswith(str(os.getpid()))


def test_two_takeovers_of_a_stale_lock_leave_exactly_one_holder(tmp_path, monkeypatch):
    """Two restarted runs both find the lock of a run that died. The first to read the lock file is held
    back until the second has got in or been refused: one of them must stay out."""
    timeout = 60
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock_path = EmbeddingStore(tmp_path).lock_path
    lock_path.write_text(f"{os.uname().nodename} {dead.pid}")
    first_read, release = threading.Event(), threading.Event()
    tried = {"first": threading.Event(), "second": threading.Event()}
    holders, refused = [], []
    read_text = Path.read_text

    def slow_first_read(self, *args, **kwargs):
        text = read_text(self, *args, **kwargs)
        if self == lock_path and threading.current_thread().name == "first" and not first_read.is_set():
            first_read.set()
            tried["second"].wait(timeout)
        return text

    monkeypatch.setattr(Path, "read_text", slow_first_read)

    def run(name: str) -> None:
        try:
            with EmbeddingStore(tmp_path).locked():
                holders.append(name)
                tried[name].set()
                release.wait(timeout)
        except EmbedError:
            refused.append(name)
            tried[name].set()

    threads = {name: threading.Thread(target=run, args=(name,), name=name) for name in tried}
    threads["first"].start()
    try:
        assert first_read.wait(timeout)
        threads["second"].start()
        assert tried["second"].wait(timeout) and tried["first"].wait(timeout)
        assert len(holders) == 1 and len(refused) == 1, f"holders {holders}, refused {refused}"
    finally:
        release.set()
        for thread in threads.values():
            if thread.ident is not None:
                thread.join(timeout)
    assert not lock_path.exists()  # released by the one holder


def test_remove_temp_files_of_a_killed_run(tmp_path):
    store = EmbeddingStore(tmp_path)
    (tmp_path / ".part-x-00000.parquet.123.tmp").write_bytes(b"half")
    (tmp_path / "part-keep.parquet").write_bytes(b"")
    assert store.remove_temp_files() == 1
    assert [p.name for p in tmp_path.iterdir()] == ["part-keep.parquet"]


def test_actor_plan_never_starves_the_readers():
    cfg = EmbedConfig(catalog="c", checkpoint="m", out="o", read_in_model_actor=False)
    assert actor_plan(cfg, cluster_cpus=2, cluster_gpus=0) == {"size": 1, "num_cpus": 1.0, "num_gpus": 0, "threads": 1,
                                                              "reads_in_actor": False}
    default = EmbedConfig(catalog="c", checkpoint="m", out="o")
    assert actor_plan(default, cluster_cpus=16, cluster_gpus=0)["size"] == 8
    assert actor_plan(default, cluster_cpus=16, cluster_gpus=4) == {"size": 4, "num_cpus": 1.0, "num_gpus": 1, "threads": 1,
                                                                    "reads_in_actor": False}
    with pytest.raises(EmbedError, match="exceeds"):
        actor_plan(EmbedConfig(catalog="c", checkpoint="m", out="o", concurrency=2, read_in_model_actor=False),
                   cluster_cpus=2, cluster_gpus=0)
    with pytest.raises(EmbedError, match="GPU"):
        actor_plan(EmbedConfig(catalog="c", checkpoint="m", out="o", concurrency=2), cluster_cpus=8, cluster_gpus=1)


def test_small_cpu_nodes_read_inside_the_model_actor():
    # Two cores: one actor holding both (the CPUs of one actor and one reader), all as torch threads.
    cfg = EmbedConfig(catalog="c", checkpoint="m", out="o")
    assert actor_plan(cfg, cluster_cpus=2, cluster_gpus=0) == {"size": 1, "num_cpus": 2.0, "num_gpus": 0, "threads": 2,
                                                              "reads_in_actor": True}
    shared = EmbedConfig(catalog="c", checkpoint="m", out="o", actor_cpus=0.5, read_cpus=0.5)
    assert actor_plan(shared, cluster_cpus=2, cluster_gpus=0)["num_cpus"] == 1.0  # leaves room for a server
    assert actor_plan(cfg, cluster_cpus=4, cluster_gpus=0)["reads_in_actor"] is False
    assert actor_plan(cfg, cluster_cpus=2, cluster_gpus=1)["reads_in_actor"] is False  # GPUs: readers feed them
    with pytest.raises(EmbedError, match="exceed"):
        actor_plan(EmbedConfig(catalog="c", checkpoint="m", out="o", concurrency=2), cluster_cpus=2, cluster_gpus=0)
