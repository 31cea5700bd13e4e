"""The phantom archive: seeded, varied, split by patient, findings in image and text."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from voxsearch.ingest import SynthConfig, generate_archive


def _manifest(root):
    with open(root / "manifest.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_archive_contents_and_ground_truth(synth_archive):
    rows = _manifest(synth_archive)
    assert len(rows) == 24
    assert {r["modality"] for r in rows} == {"CT", "MR"}
    assert len({r["body_part"] for r in rows}) >= 2
    dicom = [r for r in rows if r["path"].startswith("dicom/")]
    assert len(dicom) == 6 and all((synth_archive / r["path"]).is_dir() for r in dicom)
    for r in rows:
        findings = json.loads(r["findings"])
        assert (r["abnormal"] == "True") == bool(findings)
        for f in findings:
            assert set(f) == {"type", "organ", "side", "size_mm", "count", "phase"}
            assert 8 <= f["size_mm"] <= 60 and f["count"] >= 1
    assert any(r["abnormal"] == "False" for r in rows) and any(r["abnormal"] == "True" for r in rows)


def test_split_is_by_patient_and_patients_have_several_studies(synth_archive):
    rows = _manifest(synth_archive)
    split_of = {}
    for r in rows:
        assert split_of.setdefault(r["patient_id"], r["split"]) == r["split"]
    assert len(split_of) < len(rows)  # some patient has two studies
    assert set(split_of.values()) == {"train", "validation", "test"}


def test_reports_vary_and_leak_no_ids(synth_archive):
    rows = _manifest(synth_archive)
    reports = [r["report"] for r in rows]
    assert len(set(reports)) == len(reports)
    for r in rows:
        stem = r["path"].split("/")[1].split(".")[0]
        assert stem not in r["report"] and r["patient_id"] not in r["report"]
    normal = [r["report"].lower() for r in rows if r["abnormal"] == "False"]
    assert any(word in text for text in normal for word in ("no ", "unremarkable", "normal", "clear"))


def test_same_findings_written_many_ways(tmp_path):
    from voxsearch.ingest.synth_report import write_report

    f = [{"type": "cyst", "organ": "liver", "side": None, "size_mm": 22, "count": 1, "phase": "portal venous"}]
    texts = {write_report(np.random.default_rng(i), "CT", "abdomen", "portal venous", f) for i in range(30)}
    assert len(texts) >= 20
    assert any("2.2 cm" in t for t in texts) and any("22 mm" in t or "22mm" in t for t in texts)
    assert any("cystic lesion" in t or "simple cyst" in t for t in texts)


def test_seeded_and_deterministic(tmp_path):
    a = generate_archive(SynthConfig(n=4, seed=3, out=tmp_path / "a", size="tiny", dicom_share=0.5))
    b = generate_archive(SynthConfig(n=4, seed=3, out=tmp_path / "b", size="tiny", dicom_share=0.5))
    c = generate_archive(SynthConfig(n=4, seed=4, out=tmp_path / "c", size="tiny", dicom_share=0.5))
    assert (a / "manifest.csv").read_text() == (b / "manifest.csv").read_text()
    assert (a / "manifest.csv").read_text() != (c / "manifest.csv").read_text()
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    with pytest.raises(FileExistsError):
        generate_archive(SynthConfig(n=4, seed=3, out=tmp_path / "a", size="tiny"))


def test_dicom_share_carries_planted_identifiers(synth_archive):
    import pydicom

    rows = _manifest(synth_archive)
    r = next(r for r in rows if r["path"].startswith("dicom/"))
    ds = pydicom.dcmread(next((synth_archive / r["path"]).iterdir()))
    assert ds.PatientID == r["patient_id"] and "^" in str(ds.PatientName) and len(ds.PatientBirthDate) == 8


def test_m3d_share_and_planted_defects(tmp_path):
    root = generate_archive(SynthConfig(n=6, seed=1, out=tmp_path / "m", size="tiny", m3d_share=0.5, bad_files=7))
    cap = json.loads((root / "m3d" / "M3D_Cap.json").read_text())
    entries = [e for split in cap.values() for e in split]
    assert len(entries) == 3
    for e in entries:
        arr = np.load(root / "m3d" / e["image"])
        assert arr.ndim == 4 and arr.shape[0] == 1 and 0.0 <= arr.min() and arr.max() <= 1.0
        assert (root / "m3d" / e["text"]).read_text().strip()
    defects = json.loads((root / "planted_defects.json").read_text())
    assert len(defects) == 7 and len({d["defect"] for d in defects}) == 7


def test_cli_synth(tmp_path, capsys):
    from voxsearch.cli import main

    out = tmp_path / "cli"
    assert main(["synth", "--n", "3", "--size", "tiny", "--dicom-share", "0", "--out", str(out)]) == 0
    assert len(_manifest(out)) == 3
    assert main(["synth", "--n", "3", "--size", "tiny", "--out", str(out)]) == 2  # exists, no --overwrite
    assert "exists" in capsys.readouterr().out
