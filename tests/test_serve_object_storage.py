"""`voxsearch serve` with its index and catalog on s3://: the searcher's IndexHolder and the study store's
StudyCatalog used directly (no Ray), against moto's S3 server on 127.0.0.1 (the `bucket` fixture is in
conftest.py)."""

from __future__ import annotations

import numpy as np
import pytest

from index_testlib import clustered_vectors
from voxsearch.common.storage import location
from voxsearch.index import IndexConfig, IndexFormatError, VectorIndex, update_index
from voxsearch.serve.index_holder import IndexHolder

pytestmark = pytest.mark.timeout(60)
DIM = 16


def _index(n: int = 200, seed: int = 0) -> VectorIndex:
    return VectorIndex.build([f"s{seed}-{i}" for i in range(n)], clustered_vectors(n, DIM, 6, seed=seed),
                             config=IndexConfig(factory="Flat"))


def _ids(holder: IndexHolder, queries: np.ndarray) -> list[list[tuple[str, float]]]:
    return [[(h["id"], round(h["score"], 5)) for h in row] for row in holder.search(queries, 5, None)]


def test_holder_on_s3_serves_what_the_local_copy_serves(bucket, tmp_path):
    index, prefix = _index(), f"{bucket}/indexes/main"
    index.save(tmp_path / "local")
    index.save(prefix)
    remote, local = IndexHolder(prefix), IndexHolder(tmp_path / "local")
    queries = clustered_vectors(6, DIM, 6, seed=9)
    assert _ids(remote, queries) == _ids(local, queries)
    assert remote.query(None, 5, None, from_id="s0-7")["hits"] == local.query(None, 5, None, from_id="s0-7")["hits"]
    assert remote.version == VectorIndex.load(prefix).version and remote.version.startswith("v000001-")
    assert remote.info()["size"] == 200 and str(remote.directory) == prefix


def test_holder_picks_up_a_version_another_writer_publishes(bucket):
    prefix = f"{bucket}/idx"
    _index().save(prefix)
    holder = IndexHolder(prefix)
    first = holder.version
    assert not holder.reload() and holder.reloads == 1  # nothing new: no download

    new = clustered_vectors(3, DIM, 6, seed=5)
    update_index(prefix, lambda ix: ix.add(["n0", "n1", "n2"], new))  # another replica, or `voxsearch sync`
    assert holder.reload() and holder.version != first and holder.version == VectorIndex.load(prefix).version
    assert [row[0]["id"] for row in holder.search(new, 1, None)] == ["n0", "n1", "n2"]
    assert not holder.reload()


def test_holder_adds_to_an_s3_index_and_serves_its_own_version(bucket):
    prefix = f"{bucket}/idx"
    _index(n=50).save(prefix)
    holder, other = IndexHolder(prefix), IndexHolder(prefix)
    vectors = clustered_vectors(2, DIM, 6, seed=7)
    result = holder.add(["up0", "up1"], vectors, None)
    assert result["added"] == ["up0", "up1"] and result["size"] == 52
    stored = VectorIndex.load(prefix)
    assert {"up0", "up1"} <= set(stored.ids()) and result["version"] == stored.version == holder.version
    assert not holder.reload()  # its own save is what it serves: no second download
    assert other.reload() and other.contains(["up0", "up1"]) == {"up0": True, "up1": True}


def test_missing_s3_index_is_an_error_naming_its_uri(bucket):
    with pytest.raises(IndexFormatError, match=f"no index at {bucket}/nowhere"):
        IndexHolder(f"{bucket}/nowhere")
    with pytest.raises(IndexFormatError, match=f"no index at {bucket}/nowhere"):
        IndexHolder(f"{bucket}/nowhere").add(["x"], clustered_vectors(1, DIM, 6), None)


def test_serve_config_takes_index_and_catalog_uris(bucket, tmp_path, s3_endpoint):
    from voxsearch.serve.config import ServeConfig, ServeConfigError

    prefix = f"{bucket}/idx"
    _index(n=20).save(prefix)
    location(f"{bucket}/catalog/rows/part-a-00000.parquet").write_bytes(b"x")
    (tmp_path / "ckpt").mkdir()

    def config(**fields) -> ServeConfig:
        base = {"index": prefix, "checkpoint": str(tmp_path / "ckpt"), "catalog": f"{bucket}/catalog",
                "data_dir": str(tmp_path / "added")}
        return ServeConfig(**{**base, **fields})

    config().validate()
    with pytest.raises(ServeConfigError, match=f"index path {bucket}/missing does not exist"):
        config(index=f"{bucket}/missing").validate()
    with pytest.raises(ServeConfigError, match=f"catalog path {bucket}/no-catalog does not exist"):
        config(catalog=f"{bucket}/no-catalog").validate()
    with pytest.raises(ServeConfigError, match="data_dir is required"):
        config(data_dir=None).validate()
    with pytest.raises(ServeConfigError, match="data_dir s3://"):
        config(data_dir=f"{bucket}/added").validate()

    keyed = (f"{bucket}/missing?access_key=AKIDPLANTED&secret_key=planted-secret"
             f"&endpoint_override={s3_endpoint.split('://')[1]}&scheme=http")
    with pytest.raises(ServeConfigError) as failed:
        config(index=keyed).validate()
    assert f"{bucket}/missing" in str(failed.value)
    assert "planted" not in str(failed.value) and "AKID" not in str(failed.value)


