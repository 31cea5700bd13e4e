"""Archive, catalog, embedding and index folders on s3://, against moto's S3 server on 127.0.0.1 (fake keys;
the `bucket` fixture is in conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from index_testlib import clustered_vectors
from voxsearch.common.storage import ObjectPath, location
from voxsearch.index import IndexConfig, IndexConflictError, IndexCorruptError, VectorIndex, update_index, versions

pytestmark = pytest.mark.timeout(60)


def _index(n: int = 300, d: int = 16, seed: int = 0) -> VectorIndex:
    vectors = clustered_vectors(n, d, 6, seed=seed)
    return VectorIndex.build([f"s{seed}-{i}" for i in range(n)], vectors, config=IndexConfig(factory="Flat"))


def _hits(index: VectorIndex, queries: np.ndarray) -> list[list[tuple[str, float]]]:
    return [[(h.id, round(h.score, 5)) for h in row] for row in index.search(queries, k=5)]


def test_storage_location_keeps_uris_and_names_them_in_errors(bucket):
    assert location("s3://b/x/") == ObjectPath("s3", "b/x")
    assert location("gs://b/x").uri == "gs://b/x"
    assert str(location("relative/dir")) == "relative/dir"
    missing = location(f"{bucket}/no/such/object")
    with pytest.raises(FileNotFoundError, match=f"{bucket}/no/such/object"):
        missing.read_bytes()
    with pytest.raises(OSError) as failed:
        location("s3://no-such-bucket-here/x").write_bytes(b"x")
    assert "s3://no-such-bucket-here/x" in str(failed.value) and "testing-secret" not in str(failed.value)


def test_index_saved_to_s3_searches_like_the_local_copy(bucket, tmp_path):
    index = _index()
    index.save(tmp_path / "local")
    prefix = f"{bucket}/indexes/main"
    index.save(prefix)
    queries = clustered_vectors(7, 16, 6, seed=9)
    remote = VectorIndex.load(prefix)
    assert _hits(remote, queries) == _hits(VectorIndex.load(tmp_path / "local"), queries)
    assert len(remote) == 300 and remote.version.startswith("v000001-")
    names = sorted(p.name for p in location(prefix).iterdir())
    assert names == ["CURRENT", remote.version]


def test_update_index_on_s3_loses_no_rows_and_keeps_two_versions(bucket):
    prefix = f"{bucket}/idx"
    _index(n=50, seed=1).save(prefix)
    extra = clustered_vectors(20, 16, 6, seed=2)
    for batch in range(3):
        ids = [f"add{batch}-{i}" for i in range(10)]
        outcome = update_index(prefix, lambda ix, ids=ids, rows=extra[batch * 5:batch * 5 + 10]: ix.add(ids, rows))
        assert outcome.action == "changed"
    loaded = VectorIndex.load(prefix)
    assert len(loaded) == 80 and {f"add{b}-{i}" for b in range(3) for i in range(10)} <= set(loaded.ids())
    kept = sorted(p.name for p in location(prefix).iterdir() if p.name != versions.CURRENT)
    assert [name.split("-")[0] for name in kept] == ["v000003", "v000004"] and loaded.version == kept[-1]


def test_stale_writer_gets_a_conflict_on_s3(bucket):
    prefix = f"{bucket}/idx"
    _index(n=40).save(prefix)
    first, second = VectorIndex.load(prefix), VectorIndex.load(prefix)
    first.add(["a"], clustered_vectors(1, 16, 6, seed=3))
    first.save(prefix)
    second.add(["b"], clustered_vectors(1, 16, 6, seed=4))
    with pytest.raises(IndexConflictError, match=prefix):
        second.save(prefix)
    assert "a" in VectorIndex.load(prefix) and "b" not in VectorIndex.load(prefix)

    def another_writer_publishes(path):  # while this writer uploads: its check before CURRENT must see it
        first.add(["c"], clustered_vectors(1, 16, 6, seed=5))
        first.save(prefix)
        path.write_bytes(b"blob")

    read = versions.current_version(prefix)
    with pytest.raises(IndexConflictError):
        versions.write_version(prefix, {"blob": another_writer_publishes}, {}, expected=read)
    assert versions.current_version(prefix) == first.version != read and "c" in VectorIndex.load(prefix)
    names = [p.name for p in location(prefix).iterdir()]  # the loser's upload is gone, v000001 pruned
    assert len(names) == 3 and names[0] == versions.CURRENT and names[1].startswith("v000002-") and names[2] == first.version


def test_writer_dying_before_publishing_leaves_the_previous_version(bucket, monkeypatch):
    prefix = f"{bucket}/idx"
    _index(n=60).save(prefix)
    before = location(f"{prefix}/CURRENT").read_bytes()

    def dies(path):
        raise KeyboardInterrupt("killed mid-save")

    with pytest.raises(KeyboardInterrupt):
        versions.write_version(prefix, {"index.faiss": lambda p: p.write_bytes(b"half"), "ids.parquet": dies},
                               {}, expected=versions.current_version(prefix))
    # Killed between the uploads and the PUT of CURRENT: the uploaded objects stay behind.
    real_delete, real_write = ObjectPath.delete_tree, ObjectPath.write_text

    def crash_on_publish(self, text):
        if self.name == versions.CURRENT:
            raise KeyboardInterrupt("killed before publishing")
        real_write(self, text)

    monkeypatch.setattr(ObjectPath, "delete_tree", lambda self: None)
    monkeypatch.setattr(ObjectPath, "write_text", crash_on_publish)
    with pytest.raises(KeyboardInterrupt):
        _index(n=10, seed=5).save(prefix)
    monkeypatch.setattr(ObjectPath, "delete_tree", real_delete)
    monkeypatch.setattr(ObjectPath, "write_text", real_write)
    assert location(f"{prefix}/CURRENT").read_bytes() == before
    assert len(VectorIndex.load(prefix)) == 60
    orphans = [p.name for p in location(prefix).iterdir() if p.name.startswith("v000002-")]
    assert len(orphans) == 1
    for seed in (6, 7, 8):
        _index(n=10, seed=seed).save(prefix)
    assert orphans[0] not in [p.name for p in location(prefix).iterdir()]  # a later save pruned it


def test_corrupt_object_is_caught_by_checksum_naming_its_uri(bucket):
    prefix = f"{bucket}/idx"
    _index(n=30).save(prefix)
    name = versions.current_version(prefix)
    ids = location(f"{prefix}/{name}/ids.parquet")
    data = bytearray(ids.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum can tell
    ids.write_bytes(bytes(data))
    with pytest.raises(IndexCorruptError, match=f"{prefix}/{name}/ids.parquet is corrupt"):
        VectorIndex.load(prefix)
    location(f"{prefix}/CURRENT").write_text(f"{name} {'0' * 64}\n")
    with pytest.raises(IndexCorruptError, match="does not match its checksum"):
        VectorIndex.load(prefix)


def _catalog_rows(run: str, modality: str) -> list[dict]:
    from voxsearch.ingest.catalog import now_utc

    return [{"study_id": f"st{i}", "series_id": f"se{i}", "modality": modality, "shape": [4, 4, 2],
             "spacing": [1.0, 1.0, 2.5], "file_sha256": f"{run}{i}", "report": f"report {i}",
             "ingested_at": now_utc(), "run_id": run} for i in range(5)]


def test_catalog_round_trip_through_s3_equals_local(bucket, tmp_path):
    from voxsearch.ingest.catalog import CatalogWriter, read_all_rows, read_catalog, read_errors, read_meta

    remote = f"{bucket}/catalogs/main"
    for root in (tmp_path / "catalog", remote):
        for run, modality in (("r1", "CT"), ("r2", "MR")):  # the second run re-ingests every series
            writer = CatalogWriter(root, run, shard_rows=3)
            for row in _catalog_rows(run, modality):
                writer.add_row(row)
            writer.add_error(f"/archive/bad-{run}.nii.gz", "read", "truncated file")
            writer.close({"rows": 5})
    local = tmp_path / "catalog"
    assert read_all_rows(remote).num_rows == 10
    latest = read_catalog(remote)
    assert latest.drop_columns(["ingested_at"]).equals(read_catalog(local).drop_columns(["ingested_at"]))
    assert set(latest.column("modality").to_pylist()) == {"MR"}  # the newest row of each series wins
    assert read_errors(remote).column("path").to_pylist() == ["/archive/bad-r2.nii.gz"]
    assert [r["run_id"] for r in read_meta(remote)["runs"]] == ["r1", "r2"] == [r["run_id"] for r in read_meta(local)["runs"]]
    assert sorted(p.name for p in location(remote).iterdir()) == ["catalog.json", "errors", "rows"]


def _embedding_table(ids: list[str], seed: int):
    import pyarrow as pa

    from voxsearch.embed.shards import embedding_schema
    from voxsearch.ingest.catalog import SCHEMA

    schema = embedding_schema(SCHEMA, 8, None, "float32")
    vectors = clustered_vectors(len(ids), 8, 3, seed=seed)
    rows = [{"id": i, "vector": v.tolist(), "model_id": "m1", "preprocess_id": "p1", "content_sha256": f"c-{i}",
             "modality": "CT", "split": "train"} for i, v in zip(ids, vectors)]
    return pa.Table.from_pylist(rows, schema=schema)


def test_embeddings_round_trip_through_s3_equal_local(bucket, tmp_path):
    from voxsearch.embed.config import EmbedError
    from voxsearch.embed.shards import ERROR_SCHEMA, EmbeddingStore, ShardWriter
    from voxsearch.index import build_from_embeddings, read_embeddings

    remote = location(f"{bucket}/emb")
    first, again = _embedding_table([f"e{i}" for i in range(7)], 1), _embedding_table(["e2", "e9"], 2)
    for root in (tmp_path / "emb", remote):
        for run, table in (("r1", first), ("r2", again)):  # e2 re-embedded by the second run
            writer = ShardWriter(root, first.schema, run, shard_rows=3)
            writer.add(table)
            writer.close()
        errors = ShardWriter(root / "_errors", ERROR_SCHEMA, "r1", shard_rows=10)
        errors.add(ERROR_SCHEMA.empty_table())
        errors.close()
    local = read_embeddings(tmp_path / "emb")
    got = read_embeddings(str(remote))
    assert got.ids == local.ids and len(got.ids) == 8
    np.testing.assert_array_equal(got.vectors, local.vectors)
    assert got.metadata.equals(local.metadata)
    assert got.source["files"] == [f"{remote}/part-r1-0000{i}.parquet" for i in range(3)] + [f"{remote}/part-r2-00000.parquet"]
    e2 = got.ids.index("e2")
    np.testing.assert_array_equal(got.vectors[e2], np.asarray(again.column("vector")[0].as_py(), np.float32))
    queries = clustered_vectors(3, 8, 3, seed=5)
    assert _hits(build_from_embeddings(str(remote)), queries) == _hits(build_from_embeddings(tmp_path / "emb"), queries)
    for store in (EmbeddingStore(remote), EmbeddingStore(tmp_path / "emb")):  # e2 twice, as run r2 left it
        with pytest.raises(EmbedError, match="holds two rows for one series"):
            store.state()
    store = EmbeddingStore(remote)
    store.mark_superseded(["e2"])
    assert store.superseded() == {"e2"} and (remote / "_superseded.json").is_file()
    store.clear_superseded()
    assert store.superseded() == set()


def test_cli_builds_and_searches_an_index_on_s3(bucket, tmp_path, capsys, monkeypatch):
    from voxsearch.cli import main

    monkeypatch.chdir(tmp_path)  # where Path("s3://b/x") would have made a folder "s3:"
    from voxsearch.embed.shards import ShardWriter

    table = _embedding_table([f"e{i}" for i in range(20)], 3)
    writer = ShardWriter(location(f"{bucket}/emb"), table.schema, "r1", shard_rows=8)
    writer.add(table)
    writer.close()
    assert main(["index", "build", f"{bucket}/emb", "--out", f"{bucket}/idx", "--factory", "Flat"]) == 0
    assert main(["index", "search", f"{bucket}/idx", "--id", "e4", "-k", "1", "--json"]) == 0
    out = capsys.readouterr().out
    assert f"-> {bucket}/idx" in out and '"id": "e4"' in out.splitlines()[-1]
    more = ShardWriter(location(f"{bucket}/emb-new"), table.schema, "r2", shard_rows=8)
    more.add(_embedding_table(["n1", "n2"], 4))
    more.close()
    assert main(["index", "add", f"{bucket}/idx", f"{bucket}/emb-new"]) == 0
    assert main(["index", "delete", f"{bucket}/idx", "e0", "e1"]) == 0
    assert main(["search", "--index", f"{bucket}/idx", "--like", "n1", "--k", "30", "--json"]) == 0
    found = [json.loads(line)["id"] for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert sorted(found) == sorted({f"e{i}" for i in range(2, 20)} | {"n2"})
    assert not list(tmp_path.iterdir())


def test_ingest_reads_an_archive_in_s3_into_a_catalog_there(bucket, tmp_path, monkeypatch):
    from test_ingest_helpers import phantom_hu, save_nifti
    from voxsearch.ingest import IngestConfig, read_catalog, read_errors, read_volume_row, run_ingest

    archive = tmp_path / "archive"
    archive.mkdir()
    for i in range(2):
        save_nifti(archive / f"v{i}.nii.gz", phantom_hu(seed=i), np.eye(4))
    (archive / "v0.txt").write_text("FINDINGS: a small nodule.")
    (archive / "broken.nii.gz").write_bytes(b"not a NIfTI file")
    for path in archive.iterdir():
        location(f"{bucket}/archive/{path.name}").upload(path)

    def ingest(source, out):
        return run_ingest(IngestConfig(archive=source, out=out, engine="local", progress=False, salt="s",
                                       check_preprocess=None))

    here, there = ingest(archive, tmp_path / "catalog"), ingest(f"{bucket}/archive", f"{bucket}/catalog")
    assert (there.added, there.failed, there.warnings) == (here.added, here.failed, here.warnings) == (2, 1, 1)
    columns = ["file_sha256", "content_sha256", "shape", "spacing", "modality", "report"]
    local, remote = (read_catalog(c).sort_by("file_sha256") for c in (tmp_path / "catalog", f"{bucket}/catalog"))
    assert remote.select(columns).equals(local.select(columns))
    assert sorted(remote.column("source_path").to_pylist()) == [f"{bucket}/archive/v{i}.nii.gz" for i in range(2)]
    failed = read_errors(f"{bucket}/catalog")
    reasons = {p: r for p, r in zip(failed.column("path").to_pylist(), failed.column("reason").to_pylist())}
    assert reasons[f"{bucket}/archive/broken.nii.gz"].startswith(f"{bucket}/archive/broken.nii.gz: not a readable NIfTI")
    # What an embed run does with the catalog: load it, then read the volume each row points at.
    from voxsearch.embed.config import EmbedConfig
    from voxsearch.embed.reader import load_catalog

    config = EmbedConfig(catalog=f"{bucket}/catalog", checkpoint="ckpt", out="emb", index=f"{bucket}/index")
    assert (config.catalog, config.index) == (location(f"{bucket}/catalog"), location(f"{bucket}/index"))
    assert load_catalog(config.catalog).sort_by("file_sha256").equals(remote)
    for row_here, row_there in zip(local.to_pylist(), remote.to_pylist()):
        np.testing.assert_array_equal(read_volume_row(row_there).array, read_volume_row(row_here).array)
    assert ingest(f"{bucket}/archive", f"{bucket}/catalog").skipped == 2  # incremental by file hash
    monkeypatch.delenv("VOXSEARCH_SALT", raising=False)
    with pytest.raises(ValueError, match="give its salt"):
        run_ingest(IngestConfig(archive=f"{bucket}/archive", out=f"{bucket}/other", engine="local", progress=False))


# -- CLIP checkpoints in object storage -------------------------------------------------------------------
CLIP_SIZE = (32, 64, 64)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A small checkpoint (text weights from the installed package) with a nested object besides."""
    import torch

    from voxsearch.encoders import ClipConfig, ClipModel, TextTowerConfig, save_clip

    torch.manual_seed(0)
    model = ClipModel(ClipConfig(vision_variant="nano", embed_dim=16, text=TextTowerConfig(max_length=32),
                                 image_size=CLIP_SIZE, finding_labels=("mass|liver",)))
    folder = save_clip(model, tmp_path_factory.mktemp("clip") / "ckpt", packaged_text=True,
                       extra={"preprocess": {"spatial_size": list(CLIP_SIZE)}})
    (folder / "notes").mkdir()
    (folder / "notes" / "trained.txt").write_text("trained on synthetic scans")
    return folder


