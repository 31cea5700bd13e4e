"""voxsearch.serve pieces that need no Ray: config, upload checks, rendering, drafts, filters, auth, metrics."""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import stat
import zipfile

import numpy as np
import pytest

from serve_testlib import refused_upload
from voxsearch.serve.auth import KeyChecker
from voxsearch.serve.config import Limits, ServeConfig, ServeConfigError, load_serve_config
from voxsearch.reports.drafting import Neighbour, compose_draft
from voxsearch.serve.metrics import RequestMetrics
from voxsearch.serve.public import excerpt, normalise_filters, public_metadata, valid_series_id
from voxsearch.serve.render import RenderError, plane_image, render_slice
from voxsearch.serve.uploads import UploadError, extract_zip, prepare_upload, save_upload, sniff


# ------------------------------------------------------------------ config
def test_config_yaml_and_json_load_nested_deployments(tmp_path):
    yaml_file = tmp_path / "serve.yaml"
    yaml_file.write_text(
        "port: 9123\ndeployments:\n  image_encoder: {num_replicas: 3, num_cpus: 1.5}\n"
        "batching: {max_batch_size: 16}\nlimits: {max_voxels: 1000}\n"
    )
    cfg = load_serve_config(yaml_file)
    assert cfg.port == 9123
    assert cfg.deployments.image_encoder.num_replicas == 3
    assert cfg.deployments.image_encoder.serve_options()["ray_actor_options"]["num_cpus"] == 1.5
    assert cfg.deployments.text_encoder.num_replicas == 1  # untouched defaults stay
    assert cfg.batching.max_batch_size == 16 and cfg.limits.max_voxels == 1000
    json_file = tmp_path / "serve.json"
    json_file.write_text(json.dumps({"deployments": {"searcher": {"autoscaling": {"min_replicas": 1, "max_replicas": 4}}}}))
    opts = load_serve_config(json_file).deployments.searcher.serve_options()
    assert opts["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4} and "num_replicas" not in opts


def test_config_rejects_unknown_keys_and_bad_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"deployments": {"image_encoder": {"replicas": 2}}}))
    with pytest.raises(ServeConfigError, match=r"unknown key\(s\) \['replicas'\] in deployments.image_encoder"):
        load_serve_config(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("port: [1, 2\n")
    with pytest.raises(ServeConfigError, match="not valid yaml"):
        load_serve_config(broken)
    with pytest.raises(ServeConfigError, match="does not exist"):
        load_serve_config(tmp_path / "missing.json")


def test_api_keys_required_off_loopback(tmp_path, monkeypatch):
    monkeypatch.delenv("VOXSEARCH_API_KEYS", raising=False)
    for name in ("index", "ckpt", "cat"):
        (tmp_path / name).mkdir()
    base = dict(index=str(tmp_path / "index"), checkpoint=str(tmp_path / "ckpt"), catalog=str(tmp_path / "cat"))
    ServeConfig(**base).validate()  # loopback: no key needed
    public = ServeConfig(**base, host="0.0.0.0")
    assert public.keys_required()
    with pytest.raises(ServeConfigError, match="requires API keys"):
        public.validate()
    keys = tmp_path / "keys.txt"
    keys.write_text("# comment\n0123456789abcdef-long-key\n")
    ServeConfig(**base, host="0.0.0.0", api_keys_file=str(keys)).validate()
    with pytest.raises(ServeConfigError, match="at least 16"):
        ServeConfig(**base, host="0.0.0.0", api_keys=["short"]).validate()
    with pytest.raises(ServeConfigError, match="checkpoint path"):
        ServeConfig(**{**base, "checkpoint": str(tmp_path / "nope")}).validate()
    ServeConfig(**base, finding_query_weight=0.0).validate()  # text embedding alone
    with pytest.raises(ServeConfigError, match="finding_query_weight"):
        ServeConfig(**base, finding_query_weight=-2.0).validate()


def test_key_checker_headers_and_public_paths():
    checker = KeyChecker(["a-very-long-secret-key-1"], required=True)
    assert checker.allows("/api/v1/health", {})
    assert checker.allows("/static/app.js", {})
    assert not checker.allows("/api/v1/search/text", {})
    assert not checker.allows("/api/v1/search/text", {"x-api-key": "wrong-key-of-some-length"})
    assert checker.allows("/api/v1/search/text", {"x-api-key": "a-very-long-secret-key-1"})
    assert checker.allows("/api/v1/metrics", {"authorization": "Bearer a-very-long-secret-key-1"})
    assert KeyChecker([], required=False).allows("/api/v1/search/text", {})


# ------------------------------------------------------------------ uploads
def _nifti_bytes(shape=(8, 9, 10), gz=True, dtype=np.int16) -> bytes:
    import nibabel as nib

    img = nib.Nifti1Image(np.arange(np.prod(shape), dtype=dtype).reshape(shape), np.diag([1.0, 1.0, 2.0, 1.0]))
    raw = img.to_bytes()
    return gzip.compress(raw) if gz else raw


def _save(tmp_path, data: bytes, limits=Limits()):
    async def chunks():
        for i in range(0, len(data), 1000):
            yield data[i:i + 1000]

    return asyncio.run(save_upload(chunks(), limits, tmp_root=str(tmp_path)))


def test_save_upload_counts_bytes_and_cleans_up(tmp_path):
    workdir, path, size = _save(tmp_path, b"x" * 5000)
    assert size == 5000 and path.read_bytes() == b"x" * 5000
    with pytest.raises(UploadError) as err:
        _save(tmp_path, b"x" * 5000, Limits(max_upload_bytes=4000))
    assert err.value.status == 413
    with pytest.raises(UploadError) as err:
        _save(tmp_path, b"")
    assert err.value.status == 400
    # Refused uploads leave nothing behind; only the accepted one's folder remains.
    assert [p for p in tmp_path.iterdir()] == [workdir]


def test_sniff_by_content_not_name(tmp_path):
    cases = {"nifti-gz": _nifti_bytes(), "nifti": _nifti_bytes(gz=False), "zip": _zip_bytes({"a.dcm": b"1"}),
             "dicom": b"\0" * 128 + b"DICM" + b"\0" * 100}
    for kind, data in cases.items():
        path = tmp_path / "scan.jpg"  # a misleading name must not matter
        path.write_bytes(data)
        assert sniff(path) == kind
    path.write_bytes(b"%PDF-1.7 not a scan at all")
    with pytest.raises(UploadError) as err:
        sniff(path)
    assert err.value.status == 415 and "NIfTI" in err.value.message


def _zip_bytes(members: dict[str, bytes], symlink: str | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
    return buf.getvalue()


@pytest.mark.parametrize("members,symlink,status,words", [
    ({"../../evil.dcm": b"x"}, None, 400, "unsafe path"),
    ({"/abs/evil.dcm": b"x"}, None, 400, "unsafe path"),
    ({"ok.dcm": b"x"}, "link.dcm", 400, "symbolic link"),
    ({"bomb.dcm": b"\0" * (20 * 1024 * 1024)}, None, 413, "zip bomb"),
    ({f"{i}.dcm": b"x" for i in range(30)}, None, 413, "entries"),
    ({"__MACOSX/._a": b"x"}, None, 422, "holds no files"),
])
def test_zip_checks(tmp_path, members, symlink, status, words):
    path = tmp_path / "up.zip"
    path.write_bytes(_zip_bytes(members, symlink))
    with pytest.raises(UploadError) as err:
        extract_zip(path, tmp_path / "out", Limits(max_zip_entries=20), path.stat().st_size)
    assert err.value.status == status and words in err.value.message
    assert not any((tmp_path / "out").glob("*")) if (tmp_path / "out").exists() else True
    assert not (tmp_path.parent / "evil.dcm").exists()


def test_zip_total_size_limit_and_flat_names(tmp_path):
    path = tmp_path / "up.zip"
    path.write_bytes(_zip_bytes({"series/a/1.dcm": b"a" * 3000, "series/a/2.dcm": b"b" * 3000}))
    with pytest.raises(UploadError, match="inflates to"):
        extract_zip(path, tmp_path / "o1", Limits(max_zip_uncompressed_bytes=5000), 100)
    n = extract_zip(path, tmp_path / "o2", Limits(), 100)
    assert n == 2 and sorted(p.name for p in (tmp_path / "o2").iterdir()) == ["000000.dcm", "000001.dcm"]


def test_zip_without_dicom_is_422(tmp_path):
    workdir = tmp_path / "w"
    workdir.mkdir()
    path = workdir / "upload.bin"
    path.write_bytes(_zip_bytes({"readme.txt": b"hello", "notes.txt": b"more"}))
    with pytest.raises(UploadError) as err:
        prepare_upload(workdir, path, path.stat().st_size, Limits())
    assert err.value.status == 422 and "no DICOM" in err.value.message


@pytest.mark.parametrize("data,limits,status,words", [
    (_nifti_bytes((8, 9, 10)), Limits(max_voxels=500), 413, "voxels"),
    (_nifti_bytes((8, 9, 10, 3)), Limits(), 422, "4D"),
    (_nifti_bytes((8, 9)), Limits(), 422, "not a 3D volume"),
    (_nifti_bytes(gz=False)[:400], Limits(), 422, "truncated"),
    (b"\x1f\x8b" + b"garbage" * 20, Limits(), 422, "gzip"),
    (gzip.compress(b"hello world, not a nifti header" * 20), Limits(), 415, "no NIfTI header"),
])
def test_nifti_checks(tmp_path, data, limits, status, words):
    err = refused_upload(tmp_path, data, limits)
    assert err.status == status and words in err.message
    assert "upload.bin" not in err.message and str(tmp_path) not in err.message


def test_valid_nifti_accepted(tmp_path):
    workdir = tmp_path / "w"
    workdir.mkdir()
    path = workdir / "upload.bin"
    path.write_bytes(_nifti_bytes((8, 9, 10)))
    up = prepare_upload(workdir, path, path.stat().st_size, Limits())
    # Inflated once, within the limits, to a plain file the decoder maps; the .gz is gone.
    assert up.kind == "nifti" and up.voxels == 720 and up.path.name == "upload.nii"
    assert [p.name for p in workdir.iterdir()] == ["upload.nii"]
    from voxsearch.ingest import read_volume_path

    assert read_volume_path(up.path).array.shape == (8, 9, 10)
    up.cleanup()
    assert not workdir.exists()


# ------------------------------------------------------------------ rendering
def test_planes_follow_radiological_convention():
    vol = np.zeros((10, 12, 14), np.float32)  # X (to the right), Y (anterior), Z (superior)
    vol[9, 6, 7] = 1.0  # far patient right
    vol[5, 11, 7] = 2.0  # far anterior
    vol[5, 6, 13] = 3.0  # far superior
    axial, px = plane_image(vol, (1, 2, 3), "axial", 7)
    assert axial.shape == (12, 10) and px == (2.0, 1.0)
    assert axial[0].max() == 2.0  # anterior at the top
    assert axial[:, 0].max() == 1.0  # patient right on the image's left
    coronal, _ = plane_image(vol, (1, 2, 3), "coronal", 6)
    assert coronal[0].max() == 3.0  # superior at the top
    sagittal, _ = plane_image(vol, (1, 2, 3), "sagittal", 5)
    assert sagittal.shape == (14, 12) and sagittal[0].max() == 3.0
    with pytest.raises(RenderError, match="out of range"):
        plane_image(vol, (1, 1, 1), "axial", 14)
    with pytest.raises(RenderError, match="unknown plane"):
        plane_image(vol, (1, 1, 1), "oblique")


def test_render_png_square_mm_and_window():
    from PIL import Image

    vol = np.linspace(-1000, 1000, 20 * 20 * 10, dtype=np.float32).reshape(20, 20, 10)
    png = render_slice(vol, (1.0, 1.0, 4.0), "CT", "coronal", max_side=80)
    img = Image.open(io.BytesIO(png))
    # 20 voxels x 1 mm wide, 10 slices x 4 mm tall -> 40 mm tall: taller than wide.
    assert img.size == (40, 80)
    pixels = np.asarray(img)
    assert pixels.min() == 0 and pixels.max() == 255  # soft-tissue window clips -1000 and +1000
    lung = np.asarray(Image.open(io.BytesIO(render_slice(vol, (1, 1, 4), "CT", "coronal", window="lung", max_side=80))))
    assert not np.array_equal(lung, pixels)


# ------------------------------------------------------------------ drafts, metadata, filters, metrics
def test_retrieval_draft_prefers_agreement_and_says_what_it_is():
    neighbours = [
        Neighbour("a", 0.9, "Hypodense lesion in the liver. No ascites. Spleen normal."),
        Neighbour("b", 0.8, "Hypodense lesion in the liver. Gallstones present."),
        Neighbour("c", 0.7, "Hypodense lesion in the liver. Gallstones present."),
        Neighbour("d", 0.1, "Fractured left femur."),
    ]
    draft = compose_draft(neighbours)
    assert draft.method == "retrieval"
    assert draft.text.startswith("[Retrieval-based draft") and "4 most similar" in draft.text
    body = draft.text.split("\n", 1)[1]
    assert body.count("Hypodense lesion in the liver.") == 1
    assert "Gallstones present." in body and "No ascites." in body
    assert "femur" not in body  # one distant report is not a consensus
    assert body.index("Hypodense") < body.index("No ascites")  # nearest report's order
    assert [s["series_id"] for s in draft.sources] == ["a", "b", "c", "d"]
    empty = compose_draft([Neighbour("x", 0.5, "")])
    assert "No draft" in empty.text and empty.sources[0]["series_id"] == "x"


def test_retrieval_draft_starts_from_detected_findings():
    neighbours = [  # the most similar-looking neighbours state no or other findings
        Neighbour("a", 0.95, "The liver is unremarkable. The kidneys are unremarkable."),
        Neighbour("b", 0.90, "A 12 mm cyst is seen in the right kidney. No focal liver lesion."),
        Neighbour("c", 0.60, "Three metastases in the liver, the largest 2 cm. The kidneys are unremarkable."),
        Neighbour("d", 0.55, "There are two metastatic deposits in the hepatic parenchyma. Spleen normal."),
    ]
    detected = [{"finding": "metastasis in the liver", "label": "metastasis|liver", "probability": 0.91}]
    draft = compose_draft(neighbours, detected=detected, max_neighbours=2)
    assert [s["series_id"] for s in draft.sources] == ["c", "d"]
    assert "Findings the model detects in this scan: metastasis in the liver (91%)" in draft.text
    body = draft.text.split("\n", 2)[2]
    assert "metastases in the liver" in body and "unremarkable. The liver" not in body
    # Nothing detected: neighbours that state no finding come first.
    quiet = compose_draft(neighbours, detected=[], max_neighbours=1)
    assert [s["series_id"] for s in quiet.sources] == ["a"] and "detects in this scan: none" in quiet.text


def test_public_metadata_drops_identifiers():
    row = {"series_id": "s1", "study_id": "st", "patient_key": "pk-secret", "source_path": "/data/DOE_JOHN/ct.nii",
           "content_sha256": "abc", "modality": "CT", "study_date": "2021-05-04", "shape": np.array([3, 4, 5]),
           "findings": json.dumps([{"type": "nodule"}]), "report": "long text", "patient_name": "John Doe"}
    out = public_metadata(row)
    text = json.dumps(out)
    for secret in ("pk-secret", "DOE_JOHN", "John Doe", "abc", "2021-05-04", "long text"):
        assert secret not in text
    assert out["study_year"] == 2021 and out["shape"] == [3, 4, 5] and out["findings"] == [{"type": "nodule"}]


def test_an_upload_of_an_ingested_scan_is_found_by_its_voxels(tmp_path):
    """One scan ingested as NIfTI and as a DICOM folder, then uploaded as a DICOM zip: one content hash."""
    import nibabel as nib
    from serve_testlib import dicom_series_zip

    from voxsearch.ingest import IngestConfig, read_catalog, run_ingest
    from voxsearch.serve import api
    from voxsearch.serve.studies import StudyCatalog

    hu = np.random.default_rng(0).integers(-1000, 1000, (20, 16, 6)).astype(np.int16)
    series_zip = dicom_series_zip(hu, ("Doe^Jane", "PID-1", "19491231"), spacing=(1.2, 1.2, 2.5))
    archive = tmp_path / "archive"
    zipfile.ZipFile(io.BytesIO(series_zip)).extractall(archive / "series")
    # The same voxels in RAS: DICOM's patient axes x and y point left and back.
    nib.save(nib.Nifti1Image(hu, np.diag([-1.2, -1.2, 2.5, 1.0])), archive / "scan.nii.gz")
    run_ingest(IngestConfig(archive=archive, out=tmp_path / "catalog", engine="local", salt="s", progress=False,
                            check_preprocess=None))
    rows = read_catalog(tmp_path / "catalog").to_pylist()
    assert sorted(r["source_format"] for r in rows) == ["dicom", "nifti"]
    assert rows[0]["file_sha256"] != rows[1]["file_sha256"]
    assert rows[0]["content_sha256"] == rows[1]["content_sha256"]

    upload = asyncio.run(api.read_upload(io.BytesIO(series_zip), None, [], Limits(), str(tmp_path)))
    studies = StudyCatalog(tmp_path / "catalog", tmp_path / "added")
    assert studies.find_content(api.added_row(upload, None, None)["content_sha256"]) == rows[0]["series_id"]


def test_excerpt_and_ids_and_filters():
    assert excerpt("word " * 100, 40).endswith("…") and len(excerpt("word " * 100, 40)) <= 41
    assert excerpt(None, 10) is None
    assert valid_series_id("a1.b-c_d:e") and not valid_series_id("../etc") and not valid_series_id("")
    assert normalise_filters({"modality": ["CT", "MR"], "abnormal": True, "split": None}) == {
        "modality": ["CT", "MR"], "abnormal": True}
    with pytest.raises(ValueError, match="unknown filter 'patient_key'"):
        normalise_filters({"patient_key": "x"})
    with pytest.raises(ValueError, match="takes bool"):
        normalise_filters({"abnormal": "yes"})


def test_metrics_text_format():
    m = RequestMetrics()
    m.observe("POST", "/api/v1/search/text", 200, 0.03)
    m.observe("POST", "/api/v1/search/text", 422, 0.001)
    m.reject_upload(413)
    text = m.render("r1", {"index_size": 42})
    assert 'voxsearch_requests_total{replica="r1",method="POST",route="/api/v1/search/text",status="200"} 1' in text
    assert 'voxsearch_request_seconds_bucket{replica="r1",route="/api/v1/search/text",le="0.05"} 2' in text
    assert 'voxsearch_request_seconds_bucket{replica="r1",route="/api/v1/search/text",le="0.01"} 1' in text
    assert 'voxsearch_uploads_rejected_total{replica="r1",status="413"} 1' in text
    assert 'voxsearch_index_size{replica="r1"} 42' in text


# ------------------------------------------------------------------ command line
def test_serve_command_merges_config_file_and_flags(tmp_path, capsys, monkeypatch):
    from voxsearch.cli import build_parser, main
    from voxsearch.commands.serve import config_from_args

    monkeypatch.delenv("VOXSEARCH_API_KEYS", raising=False)
    cfg_file = tmp_path / "serve.json"
    cfg_file.write_text(json.dumps({"port": 9001, "index_poll_s": 7.5, "deployments": {"searcher": {"num_replicas": 2}}}))
    args = build_parser().parse_args(["serve", "--index", "i", "--checkpoint", "c", "--catalog", "k",
                                      "--config", str(cfg_file), "--port", "9002"])
    cfg = config_from_args(args)
    assert (cfg.index, cfg.port, cfg.index_poll_s, cfg.deployments.searcher.num_replicas) == ("i", 9002, 7.5, 2)
    assert main(["serve", "--index", str(tmp_path / "none"), "--checkpoint", "c", "--catalog", "k"]) == 2
    assert "index path" in capsys.readouterr().out
    for name in ("index", "ckpt", "cat"):
        (tmp_path / name).mkdir()
    code = main(["serve", "--index", str(tmp_path / "index"), "--checkpoint", str(tmp_path / "ckpt"),
                 "--catalog", str(tmp_path / "cat"), "--host", "0.0.0.0"])
    assert code == 2 and "requires API keys" in capsys.readouterr().out


def test_demo_command_is_registered():
    from voxsearch.cli import build_parser

    args = build_parser().parse_args(["demo", "--no-serve", "--dir", "d", "--studies", "30"])
    assert args.no_serve and args.studies == 30 and args.func.__module__ == "voxsearch.commands.demo"


# ------------------------------------------------------------------ searcher
def test_index_holder_query_answers_a_request_in_one_call(tmp_path):
    import pyarrow as pa

    from voxsearch.index import VectorIndex
    from voxsearch.serve.index_holder import IndexHolder

    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(50, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [f"s{i}" for i in range(50)]
    meta = pa.table({"modality": ["CT" if i % 2 else "MR" for i in range(50)]})
    VectorIndex.build(ids, vectors, metadata=meta).save(tmp_path / "idx")  # small: exact search
    holder = IndexHolder(tmp_path / "idx")

    by_id = holder.query(None, 5, None, from_id="s7", with_vectors=True)
    expected = [ids[i] for i in np.argsort(-(vectors @ vectors[7]))[1:6]]
    assert by_id["found"] and [h["id"] for h in by_id["hits"]] == expected  # itself left out
    assert by_id["version"] == holder.version != ""
    assert set(by_id["vectors"]) == set(expected)
    np.testing.assert_allclose(by_id["vectors"][expected[0]], vectors[ids.index(expected[0])], atol=1e-6)

    by_vector = holder.query(vectors[7], 5, {"modality": "CT"}, exclude="s7")
    assert by_vector["vectors"] == {} and "s7" not in [h["id"] for h in by_vector["hits"]]
    assert all(h["metadata"]["modality"] == "CT" for h in by_vector["hits"]) and len(by_vector["hits"]) == 5
    assert holder.query(None, 5, None, from_id="nope") == {"found": False, "version": holder.version, "hits": [], "vectors": {}}
