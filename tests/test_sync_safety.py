"""Sync never wipes an archive on a listing that lacks it (an emptied or restarted PACS, an unmounted
folder), and when deletion is really wanted the last series can leave: the index becomes empty and
keeps working."""

from __future__ import annotations

import dataclasses
import logging
import shutil

import numpy as np
import pyarrow as pa
import pytest
from orthanc_server import available
from test_pacs import _only, _upload, monkeypatch_module, orthanc, pacs_archive  # noqa: F401 - fixtures

from voxsearch.index import IndexConfig, VectorIndex

DIM = 8


def _vectors(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)


@pytest.mark.parametrize("factory", ["Flat", "IVF2,Flat", "HNSW8,Flat"])
def test_an_index_whose_last_row_left_saves_loads_searches_and_takes_adds(tmp_path, factory):
    index = VectorIndex.build([f"s{i}" for i in range(40)], _vectors(40, 0), pa.table({"modality": ["CT"] * 40}),
                              IndexConfig(factory=factory))
    index.delete(index.ids())
    index.compact()
    assert len(index) == 0 and index.search(_vectors(2, 1), k=5) == [[], []]
    index.save(tmp_path / "idx")
    empty = VectorIndex.load(tmp_path / "idx")
    assert len(empty) == 0 and empty.ids() == []
    assert empty.search(_vectors(1, 2), k=3, filters={"modality": "CT"}) == [[]]
    empty.add(["back"], _vectors(1, 3), pa.table({"modality": ["MR"]}))
    empty.save(tmp_path / "idx")
    again = VectorIndex.load(tmp_path / "idx")
    [hits] = again.search(_vectors(1, 3), k=3)
    assert [h.id for h in hits] == ["back"] and hits[0].metadata == {"modality": "MR"}
    # Once rows are back, a compact re-chooses the factory the user asked for.
    again.add([f"n{i}" for i in range(40)], _vectors(40, 4))
    assert again.compact().manifest["factory"] == factory


def test_the_index_follows_its_embeddings_down_to_empty_and_back(tmp_path):
    """The index side of a sync round whose last series left: it used to stop with
    `compact: the index has no rows left`."""
    from voxsearch.embed.index_sync import sync_index
    from voxsearch.common.durable import atomic_write_parquet
    from voxsearch.embed.shards import EmbeddingStore

    def shard(ids: list[str], seed: int, part: int) -> None:
        vectors = _vectors(len(ids), seed)
        atomic_write_parquet(tmp_path / "emb" / f"part-t-{part:05d}.parquet",
                             pa.table({"id": pa.array(ids, pa.string()),
                                       "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), DIM),
                                       "model_id": pa.array(["m"] * len(ids), pa.string())}))

    (tmp_path / "emb").mkdir()
    store = EmbeddingStore(tmp_path / "emb")
    shard(["only"], 0, 0)
    assert sync_index(tmp_path / "idx", store, "m")["action"] == "built"
    with store.locked():  # what sync's deletion does
        store.mark_superseded(["only"])
        store.remove_ids(["only"])
    gone = sync_index(tmp_path / "idx", store, "m")
    assert (gone["deleted"], gone["size"]) == (1, 0)
    assert VectorIndex.load(tmp_path / "idx").search(_vectors(1, 0), k=1) == [[]]
    shard(["new"], 1, 1)
    back = sync_index(tmp_path / "idx", store, "m")
    assert (back["added"], back["size"]) == (1, 1) and VectorIndex.load(tmp_path / "idx").ids() == ["new"]


# ---- the deletion guard, on a folder source ------------------------------------------------------------------
@pytest.fixture
def folder_sync(tmp_path, monkeypatch):
    """A folder of 5 studies synced into a catalog, and a 6th study to add later. Embedding is stubbed out: what is under test is which
    series a round deletes, decided before embedding (which has its own tests)."""
    import voxsearch.embed
    from voxsearch.embed.config import EmbedSummary
    from voxsearch.sync.job import SyncConfig, sync_round
    from voxsearch.ingest import SynthConfig, generate_archive

    source = generate_archive(SynthConfig(n=6, seed=3, out=tmp_path / "source", size="tiny", dicom_share=0.0))
    (source / "manifest.csv").unlink()  # a plain folder of scans: each file is one series
    *files, later = sorted(source.rglob("*.nii.gz"))
    later = later.rename(tmp_path / later.name)
    monkeypatch.setattr(voxsearch.embed, "run_embedding", lambda cfg: EmbedSummary(0, 0, 0, 0.0, "m", "p"))
    cfg = SyncConfig(source=str(source), catalog=tmp_path / "catalog", index=tmp_path / "index",
                     checkpoint=tmp_path / "ckpt", ingest_engine="local", progress=False)
    assert sync_round(cfg).added == 5
    return cfg, files, later


