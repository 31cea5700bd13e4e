"""One index, many writers: the server's /embed, `voxsearch sync` / `embed --index` and `voxsearch index
add|delete|compact` all change a saved index through update_index (a lock plus a compare-and-swap on the
version, re-applied on conflict), so no writer's rows are lost and no writer's temp folder is pruned."""

from __future__ import annotations

import fcntl
import multiprocessing
import re
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from voxsearch.index import IndexConfig, IndexConflictError, IndexLockTimeout, VectorIndex, update_index, versions

DIM = 8
TIMEOUT = 120


def _vectors(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)


@pytest.fixture
def saved(tmp_path) -> Path:
    directory = tmp_path / "idx"
    metadata = pa.table({"modality": ["CT"] * 10})
    VectorIndex.build([f"s{i}" for i in range(10)], _vectors(10, 0), metadata,
                      IndexConfig(factory="Flat")).save(directory)
    return directory


def _temp_folders(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if p.name.startswith(".tmp-")]


def test_a_stale_expected_version_is_a_conflict_and_changes_nothing(saved):
    stale = VectorIndex.load(saved)
    newer = VectorIndex.load(saved)
    newer.add(["other-writer"], _vectors(1, 1))
    newer.save(saved)
    assert versions.current_version(saved) == "v000002"
    with pytest.raises(IndexConflictError, match=r"read version v000001, the folder now holds v000002") as caught:
        versions.write_version(saved, {"blob": lambda p: p.write_bytes(b"x")}, {}, expected="v000001")
    assert str(saved) in str(caught.value)
    with pytest.raises(IndexConflictError):  # "no index there yet" is stale too
        versions.write_version(saved, {"blob": lambda p: p.write_bytes(b"x")}, {}, expected=None)
    stale.add(["mine"], _vectors(1, 2))
    with pytest.raises(IndexConflictError):  # a loaded index expects the version it was loaded from
        stale.save(saved)
    assert versions.current_version(saved) == "v000002" and not _temp_folders(saved)
    assert "other-writer" in VectorIndex.load(saved)


def test_a_held_lock_times_out_naming_the_index_folder(saved):
    with open(saved / versions.LOCK_FILE, "a") as other_writer:
        fcntl.flock(other_writer, fcntl.LOCK_EX)
        index = VectorIndex.load(saved)
        index.add(["x"], _vectors(1, 3))
        with pytest.raises(IndexLockTimeout, match=re.escape(f"index {saved} is being written by another writer")):
            versions.write_version(saved, {"blob": lambda p: p.write_bytes(b"x")}, {}, expected=index.version,
                                lock_timeout=0.2)
    assert versions.current_version(saved) == "v000001"


def test_prune_spares_a_live_writers_temp_folder(saved):
    started, release, outcome = threading.Event(), threading.Event(), []

    def slow_write(path: Path) -> None:
        started.set()
        assert release.wait(TIMEOUT)
        path.write_bytes(b"slow")

    def other_writer() -> None:
        try:
            versions.write_version(saved, {"blob": slow_write}, {}, expected="v000001")
        except Exception as exc:  # noqa: BLE001 - handed to the test thread
            outcome.append(exc)

    thread = threading.Thread(target=other_writer)
    thread.start()
    try:
        assert started.wait(TIMEOUT)
        live = _temp_folders(saved)
        assert len(live) == 1
        index = VectorIndex.load(saved)
        index.add(["quick"], _vectors(1, 4))
        index.save(saved)  # swaps and prunes while the other writer is still filling its folder
        assert live[0].is_dir(), "a live writer's temp folder was pruned"
    finally:
        release.set()
        thread.join(TIMEOUT)
    assert len(outcome) == 1 and isinstance(outcome[0], IndexConflictError)  # it read v000001, v000002 came
    assert not _temp_folders(saved)  # the loser removed its own
    assert "quick" in VectorIndex.load(saved)


