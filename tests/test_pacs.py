"""A real Orthanc PACS over DICOMweb: mirror, faults, and the sync round that feeds the served index."""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from embed_testlib import make_checkpoint
from orthanc_server import PASSWORD, USER, FaultProxy, Orthanc, available

pytestmark = pytest.mark.skipif(available() is not None, reason=str(available()))


@pytest.fixture(scope="module")
def pacs_archive(tmp_path_factory) -> dict:
    """Synthetic studies written as DICOM series with planted fake patient identifiers."""
    from voxsearch.ingest import SynthConfig, generate_archive

    root = generate_archive(SynthConfig(n=3, seed=11, out=tmp_path_factory.mktemp("pacs") / "archive",
                                        size="tiny", dicom_share=1.0))
    series = sorted(p.parent for p in root.rglob("*.dcm"))
    folders = sorted(set(series))
    studies, planted = [], set()
    for folder in folders:
        ds = pydicom.dcmread(next(folder.glob("*.dcm")), stop_before_pixels=True)
        studies.append({"folder": folder, "study_uid": ds.StudyInstanceUID, "series_uid": ds.SeriesInstanceUID})
        planted |= {str(ds.PatientName), str(ds.PatientID), str(ds.PatientBirthDate), str(ds.AccessionNumber)}
        planted |= set(str(ds.PatientName).split("^"))
    assert len(studies) == 3
    return {"root": root, "studies": studies, "planted": {p for p in planted if len(p) >= 4}}


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory, monkeypatch_module):
    with Orthanc(tmp_path_factory.mktemp("orthanc")) as server:
        monkeypatch_module.setenv("VOXSEARCH_DICOMWEB_USER", USER)
        monkeypatch_module.setenv("VOXSEARCH_DICOMWEB_PASSWORD", PASSWORD)
        yield server


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def _upload(orthanc: Orthanc, study: dict) -> None:
    orthanc.upload(sorted(study["folder"].glob("*.dcm")))


def _config(url: str, **kw):
    from voxsearch.ingest.dicomweb import DicomWebConfig

    return DicomWebConfig(url=url, salt="pacs-test-salt", backoff_s=0.05, **kw)


def _only(orthanc, study):
    """Orthanc holding exactly this study."""
    for other in orthanc.studies_uploaded if hasattr(orthanc, "studies_uploaded") else []:
        orthanc.delete_study(other)
    _upload(orthanc, study)
    orthanc.studies_uploaded = [study["study_uid"]]


def test_pacs_series_gives_the_same_tensor_as_the_folder(orthanc, pacs_archive, tmp_path):
    from voxsearch.ingest import PreprocessConfig, preprocess_path
    from voxsearch.ingest.dicomweb import Mirror

    study = pacs_archive["studies"][0]
    _only(orthanc, study)
    mirror = Mirror(tmp_path / "mirror")
    result = mirror.pull(_config(orthanc.dicomweb), progress=False)
    assert len(result.added) == 1 and not result.errors
    cfg = PreprocessConfig(spatial_size=(32, 64, 64))
    pulled = preprocess_path(mirror.series_dir / result.added[0], cfg)
    direct = preprocess_path(study["folder"], cfg)
    assert pulled.shape == (1, 32, 64, 64)
    assert np.array_equal(pulled, direct)
    # De-identified on the way in: no planted identifier in any mirrored byte.
    blob = b"".join(p.read_bytes() for p in mirror.root.rglob("*") if p.is_file())
    for ident in pacs_archive["planted"]:
        assert ident.encode() not in blob, "identifier reached the mirror"
    # A second pass with nothing new fetches nothing.
    again = mirror.pull(_config(orthanc.dicomweb), progress=False)
    assert again.added == again.changed == again.gone == [] and again.listed == 1