# -- the study store -------------------------------------------------------------------------------------
def _volumes(ids: list[str], tmp_path, prefix: str | None = None) -> dict[str, str]:
    """A small NIfTI per series, as a local file or, given `prefix`, an object under it; by series id."""
    import nibabel as nib

    paths = {}
    for i, sid in enumerate(ids):
        local = tmp_path / "scans" / f"{sid}.nii.gz"
        local.parent.mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(np.full((6, 5, 4), i * 100, np.int16), np.eye(4)), local)
        paths[sid] = str(local)
        if prefix:
            paths[sid] = f"{prefix}/{sid}.nii.gz"
            location(paths[sid]).upload(local)
    return paths


def _write_catalog(root, run_id: str, paths: dict[str, str]) -> None:
    from voxsearch.ingest.catalog import CatalogWriter, now_utc

    writer = CatalogWriter(root, run_id)
    for sid, path in paths.items():
        writer.add_row({"series_id": sid, "study_id": f"study-{sid}", "source_path": path, "source_format": "nifti",
                        "modality": "CT", "report": f"report of {sid} in {run_id}", "split": "test",
                        "ingested_at": now_utc(), "run_id": run_id})
    writer.close({"rows": len(paths)})


def test_study_store_on_s3_shows_the_rows_and_pixels_of_the_local_one(bucket, tmp_path):
    from voxsearch.serve.studies import StudyCatalog

    ids = ["s-1", "s-2", "s-3"]
    _write_catalog(tmp_path / "catalog", "run-1", _volumes(ids, tmp_path))
    _write_catalog(f"{bucket}/catalog", "run-1", _volumes(ids, tmp_path, f"{bucket}/scans"))
    local = StudyCatalog(tmp_path / "catalog", tmp_path / "added-local")
    remote = StudyCatalog(f"{bucket}/catalog", tmp_path / "added")
    assert len(remote) == 3 and remote.describe_many(ids + ["nope"]) == local.describe_many(ids)
    assert remote.public("s-2", with_report=True) == local.public("s-2", with_report=True)
    assert remote.filter_values() == local.filter_values()
    assert remote.slices("s-3") == local.slices("s-3")  # the volume fetched from the bucket
    assert remote.render("s-3", "axial", 1, None, 64) == local.render("s-3", "axial", 1, None, 64)


def test_study_store_follows_a_catalog_replaced_on_s3(bucket, tmp_path):
    from voxsearch.ingest.catalog import ROWS_DIR
    from voxsearch.serve.studies import StudyCatalog

    root = f"{bucket}/catalog"
    _write_catalog(root, "run-1", _volumes(["s-1", "s-2"], tmp_path, f"{bucket}/scans"))
    studies = StudyCatalog(root, tmp_path / "added", check_s=3600)
    assert not studies.refresh()  # unchanged: nothing read again

    (location(root) / ROWS_DIR).delete_tree()  # another writer replaces the catalog's rows
    _write_catalog(root, "run-2", _volumes(["s-3"], tmp_path, f"{bucket}/scans"))
    assert studies.refresh() and studies.reloads == 1
    assert not studies.has("s-1") and studies.public("s-3", with_report=True)["report"] == "report of s-3 in run-2"
    assert not studies.refresh()


def test_study_store_follows_a_catalog_that_is_one_s3_object(bucket, tmp_path):
    from voxsearch.common.storage import write_parquet
    from voxsearch.ingest.catalog import now_utc, rows_table
    from voxsearch.serve.studies import StudyCatalog

    def rows(ids: list[str]) -> list[dict]:
        return [{"series_id": sid, "modality": "MR", "ingested_at": now_utc()} for sid in ids]

    table = location(f"{bucket}/exports/catalog.parquet")
    write_parquet(table, rows_table(rows(["a"])))
    studies = StudyCatalog(table.uri, tmp_path / "added", check_s=0)
    assert list(studies.rows) == ["a"] and not studies.refresh()
    write_parquet(table, rows_table(rows(["a", "b"])))
    assert studies.has("b") and studies.reloads == 1
