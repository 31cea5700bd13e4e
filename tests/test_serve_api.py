"""The serving app over HTTP on loopback: every endpoint, every bad-input class, index hot swap, the page.

One app serves the whole module (Serve start-up costs ~20 s): a random-weight nano CLIP model (no training
needed to check plumbing), an index over the tiny catalog's real embeddings, a tiny random report model,
and API keys switched on so the auth path is exercised by every request.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import socket
import subprocess
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from serve_testlib import dicom_series_zip

httpx = pytest.importorskip("httpx")

KEY = "test-key-0123456789abcdef"
SIZE = (32, 64, 64)
PHI = ("Doe^Jane", "PID-771234", "19491231", "DOE_JANE_scan")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nifti(array: np.ndarray, spacing=(1.5, 1.5, 3.0)) -> bytes:
    import nibabel as nib

    img = nib.Nifti1Image(array, np.diag([*spacing, 1.0]))
    return gzip.compress(img.to_bytes())


def _phantom(seed: int, shape=(48, 48, 24)) -> np.ndarray:
    """A CT-like blob in HU: air around a soft-tissue ellipsoid with a seeded dense lesion."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    vol = np.full(shape, -1000.0, np.float32)
    vol[(x / 0.8) ** 2 + (y / 0.7) ** 2 + (z / 0.9) ** 2 < 1] = 40.0
    cx, cy, cz = rng.uniform(-0.4, 0.4, 3)
    vol[(x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 < 0.04] = 300.0
    return (vol + rng.normal(0, 5, shape)).astype(np.int16)


def _dicom_zip(seed: int, slices: int = 12, rows: int = 40, cols: int = 40) -> bytes:
    """A CT series whose headers carry patient identifiers (which must never come back)."""
    return dicom_series_zip(_phantom(seed, (cols, rows, slices)), PHI[:3], folder=PHI[3], spacing=(1.2, 1.2, 2.5))


@pytest.fixture(scope="module")
def served(ray_session, tiny_catalog, tmp_path_factory):
    import pyarrow as pa
    import torch

    from voxsearch.encoders import ClipConfig, ClipModel, TextTowerConfig, load_clip, save_clip
    from voxsearch.index import VectorIndex
    from voxsearch.ingest import PreprocessConfig, load_volume, read_catalog
    from voxsearch.serve.app import start, stop
    from voxsearch.serve.config import DeploymentOptions, Deployments, Limits, ServeConfig

    root = tmp_path_factory.mktemp("serve")
    pp = PreprocessConfig(spatial_size=SIZE)
    torch.manual_seed(0)
    model = ClipModel(ClipConfig(vision_variant="nano", embed_dim=32, text=TextTowerConfig(max_length=32),
                                 image_size=SIZE, finding_labels=("metastasis|liver", "cyst|kidney")))
    with torch.no_grad():  # a bias that makes some predictions cross 0.5 whatever the random weights
        model.finding_head.bias.copy_(torch.tensor([4.0, -4.0]))
    save_clip(model, root / "ckpt", extra={"preprocess": pp.to_dict()})
    model = load_clip(root / "ckpt").prepare_for_inference()  # exactly what the replicas load
    rows = read_catalog(tiny_catalog).to_pylist()
    volumes = np.stack([load_volume(r, pp) for r in rows])
    with torch.inference_mode():
        vectors = model.encode_image(torch.from_numpy(volumes)).numpy()
    meta = pa.table({c: pa.array([r.get(c) for r in rows]) for c in ("study_id", "modality", "body_part", "split", "abnormal")})
    VectorIndex.build([r["series_id"] for r in rows], vectors, metadata=meta).save(root / "index")

    report_model = _tiny_report_model(root, [r.get("report") or "" for r in rows], pp)
    small = DeploymentOptions(num_cpus=0.05)
    config = ServeConfig(
        index=str(root / "index"), checkpoint=str(root / "ckpt"), catalog=str(tiny_catalog),
        report_model=str(report_model), data_dir=str(root / "added"), upload_dir=str(root / "uploads"),
        port=_free_port(), require_api_key=True, api_keys=[KEY], index_poll_s=0.5,
        limits=Limits(max_upload_bytes=4_000_000, max_voxels=3_000_000, max_k=50),
        deployments=Deployments(**{name: small for name in
                                   ("ingress", "text_encoder", "image_encoder", "searcher", "studies", "reporter")}),
    )
    (root / "uploads").mkdir()
    url = start(config, ready_timeout_s=240)
    client = httpx.Client(base_url=url, headers={"X-API-Key": KEY}, timeout=120)
    try:
        yield {"url": url, "client": client, "config": config, "rows": rows, "model": model, "root": root}
    finally:
        client.close()
        stop(config)


def _tiny_report_model(root: Path, reports: list[str], pp):
    from voxsearch.reports.model import ReportModelConfig, build_report_model, save_report_model
    from tiny_lm_testlib import build_tiny_lm

    lm = build_tiny_lm(root / "lm", [r for r in reports if r] or ["no findings."])
    cfg = ReportModelConfig(vision_variant="nano", image_size=SIZE, lm=str(lm), low_tokens=(8, 4), high_tokens=(4, 4),
                            use_chat_template=False)
    return save_report_model(build_report_model(cfg, preprocess=pp.to_dict()), root / "report_model")


def _row(served, **want):
    for row in served["rows"]:
        if all(row.get(k) == v for k, v in want.items()):
            return row
    pytest.skip(f"the tiny catalog has no row with {want}")


def _source_upload(row) -> tuple[str, bytes]:
    """The bytes a user would upload for a catalog row (a NIfTI file, or its DICOM series zipped)."""
    path = Path(row["source_path"])
    if row["source_format"] == "nifti":
        return "scan.nii.gz" if path.name.endswith(".gz") else "scan.nii", path.read_bytes()
    if path.is_file():
        return "series.zip", path.read_bytes()
    buf = io.BytesIO()
    files = row.get("source_files") or [str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()]
    with zipfile.ZipFile(buf, "w") as zf:
        for name in files:
            zf.write(path / name, arcname=name)
    return "series.zip", buf.getvalue()


def _no_phi(text: str) -> None:
    for secret in PHI:
        assert secret not in text, f"patient identifier {secret!r} leaked"


# ---------------------------------------------------------------------------------------------- probes
def test_health_ready_openapi(served):
    c = served["client"]
    assert httpx.get(served["url"] + "/api/v1/health").json() == {"status": "ok"}  # no key needed
    ready = httpx.get(served["url"] + "/api/v1/ready").json()
    assert ready["ready"] is True
    assert ready["components"]["searcher"]["size"] == len(served["rows"])
    assert ready["components"]["reporter"]["generator"] is True
    paths = c.get("/api/v1/openapi.json").json()["paths"]
    for path in ("/api/v1/search/text", "/api/v1/search/scan", "/api/v1/report", "/api/v1/embed",
                 "/api/v1/studies/{series_id}", "/api/v1/studies/{series_id}/thumbnail/{plane}.png",
                 "/api/v1/studies/{series_id}/slices/{plane}/{index}.png", "/api/v1/health", "/api/v1/ready",
                 "/api/v1/metrics", "/api/v1/filters"):
        assert path in paths, path


def test_api_key_required(served):
    url = served["url"]
    body = {"query": "liver"}
    assert httpx.post(url + "/api/v1/search/text", json=body).status_code == 401
    assert httpx.post(url + "/api/v1/search/text", json=body, headers={"X-API-Key": "wrong-" + KEY}).status_code == 401
    ok = httpx.post(url + "/api/v1/search/text", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200
    assert httpx.get(url + "/api/v1/metrics").status_code == 401
    assert httpx.get(url + "/").status_code == 200  # the page itself holds no data


def test_page_and_static(served):
    url = served["url"]
    page = httpx.get(url + "/")
    assert page.status_code == 200 and 'id="search-form"' in page.text and "/static/app.js" in page.text
    js = httpx.get(url + "/static/app.js")
    assert js.status_code == 200 and "searchText" in js.text
    assert httpx.get(url + "/static/..%2Fapi.py").status_code == 404
    assert httpx.get(url + "/static/nothing.js").status_code == 404


def test_filters_lists_catalog_values(served):
    values = served["client"].get("/api/v1/filters").json()
    assert set(values["modality"]) == {r["modality"] for r in served["rows"]}
    assert values["abnormal"] == [True, False]


# ---------------------------------------------------------------------------------------------- search
def test_text_search_matches_in_process_ranking(served):
    import torch

    from voxsearch.index import VectorIndex

    c = served["client"]
    query = "hypodense lesion in the liver"
    body = c.post("/api/v1/search/text", json={"query": query, "k": 5}).json()
    assert len(body["results"]) == 5
    with torch.inference_mode():
        q = served["model"].encode_query([query]).numpy()
    expected = VectorIndex.load(served["root"] / "index").search(q, k=5)[0]
    assert [r["series_id"] for r in body["results"]] == [h.id for h in expected]
    assert np.allclose([r["score"] for r in body["results"]], [h.score for h in expected], atol=1e-4)
    first = body["results"][0]
    assert first["thumbnails"]["axial"].endswith("/thumbnail/axial.png") and first["rank"] == 1
    forbidden = {"patient_key", "source_path", "content_sha256", "study_date"}
    for hit in body["results"]:
        assert not forbidden & set(hit["metadata"])
    assert body["query"]["findings"] == []


def test_text_search_steers_by_named_findings_and_shows_predictions(served):
    import torch

    from voxsearch.encoders import read_finding_head
    from voxsearch.index import VectorIndex

    c = served["client"]
    body = c.post("/api/v1/search/text", json={"query": "liver metastases", "k": 6}).json()
    assert body["query"]["findings"] == ["metastasis|liver"]
    model = served["model"]
    with torch.inference_mode():
        q = model.encode_query(["liver metastases"]).numpy()
        plain = model.encode_text(["liver metastases"]).numpy()
    assert not np.allclose(q, plain)  # the finding head's direction was added
    index = VectorIndex.load(served["root"] / "index")
    assert [r["series_id"] for r in body["results"]] == [h.id for h in index.search(q, k=6)[0]]
    head = read_finding_head(served["root"] / "ckpt")
    for hit in body["results"]:
        probs = head.probabilities(index.vector(hit["series_id"])[None])[0]
        shown = {f["label"]: f["probability"] for f in hit["predicted_findings"]}
        assert set(shown) == {label for label, p in zip(head.labels, probs) if p >= 0.5}
        assert all(abs(shown[label] - p) < 1e-3 for label, p in zip(head.labels, probs) if label in shown)
    assert any(hit["predicted_findings"] for hit in body["results"])
    study = c.get(f"/api/v1/studies/{body['results'][0]['series_id']}").json()
    assert study["predicted_findings"] == body["results"][0]["predicted_findings"]


def test_text_search_filters(served):
    c = served["client"]
    modality = served["rows"][0]["modality"]
    body = c.post("/api/v1/search/text", json={"query": "scan", "k": 50, "filters": {"modality": modality}}).json()
    expected = sum(r["modality"] == modality for r in served["rows"])
    assert len(body["results"]) == expected
    assert {r["metadata"]["modality"] for r in body["results"]} == {modality}
    both = c.post("/api/v1/search/text", json={"query": "scan", "k": 50, "filters": {"modality": ["CT", "MR"]}}).json()
    assert len(both["results"]) == len(served["rows"])


@pytest.mark.parametrize("body,status,words", [
    ({"query": ""}, 422, "query"),
    ({"query": "   "}, 422, "empty"),
    ({"query": "x" * 1001}, 422, "limit"),
    ({"query": "liver", "k": 0}, 422, "k"),
    ({"query": "liver", "k": 51}, 422, "between 1 and 50"),
    ({"query": "liver", "filters": {"patient_key": "x"}}, 422, "patient_key"),
    ({"query": "liver", "filters": {"abnormal": "maybe"}}, 422, "abnormal"),
    ({"query": "liver", "extra": 1}, 422, "extra"),
    ({"k": 3}, 422, "query"),
])
def test_text_search_bad_requests(served, body, status, words):
    r = served["client"].post("/api/v1/search/text", json=body)
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]


def test_text_search_malformed_json(served):
    r = served["client"].post("/api/v1/search/text", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"] == "invalid_request"


def test_scan_search_by_id_excludes_itself(served):
    from voxsearch.index import VectorIndex

    row = served["rows"][0]
    body = served["client"].post("/api/v1/search/scan", data={"series_id": row["series_id"], "k": "4"}).json()
    ids = [r["series_id"] for r in body["results"]]
    assert len(ids) == 4 and row["series_id"] not in ids
    index = VectorIndex.load(served["root"] / "index")
    expected = [h.id for h in index.search(index.vector(row["series_id"])[None], k=5)[0] if h.id != row["series_id"]]
    assert ids == expected[:4]


@pytest.mark.parametrize("fmt", ["nifti", "dicom"])
def test_scan_search_by_upload_finds_the_same_study(served, fmt):
    row = _row(served, source_format=fmt)
    name, data = _source_upload(row)
    r = served["client"].post("/api/v1/search/scan", files={"file": (name, data)},
                              data={"k": "3", "scan_modality": row["modality"]})
    assert r.status_code == 200, r.text
    top = r.json()["results"][0]
    assert top["series_id"] == row["series_id"] and top["score"] > 0.99


# ---------------------------------------------------------------------------------------------- bad uploads
def _bad_uploads():
    nii = _nifti(_phantom(1))
    zip_bomb = io.BytesIO()
    with zipfile.ZipFile(zip_bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.dcm", b"\0" * 3_500_000)
    traversal = io.BytesIO()
    with zipfile.ZipFile(traversal, "w") as zf:
        zf.writestr("../../../tmp/evil.dcm", b"x")
    text_zip = io.BytesIO()
    with zipfile.ZipFile(text_zip, "w") as zf:
        zf.writestr("notes.txt", b"hello")
    single = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(_dicom_zip(3, slices=2))) as zf:
        single.write(zf.read(zf.namelist()[0]))
    truncated_dicom = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(_dicom_zip(4)), "r") as src, zipfile.ZipFile(truncated_dicom, "w") as dst:
        for i, name in enumerate(src.namelist()):
            blob = src.read(name)
            dst.writestr(name, blob[: len(blob) // 2] if i == 3 else blob)
    return {
        "wrong type": (b"%PDF-1.4 definitely not a scan" * 10, 415, "unsupported file type"),
        "truncated nifti": (gzip.decompress(nii)[:2000], 422, "truncated"),
        "corrupt gzip body": (nii[: len(nii) * 2 // 3], 422, "could not be read"),
        "garbage after gzip magic": (b"\x1f\x8b" + os.urandom(600), 422, "gzip"),
        "2d nifti": (_nifti(np.zeros((30, 30), np.int16)), 422, "not a 3D volume"),
        "4d nifti": (_nifti(np.zeros((20, 20, 10, 3), np.int16)), 422, "4D"),
        "too many voxels": (_nifti(np.zeros((160, 160, 160), np.int16)), 413, "voxels"),
        "too large": (os.urandom(4_200_000), 413, "limit"),
        "empty": (b"", 400, "empty"),
        "zip bomb": (zip_bomb.getvalue(), 413, "zip bomb"),
        "zip traversal": (traversal.getvalue(), 400, "unsafe path"),
        "zip without dicom": (text_zip.getvalue(), 422, "no DICOM"),
        "single dicom slice": (single.getvalue(), 422, "single slice"),
        "truncated dicom pixels": (truncated_dicom.getvalue(), 422, "could not be read"),
    }


BAD = _bad_uploads()


@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.parametrize("endpoint", ["/api/v1/search/scan", "/api/v1/embed", "/api/v1/report"])
def test_bad_uploads_get_clear_4xx(served, case, endpoint):
    data, status, words = BAD[case]
    r = served["client"].post(endpoint, files={"file": (f"{PHI[3]}.nii.gz", data)})
    assert r.status_code == status, (case, r.text)
    detail = r.json()["detail"]
    assert words in detail, detail
    _no_phi(r.text)
    assert str(served["root"]) not in detail  # no server paths either


def test_bad_uploads_left_nothing_and_crashed_nothing(served):
    uploads = served["root"] / "uploads"
    assert list(uploads.iterdir()) == []  # every upload folder was deleted, accepted or refused
    assert httpx.get(served["url"] + "/api/v1/ready").json()["ready"] is True


def test_upload_request_shape_errors(served):
    c = served["client"]
    nii = _nifti(_phantom(2))
    both = c.post("/api/v1/search/scan", files={"file": ("a.nii.gz", nii)}, data={"series_id": served["rows"][0]["series_id"]})
    assert both.status_code == 422 and "exactly one" in both.json()["detail"]
    neither = c.post("/api/v1/search/scan", data={"k": "3"})
    assert neither.status_code == 422
    unknown = c.post("/api/v1/search/scan", data={"series_id": "no-such-study"})
    assert unknown.status_code == 404
    bad_id = c.post("/api/v1/search/scan", data={"series_id": "../../etc/passwd"})
    assert bad_id.status_code == 400
    bad_modality = c.post("/api/v1/search/scan", files={"file": ("a.nii.gz", nii)}, data={"scan_modality": "PET"})
    assert bad_modality.status_code == 422 and "CT or MR" in bad_modality.json()["detail"]
    chunked = c.post("/api/v1/embed", content=iter([b"--x\r\n"]), headers={"content-type": "multipart/form-data; boundary=x"})
    assert chunked.status_code == 411


def test_every_request_body_is_limited_through_the_proxy(served):
    c = served["client"]
    body = b'{"query": "' + b"a" * 1_500_000 + b'"}'  # over the 1 MiB JSON limit
    for content in (body, iter([body[i:i + 65536] for i in range(0, len(body), 65536)])):  # declared, chunked
        r = c.post("/api/v1/search/text", content=content, headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"] == "too_large", r.text
    # However Content-Type is spelled, an upload over the limit is refused from its length.
    r = c.post("/api/v1/embed", content=b"x" * 4_200_000, headers={"content-type": "Multipart/Form-Data; boundary=x"})
    assert r.status_code == 413 and "limit" in r.json()["detail"]


# ---------------------------------------------------------------------------------------------- studies
def test_study_view_and_pngs(served):
    from PIL import Image

    c = served["client"]
    row = served["rows"][0]
    study = c.get(f"/api/v1/studies/{row['series_id']}").json()
    assert study["report"] == row.get("report")
    assert set(study["slices"]) == {"axial", "coronal", "sagittal"} and min(study["slices"].values()) > 1
    assert "patient_key" not in study["metadata"] and "source_path" not in study["metadata"]
    for plane, url in study["thumbnails"].items():
        r = c.get(url, params={"size": 96})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        img = np.asarray(Image.open(io.BytesIO(r.content)))
        assert max(img.shape) == 96 and img.std() > 1.0, plane  # a real image, not a blank square
    last = study["slices"]["axial"] - 1
    assert c.get(f"/api/v1/studies/{row['series_id']}/slices/axial/{last}.png").status_code == 200
    assert c.get(f"/api/v1/studies/{row['series_id']}/slices/axial/{last + 1}.png").status_code == 400
    assert c.get(f"/api/v1/studies/{row['series_id']}/slices/oblique/1.png").status_code == 404
    assert c.get(f"/api/v1/studies/{row['series_id']}/thumbnail/axial.png", params={"window": "x"}).status_code == 422
    assert c.get(f"/api/v1/studies/{row['series_id']}/thumbnail/axial.png", params={"size": 5000}).status_code == 422
    assert c.get("/api/v1/studies/unknown-id").status_code == 404
    assert c.get("/api/v1/studies/unknown-id/thumbnail/axial.png").status_code == 404


# ---------------------------------------------------------------------------------------------- reports
def test_retrieval_draft_by_id_uses_training_neighbours(served):
    row = _row(served, split="test")
    r = served["client"].post("/api/v1/report", data={"series_id": row["series_id"], "method": "retrieval"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["method"] == "retrieval" and body["report"].startswith("[Retrieval-based draft")
    source_ids = [s["series_id"] for s in body["sources"]]
    assert source_ids and row["series_id"] not in source_ids
    splits = {r["series_id"]: r["split"] for r in served["rows"]}
    assert {splits[s] for s in source_ids} == {"train"}
    nearest = next(r for r in served["rows"] if r["series_id"] == source_ids[0])
    first_sentence = (nearest.get("report") or "").split(".")[0].strip()
    assert first_sentence in body["report"]  # the nearest training report's own words are in the draft


def test_retrieval_draft_streamed(served):
    row = served["rows"][0]
    with served["client"].stream("POST", "/api/v1/report",
                                 data={"series_id": row["series_id"], "method": "retrieval", "stream": "true"}) as r:
        assert r.status_code == 200 and r.headers["x-report-method"] == "retrieval"
        assert r.headers["content-type"].startswith("text/plain")
        text = "".join(r.iter_text())
    assert text.startswith("[Retrieval-based draft")


def test_generated_report_streams_from_upload(served):
    nii = _nifti(_phantom(5))
    with served["client"].stream("POST", "/api/v1/report", files={"file": ("x.nii.gz", nii)},
                                 data={"max_new_tokens": "12"}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["x-report-method"] == "generate"
        pieces = list(r.iter_text())
    assert pieces and "".join(pieces).strip()
    whole = served["client"].post("/api/v1/report", files={"file": ("x.nii.gz", nii)},
                                  data={"max_new_tokens": "12", "stream": "false"}).json()
    assert whole["method"] == "generate" and whole["report"] == "".join(pieces).strip()  # greedy: deterministic
    bad = served["client"].post("/api/v1/report", data={"series_id": served["rows"][0]["series_id"], "method": "magic"})
    assert bad.status_code == 422


# ---------------------------------------------------------------------------------------------- embed
def test_embed_dicom_study_then_find_it(served):
    c = served["client"]
    data = _dicom_zip(11)
    before = c.get("/api/v1/ready").json()["components"]["searcher"]
    r = c.post("/api/v1/embed", files={"file": (f"{PHI[3]}.zip", data)}, data={"report": "Dense focal lesion."})
    assert r.status_code == 201, r.text
    body = r.json()
    _no_phi(r.text)
    new_id = body["series_id"]
    assert body["duplicate"] is False and body["index_size"] == before["size"] + 1
    assert body["index_version"] != before["version"]
    assert body["metadata"]["modality"] == "CT" and body["metadata"]["split"] == "added"
    # Searchable at once, by the same scan.
    found = c.post("/api/v1/search/scan", files={"file": ("s.zip", data)}, data={"k": "1"}).json()["results"][0]
    assert found["series_id"] == new_id and found["score"] > 0.99
    study = c.get(f"/api/v1/studies/{new_id}")
    assert study.status_code == 200 and study.json()["report"] == "Dense focal lesion."
    _no_phi(study.text)
    assert c.get(f"/api/v1/studies/{new_id}/thumbnail/coronal.png").status_code == 200
    # Uploading the same voxels again does not add a second copy.
    again = c.post("/api/v1/embed", files={"file": ("other-name.zip", data)})
    assert again.status_code == 200 and again.json() == {**body, "duplicate": True}
    # What is kept on disk is voxels and spacing only: no header text survives.
    stored = list((served["root"] / "added" / "volumes").glob("*.nii.gz"))
    assert len(stored) == 1
    raw = gzip.decompress(stored[0].read_bytes())
    for secret in PHI:
        assert secret.encode() not in raw
    assert list((served["root"] / "uploads").iterdir()) == []


@pytest.mark.parametrize("fmt", ["nifti", "dicom"])
def test_embed_of_a_catalogued_scan_is_a_duplicate(served, fmt):
    row = _row(served, source_format=fmt)
    name, data = _source_upload(row)
    c = served["client"]
    before = c.get("/api/v1/ready").json()["components"]["searcher"]
    r = c.post("/api/v1/embed", files={"file": (name, data)}, data={"scan_modality": row["modality"]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["duplicate"] is True and body["series_id"] == row["series_id"]
    assert body["index_size"] == before["size"] and body["metadata"]["split"] == row["split"]


def test_reader_errors_and_stored_reports_hold_no_header_text(served):
    planted = b"DOE JOHN"
    c = served["client"]
    bad = dicom_series_zip(_phantom(12, (24, 24, 6)), PHI[:3], rescale_slope=planted)
    r = c.post("/api/v1/search/scan", files={"file": ("s.zip", bad)})
    assert r.status_code == 422 and r.json()["error_id"], r.text
    assert planted.decode() not in r.text and str(served["root"]) not in r.text
    # A report that names the patient its scan's headers name is stored without the name.
    r = c.post("/api/v1/embed", files={"file": ("x.zip", _dicom_zip(13))},
               data={"report": f"Jane Doe ({PHI[1]}): dense focal lesion."})
    assert r.status_code == 201, r.text
    report = c.get(f"/api/v1/studies/{r.json()['series_id']}").json()["report"]
    assert "dense focal lesion" in report
    for word in ("Jane", "Doe", PHI[1]):
        assert word not in report, report


def test_no_patient_identifier_in_logs(served):
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    leaks = subprocess.run(["grep", "-rlF", "-e", PHI[0], "-e", PHI[1], "-e", PHI[3], str(logs)],
                           capture_output=True, text=True)
    assert leaks.stdout == "", f"patient identifiers in logs: {leaks.stdout}"


# ---------------------------------------------------------------------------------------------- index swap
def test_new_index_version_is_picked_up_without_downtime(served):
    import pyarrow as pa
    import torch

    from voxsearch.index import VectorIndex

    c = served["client"]
    query = "zebra pattern marker study for the swap test"
    with torch.inference_mode():
        vec = served["model"].encode_text([query]).numpy()
    index = VectorIndex.load(served["root"] / "index")
    index.add(["external-1"], vec, metadata=pa.table({"study_id": ["ext"], "modality": ["CT"]}))
    index.save(served["root"] / "index")
    statuses, seen = [], False
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not seen:
        r = c.post("/api/v1/search/text", json={"query": query, "k": 1})
        statuses.append(r.status_code)
        seen = r.status_code == 200 and r.json()["results"][0]["series_id"] == "external-1"
    assert seen, "the searcher never served the new index version"
    assert set(statuses) == {200}  # every search during the swap was answered
    # The id is indexed but the server has no study for it: no links that would 404.
    hit = r.json()["results"][0]
    assert hit["thumbnails"] is None and hit["url"] is None


def test_metrics_count_requests(served):
    text = served["client"].get("/api/v1/metrics").text
    assert 'route="/api/v1/search/text",status="200"' in text
    assert "voxsearch_uploads_rejected_total" in text and 'status="413"' in text
    size = [ln for ln in text.splitlines() if ln.startswith("voxsearch_index_size")]
    assert size and float(size[0].split()[-1]) >= len(served["rows"]) + 1


# ---------------------------------------------------------------------------------------------- browser
def test_browser_search_study_view_and_screenshot(served, tmp_path):
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("Debian packages chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="the selenium package is not installed")
    from PIL import Image
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,900"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(driver), options=options)
    shots = Path(os.environ.get("VOXSEARCH_SCREENSHOTS", tmp_path))
    try:
        browser.set_page_load_timeout(60)
        wait = WebDriverWait(browser, 60)
        browser.get(served["url"] + "/")
        browser.execute_script("sessionStorage.setItem('voxsearch-key', arguments[0])", KEY)
        browser.get(served["url"] + "/")
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#f-modality option")) > 1)  # filters loaded
        box = browser.find_element(By.ID, "query")
        box.send_keys("liver lesion")
        browser.find_element(By.ID, "search-button").click()
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#results .card")) >= 3)
        # Thumbnails come through fetch + blob URLs (the key is a header): wait until they decode. The
        # id the index-swap test planted has no study here: its card says so and holds no <img>.
        wait.until(lambda b: b.execute_script(
            "const imgs=[...document.querySelectorAll('#results .card img')].slice(0,9);"
            "return imgs.length===9 && imgs.every(i => i.complete && i.naturalWidth > 0);"))
        planted = browser.find_elements(By.CSS_SELECTOR, "#results .card.no-study")
        assert all("not in this server's catalog" in c.text for c in planted)
        assert "studies for" in browser.find_element(By.ID, "status").text
        browser.save_screenshot(str(shots / "serve_results.png"))
        browser.find_elements(By.CSS_SELECTOR, "#results .card:not(.no-study)")[0].click()
        wait.until(lambda b: b.find_element(By.ID, "study").is_displayed())
        wait.until(lambda b: b.execute_script("const i=document.getElementById('slice'); return i.complete && i.naturalWidth>0"))
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#similar .card")) >= 1)
        browser.find_element(By.ID, "draft-button").click()
        wait.until(lambda b: len(b.find_element(By.ID, "draft").text) > 20)
        browser.save_screenshot(str(shots / "serve_study.png"))
    except Exception:
        browser.save_screenshot(str(shots / "serve_failure.png"))
        raise
    finally:
        browser.quit()
    img = np.asarray(Image.open(shots / "serve_results.png").convert("RGB")).astype(np.float32)
    assert img.std() > 20  # not a blank page
    # The grid area must hold many grey levels (decoded scan thumbnails), not flat panels only.
    grid = img[250:800, 20:1260]
    assert len(np.unique(grid.reshape(-1, 3), axis=0)) > 200