def _add_many(directory: str, tag: str, count: int, barrier) -> None:
    barrier.wait(TIMEOUT)
    for i in range(count):
        vector = _vectors(1, 1000 * ord(tag) + i)
        update_index(directory, lambda index, item=f"{tag}-{i}", v=vector: index.add([item], v))


def test_two_processes_adding_through_update_index_lose_nothing(saved):
    count = 25
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_add_many, args=(str(saved), tag, count, barrier)) for tag in ("a", "b")]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(TIMEOUT)
        assert proc.exitcode == 0
    ids = set(VectorIndex.load(saved).ids())
    expected = {f"{tag}-{i}" for tag in ("a", "b") for i in range(count)} | {f"s{i}" for i in range(10)}
    assert ids == expected, f"lost: {sorted(expected - ids)}"


# ---- every writer re-applies its change when another writer saved in between -------------------------------
@pytest.fixture
def interloper(monkeypatch):
    """Right after a writer loads the index for the first time, another writer saves a new version that
    adds the id "interloper": a writer that saves what it loaded without a compare-and-swap loses it."""
    original = VectorIndex.load.__func__
    fired = []

    def load(cls, directory, *args, **kwargs):
        index = original(cls, directory, *args, **kwargs)
        if not fired:
            fired.append(directory)
            other = original(cls, directory)
            other.add(["interloper"], _vectors(1, 99))
            other.save(directory)
        return index

    monkeypatch.setattr(VectorIndex, "load", classmethod(load))
    return fired


def _embedding_folder(root: Path, ids: list[str], seed: int, part: int) -> None:
    from voxsearch.common.durable import atomic_write_parquet

    root.mkdir(parents=True, exist_ok=True)
    vectors = _vectors(len(ids), seed)
    table = pa.table({"id": pa.array(ids, pa.string()),
                      "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), DIM),
                      "modality": pa.array(["CT"] * len(ids), pa.string())})
    atomic_write_parquet(root / f"part-test-{part:05d}.parquet", table)


def _cli(*argv: str) -> int:
    from voxsearch.cli import main

    return main(list(argv))


@pytest.mark.parametrize("writer", ["cli-add", "cli-delete", "cli-compact", "server-add", "embed-sync"])
def test_every_writer_keeps_a_version_saved_meanwhile(saved, tmp_path, interloper, writer):
    if writer == "cli-add":
        np.save(tmp_path / "new.npy", _vectors(2, 5))
        (tmp_path / "ids.txt").write_text("n1\nn2\n")
        assert _cli("index", "add", str(saved), str(tmp_path / "new.npy"), "--ids", str(tmp_path / "ids.txt")) == 0
        wanted, gone = {"n1", "n2"}, set()
    elif writer == "cli-delete":
        assert _cli("index", "delete", str(saved), "s1", "s2") == 0
        wanted, gone = set(), {"s1", "s2"}
    elif writer == "cli-compact":
        assert _cli("index", "compact", str(saved)) == 0
        wanted, gone = set(), set()
    elif writer == "server-add":
        from voxsearch.serve.index_holder import IndexHolder

        interloper.append("not yet")  # the holder's first load is its start-up: the race is in add()
        holder = IndexHolder(saved)
        interloper.clear()
        result = holder.add(["up1"], _vectors(1, 6), None)
        assert result["added"] == ["up1"] and "interloper" in holder.index and "up1" in holder.index
        wanted, gone = {"up1"}, set()
    else:
        from voxsearch.embed.index_sync import sync_index
        from voxsearch.embed.shards import EmbeddingStore

        embeddings = tmp_path / "emb"
        _embedding_folder(embeddings, [f"s{i}" for i in range(10)], 0, 0)
        _embedding_folder(embeddings, ["e1", "e2"], 7, 1)
        info = sync_index(saved, EmbeddingStore(embeddings), "model-x")
        assert info["action"] == "updated" and info["added"] == 2
        wanted, gone = {"e1", "e2"}, set()
    assert interloper, "the other writer never got in"
    final = set(VectorIndex.load(saved).ids())
    assert "interloper" in final, f"{writer} overwrote a version another writer saved"
    assert wanted <= final and not (gone & final)


