"""End to end on Ray Train: a tiny report model learns to write what each scan shows."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from tiny_lm_testlib import TinyLMConfig, build_tiny_lm
from voxsearch.reports.model import ReportModelConfig, build_report_model, load_report_model, save_report_model

SIZE = (24, 48, 48)
IMAGE = (32, 64, 64)
NORMAL = "No abnormality is seen."
ABNORMAL = "There is a 15 mm mass in the liver."


def phantom_catalog(root, n_train=16, n_test=4) -> pa.Table:
    """CT phantoms (HU, NIfTI): odd studies are normal, even ones carry a bright mass; one patient each."""
    nib = pytest.importorskip("nibabel")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n_train + n_test):
        vol = np.full(SIZE, -900.0, np.float32)
        vol[3:-3, 6:-6, 6:-6] = 40.0
        findings = []
        if i % 2 == 0:
            vol[6:18, 12:30, 12:30] = 250.0
            findings = [{"type": "mass", "organ": "liver", "side": None, "size_mm": 15, "count": 1, "phase": None}]
        vol += rng.normal(0, 8, SIZE).astype(np.float32)
        path = root / f"s{i:02d}.nii.gz"
        nib.save(nib.Nifti1Image(vol.astype(np.int16), np.diag([1.5, 1.5, 1.5, 1.0])), str(path))
        rows.append({"series_id": f"series{i:02d}", "study_id": f"study{i:02d}", "patient_key": f"patient{i:02d}",
                     "source_path": str(path), "source_format": "nifti", "modality": "CT",
                     "report": ABNORMAL if findings else NORMAL, "findings": json.dumps(findings),
                     "abnormal": bool(findings), "split": "train" if i < n_train else "test",
                     "content_sha256": hashlib.sha256(vol.tobytes()).hexdigest()})
    return pa.Table.from_pylist(rows)


@pytest.mark.slow  # ~7 min here: 40 epochs of Ray Train with a checkpoint each, then Ray evaluation
def test_tiny_end_to_end_report_depends_on_the_scan(tmp_path, ray_session):
    from voxsearch.ingest import PreprocessConfig, load_volume
    from voxsearch.reports.evaluate import evaluate_reports
    from voxsearch.reports.train import ReportTrainConfig, train_report

    catalog = phantom_catalog(tmp_path)
    lm_dir = build_tiny_lm(tmp_path / "lm", [NORMAL, ABNORMAL] * 10, TinyLMConfig(hidden_size=64, vocab_size=300))
    preprocess = PreprocessConfig(spatial_size=IMAGE).to_dict()
    cfg = ReportModelConfig(vision_variant="nano", image_size=IMAGE, lm=str(lm_dir), low_tokens=(8, 4),
                            high_tokens=(4, 4), use_chat_template=False)
    # Stage 2 straight from a fresh model keeps this to one Ray Train run. The vision tower trains too: a
    # frozen random tower separates the two classes by only ~10% of its token scale, and at this budget
    # the LM settles on the class prior instead (measured: every test scan got the same text).
    init = save_report_model(build_report_model(cfg, preprocess=preprocess), tmp_path / "init")
    result = train_report(ReportTrainConfig(catalog=catalog, out=tmp_path / "model", stage=2, init=init,
                                            tasks=("report",), epochs=40, batch_size=2, workers=2, lr=5e-3,
                                            lm_lr=5e-3, warmup_steps=5, train_vision=True))
    history = result.metrics["history"]
    assert len(history) == 40 and history[-1] < history[0] / 5

    model = load_report_model(result.model_dir)
    pre = PreprocessConfig.from_dict(model.preprocess)
    test_rows = [r for r in catalog.to_pylist() if r["split"] == "test"]
    texts = [model.generate(torch.from_numpy(load_volume(r, pre))[None], max_new_tokens=16) for r in test_rows]
    # Held-out scans: the text follows what the scan shows.
    assert texts == [r["report"] for r in test_rows]

    scores = evaluate_reports(model, catalog, split="test", max_new_tokens=16, workers=1)
    assert scores["model"]["findings"]["all"]["f1"] == 1.0
    assert scores["integrity"]["clean"]
    assert scores["n"] == 4 and scores["n_abnormal"] == 2