@pytest.mark.parametrize("faults", [["503", "503"], ["drop"]], ids=["5xx", "dropped-connection"])
def test_transient_faults_are_retried(orthanc, pacs_archive, tmp_path, faults):
    from voxsearch.ingest.dicomweb import Mirror

    _only(orthanc, pacs_archive["studies"][1])
    with FaultProxy(orthanc.base, faults=faults) as proxy:
        result = Mirror(tmp_path / "mirror").pull(_config(proxy.dicomweb), progress=False)
    assert not result.errors and len(result.added) == 1
    assert len(proxy.seen) == len(faults) + 1  # every fault cost one retry, then it went through


@pytest.mark.parametrize("fault", ["503", "drop"])
def test_persistent_fault_is_an_error_row_and_the_next_pass_recovers(orthanc, pacs_archive, tmp_path, fault, caplog):
    from voxsearch.ingest.dicomweb import Mirror

    study = pacs_archive["studies"][1]
    _only(orthanc, study)
    mirror = Mirror(tmp_path / "mirror")
    with caplog.at_level(logging.INFO), FaultProxy(orthanc.base, always=fault) as proxy:
        failed = mirror.pull(_config(proxy.dicomweb, retries=2), progress=False)
    assert failed.added == [] and len(failed.errors) == 1 and len(proxy.seen) == 3
    study_key, reason = failed.errors[0]
    assert study_key in reason and "after 3 attempts" in reason
    assert study["study_uid"] not in reason and study["series_uid"] not in reason  # hashed ids only
    assert study["study_uid"] not in caplog.text
    recovered = mirror.pull(_config(orthanc.dicomweb), progress=False)
    assert len(recovered.added) == 1 and not recovered.errors