def _catalogued(cfg) -> int:
    from voxsearch.ingest import read_catalog

    return read_catalog(cfg.catalog).num_rows


def test_an_emptied_folder_deletes_nothing_unless_allowed(folder_sync, caplog):
    from voxsearch.sync.job import sync_round

    cfg, files, _ = folder_sync
    for path in files:  # an unmounted share looks exactly like this
        path.unlink()
    with caplog.at_level(logging.WARNING):
        report = sync_round(cfg)
    assert (report.deleted, report.deletions_refused, report.failed) == (0, 5, 0), report
    assert "lacks 5 of the 5 known series (all of them)" in caplog.text
    assert _catalogued(cfg) == 5
    report = sync_round(dataclasses.replace(cfg, allow_mass_delete=True))
    assert (report.deleted, report.deletions_refused) == (5, 0) and _catalogued(cfg) == 0


def test_a_round_deletes_at_most_its_share_of_the_known_series(folder_sync):
    from voxsearch.sync.job import sync_round

    cfg, files, later = folder_sync
    files[0].unlink()  # 1 of 5: within the default 20%
    report = sync_round(cfg)
    assert (report.deleted, report.deletions_refused) == (1, 0) and _catalogued(cfg) == 4
    files[1].unlink()
    files[2].unlink()  # 2 of 4: over it, so neither goes, while a new study still comes in
    shutil.copy(later, files[0].parent)
    report = sync_round(cfg)
    assert (report.deleted, report.deletions_refused, report.added) == (0, 2, 1), report
    assert _catalogued(cfg) == 5
    report = sync_round(dataclasses.replace(cfg, max_delete_share=0.5))
    assert (report.deleted, report.deletions_refused) == (2, 0) and _catalogued(cfg) == 3


# ---- a real Orthanc ---------------------------------------------------------------------------------------
# Two embedding rounds on Ray (~80 s here): the guard itself is covered above on a folder source.
@pytest.mark.slow
@pytest.mark.skipif(available() is not None, reason=str(available()))
def test_an_emptied_pacs_deletes_nothing_unless_allowed(ray_session, orthanc, pacs_archive, tmp_path, caplog):
    from embed_testlib import ids_of, make_checkpoint
    from voxsearch.sync.job import SyncConfig, sync_round
    from voxsearch.ingest import read_catalog
    from voxsearch.ingest.dicomweb import Mirror

    first, later = pacs_archive["studies"][0], pacs_archive["studies"][1]
    _only(orthanc, first)
    cfg = SyncConfig(source=orthanc.dicomweb, catalog=tmp_path / "catalog", index=tmp_path / "index",
                     checkpoint=make_checkpoint(tmp_path / "ckpt"), progress=False, ingest_engine="local")
    r1 = sync_round(cfg)
    assert (r1.added, r1.failed) == (1, 0), r1
    [series] = read_catalog(cfg.catalog).column("series_id").to_pylist()

    orthanc.delete_study(first["study_uid"])  # the PACS now lists nothing: restarted empty, or really emptied
    orthanc.studies_uploaded = []
    with caplog.at_level(logging.WARNING):
        refused = sync_round(cfg)
    assert (refused.deleted, refused.deletions_refused, refused.failed) == (0, 1, 0), refused
    assert "lacks 1 of the 1 known series (all of them)" in caplog.text and "--allow-mass-delete" in caplog.text
    assert VectorIndex.load(cfg.index).ids() == [series] and ids_of(cfg.embeddings) == [series]
    assert read_catalog(cfg.catalog).column("series_id").to_pylist() == [series]
    assert Mirror(cfg.mirror).present() == {series}

    allowed = sync_round(dataclasses.replace(cfg, allow_mass_delete=True))
    assert (allowed.deleted, allowed.deletions_refused, allowed.failed, allowed.index_size) == (1, 0, 0, 0), allowed
    empty = VectorIndex.load(cfg.index)
    assert len(empty) == 0 and empty.search(np.ones((1, empty.dim), np.float32), k=5) == [[]]
    assert read_catalog(cfg.catalog).num_rows == 0 and ids_of(cfg.embeddings) == []
    assert Mirror(cfg.mirror).present() == set()

    _upload(orthanc, later)
    orthanc.studies_uploaded = [later["study_uid"]]
    r4 = sync_round(cfg)
    assert (r4.added, r4.deleted, r4.failed, r4.index_size) == (1, 0, 0, 1), r4
    assert VectorIndex.load(cfg.index).ids() == read_catalog(cfg.catalog).column("series_id").to_pylist()
