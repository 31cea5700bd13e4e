"""VQA items from ground-truth findings and from M3D-VQA CSV files."""

from __future__ import annotations

import csv
import json

import pytest

from voxsearch.ingest.catalog import parse_findings
from voxsearch.reports.vqa import FindingVocabulary, generate_vqa, read_m3d_vqa_csv

ROWS = [
    {"series_id": "a", "findings": json.dumps([{"type": "nodule", "organ": "lung", "side": "right", "size_mm": 12,
                                               "count": 1, "phase": "arterial"}])},
    {"series_id": "b", "findings": json.dumps([{"type": "cyst", "organ": "liver", "side": "left", "size_mm": 20.4}])},
    {"series_id": "c", "findings": "[]"},
    {"series_id": "d", "findings": json.dumps([{"type": "mass", "organ": "kidney", "phase": "venous"}])},
]


def test_vocabulary_collects_terms():
    v = FindingVocabulary.from_rows(ROWS)
    assert v.types == ["cyst", "mass", "nodule"]
    assert v.organs == ["kidney", "liver", "lung"]
    assert v.sides == ["left", "right"]
    assert v.phases == ["arterial", "venous"]


def test_generated_questions_answer_from_ground_truth():
    items = generate_vqa(ROWS, FindingVocabulary.from_rows(ROWS), seed=3)
    by = {(it.image, it.question_type, it.closed): it for it in items}
    assert by[("a", "organ", False)].answer == "lung"
    assert by[("a", "abnormality", False)].answer == "nodule"
    assert by[("a", "location", False)].answer == "right"
    assert by[("a", "size", False)].answer == "12 mm"
    assert by[("b", "size", False)].answer == "20 mm"
    assert by[("a", "phase", False)].answer == "arterial"
    assert by[("c", "presence", False)].answer == "no"
    assert by[("a", "presence", False)].answer == "yes"
    assert ("c", "organ", False) not in by  # a normal study gets no finding questions
    for it in items:
        if it.closed:
            assert it.options[it.answer_choice] == it.answer
            assert len(set(it.options.values())) == len(it.options) >= 2
            assert it.target == f"{it.answer_choice}. {it.answer}"
            assert "Choices: A. " in it.prompt


def test_bad_findings_json_names_the_series():
    with pytest.raises(ValueError, match="series x"):
        parse_findings("{not json", "x")


def _write_m3d(path, rows):
    cols = ["Image Path", "Text", "Question Type", "Question", "Choice A", "Choice B", "Choice C", "Choice D",
            "Answer", "Answer Choice"]
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow(dict(zip(cols, r)))


def test_m3d_vqa_csv(tmp_path):
    csv_path = tmp_path / "M3D_VQA_test.csv"
    _write_m3d(csv_path, [["ct/001/img.npy", "report", "3", "Which organ?", "Liver", "Lung", "Kidney", "Heart",
                           "Lung", "B"]])
    items = read_m3d_vqa_csv(csv_path, image_root=tmp_path / "root")
    closed, opened = items
    assert closed.closed and not opened.closed
    assert closed.question_type == "organ"  # M3D's type 3
    assert closed.target == "B. Lung"
    assert closed.prompt == "Which organ? Choices: A. Liver B. Lung C. Kidney D. Heart"
    assert opened.target == "Lung"
    assert closed.image == str(tmp_path / "root" / "ct/001/img.npy")


def test_m3d_vqa_csv_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="bad.csv is not an M3D-VQA CSV"):
        read_m3d_vqa_csv(bad)
    wrong = tmp_path / "wrong.csv"
    _write_m3d(wrong, [["x.npy", "", "1", "Plane?", "axial", "coronal", "sagittal", "oblique", "axial", "E"]])
    with pytest.raises(ValueError, match="wrong.csv:2"):
        read_m3d_vqa_csv(wrong)