def _upload_folder(folder, uri: str) -> None:
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        location(f"{uri}/{path.relative_to(folder).as_posix()}").upload(path)


@pytest.fixture
def downloads(monkeypatch, tmp_path) -> list[str]:
    """The objects downloaded from now on, into a fresh cache."""
    monkeypatch.setenv("VOXSEARCH_CACHE", str(tmp_path / "cache"))
    fetched, real = [], ObjectPath.download

    def counted(self, local):
        fetched.append(self.uri)
        return real(self, local)

    monkeypatch.setattr(ObjectPath, "download", counted)
    return fetched


def test_checkpoint_in_s3_opens_like_the_local_folder_and_is_fetched_once(bucket, clip_folder, downloads, tmp_path):
    import torch

    from voxsearch.encoders import load_clip, model_id, open_checkpoint, read_clip_meta

    uri = f"{bucket}/models/clip"
    _upload_folder(clip_folder, uri)
    local, remote = open_checkpoint(clip_folder), open_checkpoint(uri)
    assert remote.model_id == local.model_id == model_id(uri) and remote.source == uri
    assert remote.path.is_relative_to(tmp_path / "cache" / "checkpoints")
    assert (remote.path / "notes" / "trained.txt").read_text() == "trained on synthetic scans"
    assert remote.preprocess == local.preprocess and remote.finding_head().labels == ("mass|liver",)
    x = torch.rand(2, 1, *CLIP_SIZE)
    with torch.no_grad():
        here, there = (c.load_model(inference=True).encode_image(x) for c in (local, remote))
    torch.testing.assert_close(there, here, rtol=0, atol=1e-6)
    assert sorted(downloads) == [f"{uri}/config.json", f"{uri}/model.safetensors", f"{uri}/notes/trained.txt"]

    # Opened again (a second actor, a later run): the copy is used as it is.
    assert open_checkpoint(uri).model_id == remote.model_id and read_clip_meta(uri) == remote.meta
    load_clip(uri)
    assert len(downloads) == 3

    # A changed object makes a new copy; the old one stays for whoever still reads it.
    meta = json.loads(location(f"{uri}/config.json").read_text())
    meta["extra"]["trained_on"] = "more scans"
    location(f"{uri}/config.json").write_text(json.dumps(meta))
    changed = open_checkpoint(uri)
    assert changed.meta["extra"]["trained_on"] == "more scans" and changed.model_id != remote.model_id
    assert changed.path != remote.path and remote.path.is_dir() and len(downloads) == 6