def test_identifiers_nested_in_sequences_do_not_reach_the_mirror(orthanc, pacs_archive, tmp_path):
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid

    from voxsearch.ingest.dicomweb import Mirror

    # A copy of a study under new UIDs (Orthanc keeps one instance per SOPInstanceUID), with an accession
    # number two sequences deep and the patient's name in a private tag.
    original = pacs_archive["studies"][0]
    folder = tmp_path / "planted"
    folder.mkdir()
    study_uid, series_uid = generate_uid(), generate_uid()
    for path in sorted(original["folder"].glob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        issuer, request = Dataset(), Dataset()
        issuer.LocalNamespaceEntityID = "ISSUER-NESTED-4242"
        request.AccessionNumber, request.IssuerOfAccessionNumberSequence = "ACC-NESTED-4242", [issuer]
        ds.RequestAttributesSequence = [request]
        ds.private_block(0x0011, "PLANTED 1.0", create=True).add_new(0x01, "LO", str(ds.PatientName))
        ds.save_as(folder / path.name, enforce_file_format=True)
    _only(orthanc, {"folder": folder, "study_uid": study_uid})
    mirror = Mirror(tmp_path / "mirror")
    result = mirror.pull(_config(orthanc.dicomweb), progress=False)
    assert len(result.added) == 1 and not result.errors
    blob = b"".join(p.read_bytes() for p in mirror.root.rglob("*") if p.is_file())
    for ident in (*pacs_archive["planted"], "ACC-NESTED-4242", "ISSUER-NESTED-4242", study_uid, series_uid):
        assert ident.encode() not in blob, f"{ident!r} reached the mirror"


def test_credentials_never_in_the_url(orthanc):
    from voxsearch.ingest import IngestError
    from voxsearch.ingest.dicomweb import connect

    with pytest.raises(IngestError, match="environment"):
        connect(_config(orthanc.dicomweb.replace("http://", f"http://{USER}:{PASSWORD}@")))


def _search_ids(client, query: str) -> list[str]:
    body = client.post("/api/v1/search/text", json={"query": query, "k": 20})
    assert body.status_code == 200, body.text
    return [r["series_id"] for r in body.json()["results"]]


def _wait_for(predicate, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return predicate()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sync_makes_a_pacs_study_searchable_then_removes_it(ray_session, orthanc, pacs_archive, tmp_path, caplog):
    import httpx

    from voxsearch.sync.job import SyncConfig, sync_round
    from voxsearch.index import VectorIndex
    from voxsearch.ingest import read_catalog
    from voxsearch.serve.app import start, stop
    from voxsearch.serve.config import DeploymentOptions, Deployments, ServeConfig

    first, second = pacs_archive["studies"][0], pacs_archive["studies"][2]
    _only(orthanc, first)
    ckpt = make_checkpoint(tmp_path / "ckpt")
    # The served app below holds a share of the 2 test CPUs: the embedding tasks must fit beside it. The
    # study deleted at the end is half of the two known: over the default share a round may delete.
    cfg = SyncConfig(source=orthanc.dicomweb, catalog=tmp_path / "catalog", index=tmp_path / "index",
                     checkpoint=ckpt, progress=False, ingest_engine="local", max_delete_share=0.5,
                     embed_options={"actor_cpus": 0.5, "read_cpus": 0.5})
    with caplog.at_level(logging.INFO):
        r1 = sync_round(cfg)
    assert (r1.added, r1.deleted, r1.failed) == (1, 0, 0), r1
    assert len(VectorIndex.load(cfg.index)) == 1

    # A PACS that does not answer: the round fails and deletes nothing.
    down = sync_round(SyncConfig(source=f"http://127.0.0.1:{_closed_port()}/dicom-web", catalog=cfg.catalog,
                                 index=cfg.index, checkpoint=ckpt, mirror=cfg.mirror, retries=1, progress=False))
    assert down.failed == 1 and down.deleted == 0 and len(VectorIndex.load(cfg.index)) == 1

    small = DeploymentOptions(num_cpus=0.05)
    serve_cfg = ServeConfig(index=str(cfg.index), checkpoint=str(ckpt), catalog=str(cfg.catalog),
                            data_dir=str(tmp_path / "added"), port=_closed_port(), index_poll_s=0.5,
                            app_name="pacs", require_api_key=False,
                            # The searcher and the study store as deployments of their own (the suite's
                            # other served apps co-locate them with the ingress, the default).
                            colocate_data=False,
                            deployments=Deployments(**{n: small for n in ("ingress", "text_encoder", "image_encoder",
                                                                            "searcher", "studies", "reporter")}))
    url = start(serve_cfg, ready_timeout_s=240)
    client = httpx.Client(base_url=url, timeout=120)
    try:
        before = _search_ids(client, "liver lesion")
        assert len(before) == 1
        _upload(orthanc, second)
        orthanc.studies_uploaded.append(second["study_uid"])
        r2 = sync_round(cfg)
        assert (r2.added, r2.deleted, r2.failed) == (1, 0, 0), r2
        # Taken from the catalog, not from a search: the searcher may already serve the new version.
        added = {r["series_id"] for r in read_catalog(cfg.catalog).to_pylist()} - set(before)
        assert len(added) == 1, added
        new_id = added.pop()
        # Found through the served API without a restart: the searcher picks up the new index version.
        assert _wait_for(lambda: new_id in _search_ids(client, "chest CT with a nodule"))

        orthanc.delete_study(second["study_uid"])
        orthanc.studies_uploaded.remove(second["study_uid"])
        r3 = sync_round(cfg)
        assert (r3.added, r3.deleted, r3.failed) == (0, 1, 0), r3
        assert _wait_for(lambda: new_id not in _search_ids(client, "chest CT with a nodule"))
        assert [r["series_id"] for r in read_catalog(cfg.catalog).to_pylist()] != [new_id]
        assert len(read_catalog(cfg.catalog)) == 1 and len(VectorIndex.load(cfg.index)) == 1
    finally:
        client.close()
        stop(serve_cfg)

    # No planted identifier in the catalog, the index, the embeddings or the logs.
    stored = b"".join(p.read_bytes() for d in (cfg.catalog, cfg.index, cfg.embeddings) for p in d.rglob("*")
                      if p.is_file())
    for ident in pacs_archive["planted"]:
        assert ident.encode() not in stored and ident not in caplog.text


def _start_sync(ray, orthanc, cfg, log_path: Path):
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "voxsearch.cli", "sync", orthanc.dicomweb, "--catalog", str(cfg.catalog),
           "--index", str(cfg.index), "--checkpoint", str(cfg.checkpoint),
           "--ray-address", ray.get_runtime_context().gcs_address]
    with open(log_path, "ab") as log:  # a file, not a pipe nobody reads
        return subprocess.Popen(cmd, env=dict(os.environ), start_new_session=True, stdout=log, stderr=subprocess.STDOUT)


# Each case is a full sync driver plus a rerun (~1-2 min here); the embed kill is also covered by
# test_embed_resume, so only the fetch kill runs by default.
@pytest.mark.parametrize("stage", ["fetch", pytest.param("ingest", marks=pytest.mark.slow),
                                   pytest.param("embed", marks=pytest.mark.slow)])
def test_sync_killed_at_any_stage_then_rerun_holds_each_study_once(ray_session, orthanc, pacs_archive, tmp_path,
                                                                     stage):
    """SIGKILL a real `voxsearch sync` driver while it fetches, ingests or embeds; the next round must end with
    every PACS series exactly once in the mirror, the catalog, the embeddings and the index."""
    import signal

    from test_embed_resume import _kill_tree

    from embed_testlib import ids_of
    from voxsearch.sync.job import SyncConfig, sync_round
    from voxsearch.index import VectorIndex
    from voxsearch.ingest import read_catalog

    for uid in list(getattr(orthanc, "studies_uploaded", [])):
        orthanc.delete_study(uid)
    for study in pacs_archive["studies"]:
        _upload(orthanc, study)
    orthanc.studies_uploaded = [s["study_uid"] for s in pacs_archive["studies"]]

    cfg = SyncConfig(source=orthanc.dicomweb, catalog=tmp_path / "catalog", index=tmp_path / "index",
                     checkpoint=make_checkpoint(tmp_path / "ckpt"), progress=False)
    reached = {
        # a series folder or its staging folder exists: the driver is inside the fetch loop
        "fetch": lambda: cfg.mirror.joinpath("series").is_dir() and any(cfg.mirror.joinpath("series").iterdir()),
        "ingest": lambda: any(cfg.catalog.rglob("*.parquet")),
        "embed": lambda: any(cfg.embeddings.glob("part-*.parquet")),
    }[stage]
    log_path = tmp_path / "sync.log"
    proc = _start_sync(ray_session, orthanc, cfg, log_path)
    deadline = time.monotonic() + 300
    while not reached():
        if proc.poll() is not None:
            pytest.skip(f"the round finished before the {stage} stage could be interrupted") if proc.returncode == 0 \
                else pytest.fail(f"sync exited {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        assert time.monotonic() < deadline, f"sync never reached {stage}"
        time.sleep(0.01)
    _kill_tree(proc)
    assert proc.returncode == -signal.SIGKILL

    report = sync_round(cfg)
    assert report.failed == 0, report
    expected = 3
    mirrored = sorted(p.name for p in cfg.mirror.joinpath("series").iterdir())
    assert len(mirrored) == expected and not any(n.startswith(".") or n.endswith(".old") for n in mirrored)
    catalog_ids = read_catalog(cfg.catalog).column("series_id").to_pylist()
    assert sorted(catalog_ids) == mirrored, "catalog and mirror disagree"
    embedded = ids_of(cfg.embeddings)
    assert sorted(embedded) == mirrored, "a series was embedded twice or not at all"
    assert sorted(VectorIndex.load(cfg.index).ids()) == mirrored, "the index holds a series twice or misses one"
    again = sync_round(cfg)
    assert (again.added, again.changed, again.deleted, again.failed) == (0, 0, 0, 0), again