# ---- the scenario of the issue: /embed uploads while `voxsearch sync` rounds run ---------------------------
def _nifti_bytes(seed: int) -> bytes:
    import gzip

    import nibabel as nib

    rng = np.random.default_rng(seed)
    volume = np.full((40, 40, 20), -1000, np.int16)
    volume[8:32, 8:32, 4:16] = rng.integers(0, 200, size=(24, 24, 12), dtype=np.int16)
    return gzip.compress(nib.Nifti1Image(volume, np.diag([1.5, 1.5, 3.0, 1.0])).to_bytes())


@pytest.mark.slow
def test_uploads_during_sync_rounds_are_all_in_the_final_index(ray_session, tmp_path):
    """Serve start-up plus several embedding rounds: minutes on two CPUs, hence slow."""
    import shutil
    import socket

    import httpx

    from embed_testlib import make_checkpoint
    from voxsearch.sync.job import SyncConfig, sync_round
    from voxsearch.ingest import SynthConfig, generate_archive
    from voxsearch.serve.app import start, stop
    from voxsearch.serve.config import DeploymentOptions, Deployments, ServeConfig

    staged = sorted(generate_archive(SynthConfig(n=5, seed=21, out=tmp_path / "synth", size="tiny",
                                                 dicom_share=0.0)).rglob("*.nii.gz"))
    source = tmp_path / "source"
    source.mkdir()
    shutil.copy(staged[0], source)
    cfg = SyncConfig(source=str(source), catalog=tmp_path / "catalog", index=tmp_path / "index",
                     checkpoint=make_checkpoint(tmp_path / "ckpt"), progress=False, ingest_engine="local",
                     embed_options={"actor_cpus": 0.5, "read_cpus": 0.5})
    assert sync_round(cfg).added == 1

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    small = DeploymentOptions(num_cpus=0.05)
    serve_cfg = ServeConfig(index=str(cfg.index), checkpoint=str(cfg.checkpoint), catalog=str(cfg.catalog),
                            data_dir=str(tmp_path / "added"), port=port, index_poll_s=0.5, app_name="writers",
                            require_api_key=False,
                            deployments=Deployments(**{n: small for n in ("ingress", "text_encoder", "image_encoder",
                                                                            "searcher", "studies", "reporter")}))
    url = start(serve_cfg, ready_timeout_s=240)
    rounds, failures = [], []

    def sync_rounds() -> None:
        for path in staged[1:]:  # each round has a new study to add, so each round saves the index
            shutil.copy(path, source)
            report = sync_round(cfg)
            rounds.append(report)
            if report.failed:
                failures.append(report.errors)

    syncer = threading.Thread(target=sync_rounds)
    accepted = []
    try:
        with httpx.Client(base_url=url, timeout=120) as client:
            syncer.start()
            seed = 0
            while syncer.is_alive() or seed < 3:
                seed += 1
                r = client.post("/api/v1/embed", files={"file": (f"up{seed}.nii.gz", _nifti_bytes(seed))})
                assert r.status_code in (200, 201), r.text
                if r.status_code == 201:
                    accepted.append(r.json()["series_id"])
            syncer.join(600)
    finally:
        stop(serve_cfg)
    assert not syncer.is_alive() and not failures, failures
    assert len(rounds) == len(staged) - 1 and accepted
    final = set(VectorIndex.load(cfg.index).ids())
    assert set(accepted) <= final, f"uploads lost: {sorted(set(accepted) - final)}"
    from voxsearch.ingest import read_catalog

    assert set(read_catalog(cfg.catalog).column("series_id").to_pylist()) <= final
