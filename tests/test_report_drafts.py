"""The search server's retrieval drafter, scored offline as bench/report.py scores it."""

from __future__ import annotations

import pytest

from voxsearch.encoders.finding_text import default_matcher
from voxsearch.reports.drafting import Neighbour, compose_draft, detected_sentences, split_sentences


def test_draft_body_is_the_text_without_its_notes():
    neighbours = [Neighbour("a", 0.9, "Three metastases in the liver. Spleen normal."),
                  Neighbour("b", 0.8, "A cyst in the right kidney.")]
    detected = [{"finding": "metastasis in the liver", "label": "metastasis|liver", "probability": 0.8}]
    draft = compose_draft(neighbours, detected=detected)
    assert draft.body == draft.text.split("\n", 2)[2]
    assert "[" not in draft.body and "Three metastases in the liver." in draft.body
    # The notes name findings too ("detects ... metastasis in the liver"): scoring the whole text would
    # credit the draft with them whatever its sentences say.
    plain = compose_draft([Neighbour("c", 0.9, "The kidneys are unremarkable.")], detected=detected)
    assert default_matcher().extract(plain.body) == set()
    assert ("metastasis", "liver") in default_matcher().extract(plain.text)


def test_detected_sentences_state_exactly_the_calls():
    matcher = default_matcher()
    calls = [{"finding": "metastasis in the liver", "label": "metastasis|liver", "probability": 0.7},
             {"finding": "stone in the kidney", "label": "stone|kidney", "probability": 0.6}]
    text = detected_sentences(calls)
    assert matcher.extract(text) == {("metastasis", "liver"), ("stone", "kidney")}
    assert len(split_sentences(text)) == 2
    assert matcher.extract(detected_sentences([])) == set()


def test_finding_head_reliable_labels_follow_the_calibrated_thresholds():
    import numpy as np

    from voxsearch.encoders.checkpoint import UNRELIABLE_THRESHOLD, FindingHead

    labels = ["cyst|liver", "mass|lung", "stone|kidney"]
    weight, bias = np.zeros((3, 4), np.float32), np.zeros(3, np.float32)
    head = FindingHead(labels, weight, bias, [UNRELIABLE_THRESHOLD, 0.3, 0.99])
    assert head.reliable_labels == {"mass|lung"}
    assert FindingHead(labels, weight, bias).reliable_labels == set(labels)  # no calibration stored: 0.5 each


@pytest.mark.timeout(600)
def test_retrieval_drafts_come_from_training_reports_in_study_order(tiny_catalog, tmp_path):
    import json
    import shutil

    import numpy as np
    import pyarrow as pa
    import torch

    from voxsearch.encoders import open_checkpoint, packaged_checkpoint
    from voxsearch.ingest import PreprocessConfig, load_volume, read_catalog
    from voxsearch.reports.evaluate import retrieval_drafts

    rows = sorted((r for r in read_catalog(tiny_catalog).to_pylist() if r.get("report")), key=lambda r: r["series_id"])
    # The last six studies are drafted for (in shuffled order: the output follows series_id), the rest is the index.
    train, test = pa.Table.from_pylist(rows[:-6]), pa.Table.from_pylist(rows[-6:][::-1])
    ids, drafts = retrieval_drafts(packaged_checkpoint(), train, test)

    assert ids == [r["series_id"] for r in rows[-6:]]
    assert set(drafts) == {"nearest training report", "retrieve-write", "detect-retrieve-write",
                           "detected findings only"}
    assert all(len(texts) == len(ids) for texts in drafts.values())
    train_reports = [r["report"] for r in rows[:-6]]
    assert all(text in train_reports for text in drafts["nearest training report"])
    train_sentences = {s for r in train_reports for s in split_sentences(r)}
    for method in ("retrieve-write", "detect-retrieve-write"):
        for body in drafts[method]:
            assert body and set(split_sentences(body)) <= train_sentences, (method, body)

    # A head none of whose labels reached the wanted precision would call nothing almost everywhere, and
    # its silence would turn every draft normal: drafting leaves it out.
    uncalibrated = tmp_path / "uncalibrated"
    shutil.copytree(packaged_checkpoint(), uncalibrated)
    meta = json.loads((uncalibrated / "config.json").read_text())
    meta["extra"]["finding_thresholds"] = [0.95] * len(meta["clip_config"]["finding_labels"])
    (uncalibrated / "config.json").write_text(json.dumps(meta))
    _, without = retrieval_drafts(uncalibrated, train, test)
    assert set(without) == {"nearest training report", "retrieve-write"}
    assert without["retrieve-write"] == drafts["retrieve-write"]

    # The detect step alone states exactly what the checkpoint's head calls on each study.
    checkpoint = open_checkpoint(packaged_checkpoint())
    model, head = checkpoint.load_model(inference=True), checkpoint.finding_head()
    preprocess = PreprocessConfig.from_dict(checkpoint.preprocess)
    by_id = {r["series_id"]: r for r in rows}
    matcher = default_matcher()
    for series_id, text in zip(ids, drafts["detected findings only"]):
        volume = torch.from_numpy(np.ascontiguousarray(load_volume(by_id[series_id], preprocess)))[None]
        with model.inference():
            vector = model.encode_image(volume).float().numpy()[0]
        expected = {d["label"] for d in head.describe(vector)}
        assert {f"{kind}|{organ}" for kind, organ in matcher.extract(text)} == expected, (series_id, text)


@pytest.mark.timeout(600)
def test_eval_drafts_command_scores_each_method_against_the_nearest_report(tiny_catalog, tmp_path, capsys):
    import json

    from voxsearch.cli import main

    out = tmp_path / "drafts.json"
    assert main(["eval", "drafts", "--catalog", str(tiny_catalog), "--split", "train", "--allow-split-overlap",
                 "--limit", "6", "--json", str(out)]) == 1  # drafting the index's own studies is refused
    assert main(["eval", "drafts", "--catalog", str(tiny_catalog), "--json", str(out), "--examples", "2"]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["baseline"] == "nearest training report" and result["n"] >= 1
    assert set(result["methods"]) == {"nearest training report", "retrieve-write", "detect-retrieve-write",
                                      "detected findings only"}
    base = result["methods"]["nearest training report"]
    # The baseline against itself differs by nothing in every resample.
    assert base["f1_vs_baseline"]["all"]["ci95"] == [0.0, 0.0]
    # Every method is scored against the same ground truth: the same number of true findings.
    truths = {s["findings"]["all"]["tp"] + s["findings"]["all"]["fn"] for s in result["methods"].values()}
    assert len(truths) == 1
    for method in result["methods"]:
        assert method in printed
    assert len(result["examples"]) == min(2, result["n"]) and "reference" in result["examples"][0]