def test_checkpoint_copies_appear_whole_and_once_however_many_open_them(bucket, clip_folder, downloads, monkeypatch,
                                                                        tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from voxsearch.encoders import open_checkpoint

    uri = f"{bucket}/ckpt"
    _upload_folder(clip_folder, uri)
    counted = ObjectPath.download

    def cut_off(self, local):  # the process dies after its first object
        if downloads:
            raise KeyboardInterrupt("killed mid-download")
        return counted(self, local)

    monkeypatch.setattr(ObjectPath, "download", cut_off)
    with pytest.raises(KeyboardInterrupt):
        open_checkpoint(uri)
    cache = tmp_path / "cache" / "checkpoints"
    assert [p.suffix for p in cache.rglob("*") if p.is_file()] == [".lock"]  # no half copy to be read
    monkeypatch.setattr(ObjectPath, "download", counted)
    downloads.clear()
    with ThreadPoolExecutor(4) as pool:  # actors of one node starting together
        ids = set(pool.map(lambda _: open_checkpoint(uri).model_id, range(4)))
    assert ids == {open_checkpoint(clip_folder).model_id} and len(downloads) == 3
    assert [p.name for p in cache.rglob("*") if p.name.startswith(".")] == []
    assert len([p for p in cache.glob("*/*") if p.is_dir()]) == 1


def test_checkpoint_uri_errors_name_the_uri(bucket, clip_folder, downloads):
    from voxsearch.encoders import open_checkpoint

    with pytest.raises(FileNotFoundError, match=f"{bucket}/no/such/ckpt: no objects under it"):
        open_checkpoint(f"{bucket}/no/such/ckpt")
    location(f"{bucket}/other/readme.txt").write_text("not a checkpoint")
    with pytest.raises(FileNotFoundError, match=f"{bucket}/other is not a voxsearch CLIP checkpoint"):
        open_checkpoint(f"{bucket}/other")
    _upload_folder(clip_folder, f"{bucket}/broken")
    location(f"{bucket}/broken/config.json").write_text("{not json")
    with pytest.raises(ValueError, match=f"corrupt checkpoint config {bucket}/broken/config.json"):
        open_checkpoint(f"{bucket}/broken")
    with pytest.raises(OSError) as failed:
        open_checkpoint("s3://no-such-bucket-here/ckpt")
    assert "s3://no-such-bucket-here" in str(failed.value) and "testing-secret" not in str(failed.value)


def test_embed_serve_and_training_keep_a_checkpoint_uri(bucket, clip_folder, downloads, tmp_path):
    import torch
    from safetensors.torch import load_file

    from voxsearch.embed.config import EmbedConfig
    from voxsearch.embed.runner import _absolute
    from voxsearch.serve.app import _absolute as serve_absolute
    from voxsearch.serve.config import ServeConfig, ServeConfigError
    from voxsearch.training.config import ClipTrainConfig
    from voxsearch.training.loop import build_model

    uri = f"{bucket}/ckpt"
    _upload_folder(clip_folder, uri)
    config = EmbedConfig(catalog=tmp_path, checkpoint=uri, out=tmp_path / "emb")
    assert config.checkpoint == location(uri) and _absolute(config.checkpoint) == location(uri)
    assert serve_absolute(uri) == uri and serve_absolute("ckpt") == str(Path("ckpt").resolve())
    (tmp_path / "index").mkdir()
    ServeConfig(index=str(tmp_path / "index"), checkpoint=uri, catalog=str(tmp_path)).validate()
    with pytest.raises(ServeConfigError, match=f"checkpoint path {bucket}/missing does not exist"):
        ServeConfig(index=str(tmp_path / "index"), checkpoint=f"{bucket}/missing", catalog=str(tmp_path)).validate()
    init = build_model(ClipTrainConfig(catalog=tmp_path, out=tmp_path / "run", init=uri)).state_dict()
    saved = load_file(str(clip_folder / "model.safetensors"))
    torch.testing.assert_close(init["vision_proj.weight"], saved["vision_proj.weight"], rtol=0, atol=0)
