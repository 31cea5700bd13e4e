"""What the server lets out and what it keeps: errors, logs, added studies, a catalog that changes.

Unit tests of the ingress's own functions (no Serve): reader failures answer with the failure class and
an error id while the log holds the scrubbed cause; /embed stores text scrubbed of the upload's header
identifiers, durably; the study catalog follows the catalog on disk without a restart.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import pytest

import serve_testlib
from voxsearch.serve.config import Limits

PATIENT = "Wu^Li"
PATIENT_ID = "PID-88231"
PLANTED = b"DOE JOHN"


def dicom_series_zip(rescale_slope: bytes | None = None, slices: int = 6, size: int = 24, seed: int = 0) -> bytes:
    """A zipped CT series whose headers name PATIENT; `rescale_slope` plants raw header text."""
    hu = np.random.default_rng(seed).integers(-124, 176, (size, size, slices))
    return serve_testlib.dicom_series_zip(hu, (PATIENT, PATIENT_ID, "19491231"), rescale_slope=rescale_slope)


def _nifti_gz(array: np.ndarray, affine: np.ndarray) -> bytes:
    import gzip

    import nibabel as nib

    return gzip.compress(nib.Nifti1Image(array, affine).to_bytes())


def _refuse(data: bytes, upload_dir: Path):
    """Run an upload through read_upload and, as the app would, its refusal through the error handler."""
    from voxsearch.serve import api
    from voxsearch.serve.errors import PublicError

    with pytest.raises(PublicError) as refused:
        asyncio.run(api.read_upload(io.BytesIO(data), None, [], Limits(), str(upload_dir)))
    response = asyncio.run(api.public_error(None, refused.value))
    return response.status_code, response.body.decode()


@pytest.fixture
def serve_log(caplog):
    from voxsearch.serve.errors import scrub_library_logs

    scrub_library_logs()  # as the ingress and the study store do at start
    caplog.set_level(logging.INFO)
    return caplog


def test_dicom_header_text_in_a_reader_error_stays_out_of_response_and_log(tmp_path, serve_log):
    status, text = _refuse(dicom_series_zip(rescale_slope=PLANTED), tmp_path)
    body = json.loads(text)
    assert status == 422
    assert "could not be read as a DICOM series" in body["detail"]
    assert re.fullmatch(r"[0-9a-f]{12}", body["error_id"])
    assert PLANTED.decode() not in text and str(tmp_path) not in text and "/" not in body["detail"]
    # The operator finds the cause under the id; the header value is not in any record (pydicom's own
    # warning about the invalid value included).
    ours = [r.getMessage() for r in serve_log.records if body["error_id"] in r.getMessage()]
    assert ours and "ValueError" in ours[0]
    assert PLANTED.decode() not in serve_log.text
    assert str(tmp_path) not in serve_log.text
    assert list(tmp_path.iterdir()) == []  # the upload was deleted


def test_nifti_reader_error_names_no_server_path(tmp_path, serve_log):
    # A header that passes the upload checks over voxels the reader refuses, with a message that starts
    # with the file's path on the server.
    status, text = _refuse(_nifti_gz(np.full((8, 8, 8), np.nan, np.float32), np.eye(4)), tmp_path)
    body = json.loads(text)
    assert status == 422 and "could not be read as a NIfTI volume" in body["detail"]
    assert str(tmp_path) not in text and "upload.nii" not in text
    assert body["error_id"] in serve_log.text
    assert str(tmp_path) not in serve_log.text and "upload.nii" not in serve_log.text


def test_backend_failures_keep_paths_and_header_text_to_the_log(tmp_path, serve_log):
    from fastapi import HTTPException

    from voxsearch.ingest import IngestError
    from voxsearch.serve import api
    from voxsearch.serve.render import RenderError
    from voxsearch.serve.studies import StudyNotFound

    source = tmp_path / "Doe John" / "ct"
    failure = api.backend_failure(IngestError(f"{source}: no such file or folder"))
    response = asyncio.run(api.public_error(None, failure))
    body = json.loads(response.body)
    assert response.status_code == 400 and "Doe John" not in response.body.decode()
    assert body["error_id"] in serve_log.text and "Doe John" not in serve_log.text

    crashed = api.backend_failure(RuntimeError("could not convert string to float: 'DOE JOHN'"))
    response = asyncio.run(api.public_error(None, crashed))
    assert response.status_code == 500 and "DOE JOHN" not in response.body.decode()
    assert "DOE JOHN" not in serve_log.text

    # Our own words about what the client asked for pass through.
    gone = api.backend_failure(StudyNotFound("s-1"))
    assert isinstance(gone, HTTPException) and gone.status_code == 404 and "s-1" in gone.detail
    out_of_range = api.backend_failure(RenderError("slice 99 is out of range for the axial plane (0..9)"))
    assert out_of_range.status_code == 400 and "slice 99" in out_of_range.detail

    # Another writer holding the index past the lock timeout is a retryable 503, not a 400 naming the folder.
    from voxsearch.index.errors import IndexLockTimeout

    busy = api.backend_failure(IndexLockTimeout(f"{source}/index: the write lock was not free in 30 s"))
    response = asyncio.run(api._http_error(None, busy))
    assert response.status_code == 503 and response.headers["retry-after"] == "5"
    assert "Doe" not in response.body.decode()


def test_embed_stores_the_report_scrubbed_of_the_uploads_header_identifiers(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    from voxsearch.serve import api
    from voxsearch.serve.added_studies import AddedStudies

    upload = asyncio.run(api.read_upload(io.BytesIO(dicom_series_zip()), None, [], Limits(), str(tmp_path)))
    assert PATIENT in upload.identifiers
    row = api.added_row(upload, f"Patient Wu, Li ({PATIENT_ID}) has a 2 cm lesion in segment IV.", "chest")
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    added = AddedStudies(tmp_path / "added")
    added.add(row, upload.volume.array, upload.volume.spacing)

    stored = pq.read_table(added.table_path).to_pylist()
    assert len(stored) == 1 and "lesion in segment IV" in stored[0]["report"]
    text = " ".join(str(v) for v in stored[0].values())
    assert not re.search(r"\b(Wu|Li)\b", text) and PATIENT_ID not in text
    assert synced  # the volume and the table reach the disk before they are renamed into place
    assert not [p for p in added.directory.rglob("*") if p.name.startswith(".") and p.name != ".lock"]


def _catalog_rows(tmp_path: Path, ids: list[str]) -> list[dict]:
    import nibabel as nib

    rows = []
    for i, sid in enumerate(ids):
        path = tmp_path / "scans" / f"{sid}.nii.gz"
        path.parent.mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(np.full((6, 6, 4), i, np.int16), np.eye(4)), path)
        rows.append({"series_id": sid, "study_id": f"study-{sid}", "source_path": str(path), "source_format": "nifti",
                     "modality": "CT", "report": f"report of {sid}", "split": "test"})
    return rows


def _write_catalog(root: Path, run_id: str, rows: list[dict]) -> None:
    from voxsearch.ingest.catalog import CatalogWriter, now_utc

    writer = CatalogWriter(root, run_id)
    for row in rows:
        writer.add_row({**row, "ingested_at": now_utc(), "run_id": run_id})
    writer.close({"rows": len(rows)})


def test_study_catalog_follows_studies_removed_and_added_on_disk(tmp_path):
    from voxsearch.ingest.forget import forget_series
    from voxsearch.serve.studies import StudyCatalog, StudyNotFound

    root = tmp_path / "catalog"
    first = _catalog_rows(tmp_path, ["s-1", "s-2"])
    _write_catalog(root, "run-1", first)
    studies = StudyCatalog(root, tmp_path / "added", check_s=0)
    assert studies.slices("s-1")  # decoded and cached
    assert set(studies.describe_many(["s-1", "s-2"])) == {"s-1", "s-2"}

    forget_series(root, ["s-1"])  # what sync does when the source deleted the series
    assert not studies.has("s-1")
    assert set(studies.describe_many(["s-1", "s-2"])) == {"s-2"}  # search hits lose its details
    with pytest.raises(StudyNotFound):
        studies.slices("s-1")  # not even from the volume cache
    with pytest.raises(StudyNotFound):
        studies.public("s-1", with_report=True)

    _write_catalog(root, "run-2", _catalog_rows(tmp_path, ["s-3"]))
    assert studies.public("s-3", with_report=True)["report"] == "report of s-3"
    assert studies.filter_values()["split"] == ["test"] and len(studies) == 2


def test_study_catalog_checks_the_disk_at_most_every_check_s(tmp_path):
    from voxsearch.ingest.forget import forget_series
    from voxsearch.serve.studies import StudyCatalog

    root = tmp_path / "catalog"
    _write_catalog(root, "run-1", _catalog_rows(tmp_path, ["s-1", "s-2"]))
    studies = StudyCatalog(root, tmp_path / "added", check_s=3600)
    forget_series(root, ["s-1"])
    assert studies.has("s-1") and studies.reloads == 0  # not due yet: no listing per request
    assert studies.refresh() and not studies.has("s-1")
    assert not studies.refresh()  # unchanged since: nothing re-read
