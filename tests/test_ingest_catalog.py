"""Catalog: Ray ingest of the tiny archive, de-identification, bad inputs, incremental runs."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from test_ingest_helpers import phantom_hu, save_nifti, write_axial_dicom
from voxsearch.ingest import (
    IngestConfig,
    PreprocessConfig,
    SynthConfig,
    generate_archive,
    load_volume,
    read_catalog,
    read_errors,
    run_ingest,
)
from voxsearch.ingest.catalog import read_all_rows

REQUIRED = ["study_id", "series_id", "patient_key", "source_path", "source_format", "file_sha256", "content_sha256",
            "modality",
            "body_part", "shape", "spacing", "orientation", "report", "split", "findings", "abnormal", "study_date",
            "schema_version"]


def _identifiers(archive) -> set[str]:
    """Every planted identifier: manifest patient ids and the DICOM header PN/ID/birth date."""
    import pydicom

    found = set()
    with open(archive / "manifest.csv", newline="") as fh:
        found |= {r["patient_id"] for r in csv.DictReader(fh)}
    for dcm in archive.rglob("*.dcm"):
        try:
            ds = pydicom.dcmread(dcm, stop_before_pixels=True)
        except Exception:
            continue
        found |= {str(ds.PatientName), str(ds.PatientName).replace("^", " "), ds.PatientID, ds.PatientBirthDate}
        found |= {part for part in str(ds.PatientName).split("^") if len(part) > 3}
    return {f for f in found if f}


def _catalog_text(out) -> str:
    rows = read_all_rows(out).to_pylist() + read_errors(out, all_runs=True).to_pylist()
    return json.dumps(rows, default=str) + (out / "catalog.json").read_text()


def _assert_no_identifiers(text: str, identifiers: set[str]):
    leaked = sorted(i for i in identifiers if i.lower() in text.lower())
    assert not leaked, f"identifiers leaked: {leaked}"


def test_tiny_catalog_rows_and_columns(tiny_catalog):
    table = read_catalog(tiny_catalog)
    assert table.num_rows == 24
    assert set(REQUIRED) <= set(table.column_names)
    rows = table.to_pylist()
    assert len({r["series_id"] for r in rows}) == 24
    assert {r["schema_version"] for r in rows} == {2}
    assert {r["split"] for r in rows} <= {"train", "validation", "test"}
    assert {r["source_format"] for r in rows} == {"nifti", "dicom"}
    split_of = {}
    for r in rows:
        assert split_of.setdefault(r["patient_key"], r["split"]) == r["split"]
        assert r["modality"] in ("CT", "MR") and len(r["shape"]) == 3 and len(r["spacing"]) == 3
        assert r["report"] and isinstance(r["abnormal"], bool)
        json.loads(r["findings"])
    assert len(split_of) < 24  # studies share patients through the salted patient_key
    assert pq.read_schema(next((tiny_catalog / "rows").glob("part-*.parquet"))).metadata[b"voxsearch_schema_version"] == b"2"


def test_tiny_catalog_rows_load_as_model_input(tiny_catalog):
    rows = read_catalog(tiny_catalog).to_pylist()
    cfg = PreprocessConfig(spatial_size=(16, 32, 32))
    for fmt in ("dicom", "nifti"):
        row = next(r for r in rows if r["source_format"] == fmt)
        x = load_volume(row, cfg)
        assert x.shape == (1, 16, 32, 32) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1 and x.std() > 0.05
        assert load_volume(row, cfg).tobytes() == x.tobytes()


def test_tiny_catalog_holds_no_patient_identifiers(tiny_catalog, synth_archive):
    identifiers = _identifiers(synth_archive)
    assert any("^" in i for i in identifiers)  # the DICOM share really planted names
    _assert_no_identifiers(_catalog_text(tiny_catalog), identifiers)


@pytest.fixture(scope="module")
def mixed_archive(tmp_path_factory):
    return generate_archive(SynthConfig(n=8, seed=11, out=tmp_path_factory.mktemp("mixed") / "a", size="tiny",
                                        dicom_share=0.25, m3d_share=0.25, bad_files=7))


def test_cli_ingest_mixed_archive_with_planted_defects(mixed_archive, tmp_path, caplog, capsys):
    from voxsearch.cli import main

    out = tmp_path / "cat"
    with caplog.at_level(logging.DEBUG):
        code = main(["ingest", str(mixed_archive), "--out", str(out), "--engine", "local", "--no-progress"])
    printed = capsys.readouterr()
    assert code == 1  # some inputs failed
    summary = json.loads(printed.out[: printed.out.index("\n}") + 2])
    defects = json.loads((mixed_archive / "planted_defects.json").read_text())
    n_errors = sum(d["expect"] == "error" for d in defects)
    assert summary["failed"] == n_errors and summary["added"] == 9 and summary["warnings"] == 1
    errors = read_errors(out).to_pylist()
    for d in defects:
        mine = [e for e in errors if e["path"] == str((mixed_archive / d["path"]).resolve())]
        assert mine, f"no error row for planted {d['defect']}"
        assert {e["severity"] for e in mine} == {d["expect"]}
        assert all(e["reason"] and e["stage"] in ("read", "validate", "preprocess", "report") for e in mine)
    table = read_catalog(out)
    assert table.num_rows == 9
    assert set(table.column("source_format").to_pylist()) == {"nifti", "dicom", "npy"}
    missing = [r for r in table.to_pylist() if "missing_report" in r["source_path"]]
    assert len(missing) == 1 and missing[0]["report"] is None
    identifiers = _identifiers(mixed_archive)
    _assert_no_identifiers(_catalog_text(out), identifiers)
    _assert_no_identifiers(caplog.text + printed.out + printed.err, identifiers)


def test_incremental_runs_add_only_new_or_changed(tmp_path):
    archive = tmp_path / "arch"
    archive.mkdir()
    for i in range(3):
        save_nifti(archive / f"v{i}.nii.gz", phantom_hu(seed=i), np.eye(4))
    write_axial_dicom(archive / "series1", phantom_hu(seed=9))
    out = tmp_path / "cat"
    cfg = IngestConfig(archive=archive, out=out, engine="local", progress=False, salt="s")
    first = run_ingest(cfg)
    assert (first.added, first.skipped, first.failed, first.warnings) == (4, 0, 0, 4)  # no reports
    ids = sorted(read_catalog(out).column("series_id").to_pylist())
    second = run_ingest(cfg)
    assert (second.added, second.skipped) == (0, 4)
    assert read_all_rows(out).num_rows == 4
    save_nifti(archive / "v1.nii.gz", phantom_hu(seed=42), np.eye(4))  # changed content, same series
    save_nifti(archive / "copy.nii.gz", phantom_hu(seed=0), np.eye(4))  # same bytes as v0: a duplicate
    third = run_ingest(cfg)
    assert third.added == 1 and third.skipped == 4
    table = read_catalog(out)
    assert sorted(table.column("series_id").to_pylist()) == ids  # replaced, not duplicated
    assert read_all_rows(out).num_rows == 5
    assert len(json.loads((out / "catalog.json").read_text())["runs"]) == 3
    # A new salt would change every id: the salt is fixed per catalog.
    assert run_ingest(IngestConfig(archive=archive, out=tmp_path / "cat2", engine="local", progress=False,
                                   salt="other")).added == 4
    assert not set(read_catalog(tmp_path / "cat2").column("series_id").to_pylist()) & set(ids)


def test_schema_1_catalog_is_read_and_stays_incremental(tmp_path):
    """Schema 1 rows hold the file hash in content_sha256 and no file_sha256: a rerun still skips them."""
    archive = tmp_path / "arch"
    archive.mkdir()
    save_nifti(archive / "v0.nii.gz", phantom_hu(seed=0), np.eye(4))
    write_axial_dicom(archive / "series1", phantom_hu(seed=9))
    out = tmp_path / "cat"
    cfg = IngestConfig(archive=archive, out=out, engine="local", progress=False, salt="s")
    run_ingest(cfg)
    file_hashes = {}
    for shard in (out / "rows").glob("part-*.parquet"):
        table = pq.read_table(shard)
        file_hashes.update(zip(table.column("series_id").to_pylist(), table.column("file_sha256").to_pylist()))
        table = table.set_column(table.schema.get_field_index("content_sha256"), "content_sha256",
                                 table.column("file_sha256")).drop_columns(["file_sha256"])
        table = table.set_column(table.schema.get_field_index("schema_version"), "schema_version",
                                 pa.array([1] * table.num_rows, pa.int32()))
        pq.write_table(table.replace_schema_metadata({"voxsearch_schema_version": "1"}), shard)
    meta = json.loads((out / "catalog.json").read_text())
    (out / "catalog.json").write_text(json.dumps({**meta, "schema_version": 1}))

    old = {r["series_id"]: r for r in read_catalog(out).to_pylist()}
    assert {sid: r["file_sha256"] for sid, r in old.items()} == file_hashes
    assert all(r["content_sha256"] == r["file_sha256"] for r in old.values())
    again = run_ingest(cfg)
    assert (again.added, again.skipped) == (0, 2)
    save_nifti(archive / "v1.nii.gz", phantom_hu(seed=1), np.eye(4))
    assert run_ingest(cfg).added == 1
    rows = read_catalog(out).to_pylist()
    new = [r for r in rows if r["series_id"] not in old]
    assert len(new) == 1 and new[0]["schema_version"] == 2 and new[0]["content_sha256"] != new[0]["file_sha256"]
    assert {r["series_id"]: r["content_sha256"] for r in rows if r["series_id"] in old} == file_hashes


def test_manifest_parquet_extras_reports_and_auto_split(tmp_path):
    archive = tmp_path / "arch"
    archive.mkdir()
    for i in range(4):
        save_nifti(archive / f"v{i}.nii.gz", phantom_hu(seed=i), np.eye(4))
    (archive / "v0.txt").write_text("HISTORY: Fell at home.\nFINDINGS: Small cyst.\nIMPRESSION: Cyst.\n")
    pq.write_table(pa.table({
        "path": [f"v{i}.nii.gz" for i in range(4)],
        "report": [None, "FINDINGS: normal", "normal", "normal"],
        "patient_id": ["P1", "P1", "P2", "P3"],
        "patient_name": ["SHOULD^NOTLEAK", "SHOULD^NOTLEAK", "X^Y", "Z^W"],
        "site": ["north", "north", "south", "east"],
        "window_center": [None, 50.0, None, None],
        "window_width": [None, 350.0, None, None],
    }), archive / "manifest.parquet")
    out = tmp_path / "cat"
    summary = run_ingest(IngestConfig(archive=archive, out=out, engine="local", progress=False, salt="s",
                                      keep_columns=("site",)))
    assert summary.added == 4 and summary.failed == 0
    rows = {r["source_path"].rsplit("/", 1)[1]: r for r in read_catalog(out).to_pylist()}
    assert rows["v0.nii.gz"]["report"] == "FINDINGS: Small cyst.\nIMPRESSION: Cyst."  # history dropped
    assert rows["v1.nii.gz"]["site"] == "north" and rows["v1.nii.gz"]["window_width"] == 350.0
    assert rows["v0.nii.gz"]["patient_key"] == rows["v1.nii.gz"]["patient_key"] != rows["v2.nii.gz"]["patient_key"]
    assert rows["v0.nii.gz"]["split"] == rows["v1.nii.gz"]["split"]
    assert "patient_name" not in read_catalog(out).column_names and "NOTLEAK" not in _catalog_text(out)


def test_interrupted_shard_write_leaves_catalog_readable(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    archive = tmp_path / "arch"
    archive.mkdir()
    save_nifti(archive / "a.nii.gz", phantom_hu(seed=1), np.eye(4))
    out = tmp_path / "cat"
    run_ingest(IngestConfig(archive=archive, out=out, engine="local", progress=False, salt="s"))
    save_nifti(archive / "b.nii.gz", phantom_hu(seed=2), np.eye(4))

    def crash(table, where, **kw):
        where.write(b"PAR1 half a shard")  # the shard's temp file, opened by common.durable.atomic_write
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", crash)
    with pytest.raises(OSError, match="disk full"):
        run_ingest(IngestConfig(archive=archive, out=out, engine="local", progress=False, salt="s"))
    monkeypatch.undo()
    assert read_catalog(out).num_rows == 1  # the half-written temp file is invisible
    again = run_ingest(IngestConfig(archive=archive, out=out, engine="local", progress=False, salt="s"))
    assert again.added == 1 and read_catalog(out).num_rows == 2


def test_discovery_follows_symlinked_folders_once_and_skips_dot_folders(tmp_path):
    import os

    from voxsearch.ingest.discover import discover

    shares = tmp_path / "shares"
    for folder in ("a", "b", "b/.staging"):  # .staging: half-written, not a study
        (shares / folder).mkdir(parents=True)
        save_nifti(shares / folder / "scan.nii.gz", phantom_hu(), np.eye(4))
    archive = tmp_path / "archive"
    archive.mkdir()
    os.symlink(shares / "a", archive / "a")
    os.symlink(shares / "b", archive / "b")
    os.symlink(archive, shares / "a" / "loop")  # a link loop must end
    found = sorted(Path(i["source_path"]).parent.name for i in discover(archive, salt="s").items)
    assert found == ["a", "b"]
