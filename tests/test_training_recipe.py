"""The pieces of the training recipe that decide what the model can learn: augmentation that keeps
sides, finding labels from ground truth or report text, same-findings groups, a fixed data order."""

from __future__ import annotations

import json

import numpy as np
import pytest

from voxsearch.training.augment import VolumeAugment
from voxsearch.training.finding_labels import FindingLabeler
from voxsearch.training.shard_cache import assign_ranks, build_shard_cache


def test_augmentation_keeps_patient_right_on_the_right():
    # W runs patient right -> left: a marker in the right half must stay there in every sample.
    volume = np.full((1, 16, 32, 32), 0.3, dtype=np.float32)
    volume[0, 6:10, 12:20, 4:10] = 0.9
    augment = VolumeAugment(seed=3)
    for _ in range(40):
        out = augment(volume)
        assert out.shape == volume.shape and out.dtype == np.float32
        assert 0.0 <= out.min() and out.max() <= 1.0
        columns = out[0, 6:10, 12:20].mean(axis=(0, 1))
        assert columns[:16].max() > columns[16:].max() + 0.1
        rows = out[0, 6:10, :, 4:10].mean(axis=(0, 2))  # and anterior stays anterior
        assert rows[8:24].max() > rows[:4].max() + 0.1


def test_augmentation_is_seeded_and_resumable():
    volume = np.random.default_rng(0).random((1, 8, 16, 16)).astype(np.float32)
    a, b = VolumeAugment(seed=5), VolumeAugment(seed=5)
    assert np.array_equal(a(volume), b(volume))
    state = a.state()
    expected = a(volume)
    assert not np.array_equal(expected, a(volume))  # the stream moves on
    a.set_state(json.loads(json.dumps(state)))  # survives a checkpoint round trip
    assert np.array_equal(a(volume), expected)


ROWS = [
    {"findings": json.dumps([{"type": "metastasis", "organ": "liver", "side": None}]), "report": "",
     "modality": "CT", "body_part": "abdomen"},
    {"findings": "[]", "report": "There is a liver cyst.", "modality": "CT", "body_part": "abdomen"},
    {"findings": None, "report": "Two cysts in the liver. No renal mass, cyst or stone.", "modality": "CT",
     "body_part": "abdomen"},
    {"findings": None, "report": "The spleen is normal. No focal liver lesion.", "modality": "CT",
     "body_part": "abdomen"},
    {"findings": "[]", "report": "Normal study.", "modality": "CT", "body_part": "abdomen"},
    {"findings": "[]", "report": "Normal study.", "modality": "CT", "body_part": "head"},
]


def test_labels_come_from_ground_truth_else_from_the_report_with_negations():
    labeler = FindingLabeler.from_rows(ROWS, min_count=1)
    assert labeler.labels == ("cyst|liver", "metastasis|liver")
    vectors = [dict(zip(labeler.labels, labeler.vector(r))) for r in ROWS]
    assert vectors[0] == {"cyst|liver": 0.0, "metastasis|liver": 1.0}
    assert vectors[1] == {"cyst|liver": 0.0, "metastasis|liver": 0.0}  # ground truth "[]" wins over text
    assert vectors[2] == {"cyst|liver": 1.0, "metastasis|liver": 0.0}  # "No renal ... cyst" is negated
    assert not any(vectors[3].values())
    assert FindingLabeler.from_rows(ROWS, min_count=2).labels == ()


def test_same_findings_groups_join_normal_studies_of_one_body_part_only():
    labeler = FindingLabeler(("cyst|liver",))
    ids = [labeler.group_id(r) for r in ROWS]
    assert ids[3] == ids[4] != ids[5]  # two normal abdomens; a normal head is another group
    assert len({ids[0], ids[2], ids[3]}) == 3


def test_each_rank_caches_its_studies_in_a_fixed_order_whatever_order_blocks_arrive(tmp_path):
    ids = [f"s{i:02d}" for i in range(11)]
    owner = assign_ranks(reversed(ids), world=2)
    assert [owner[s] for s in ids] == [i % 2 for i in range(11)]

    def batches(order):
        for chunk in np.array_split(np.array(order), 3):
            yield {"series_id": chunk, "report": np.array([f"report {s}" for s in chunk], dtype=object),
                   "findings": np.array(["[]"] * len(chunk), dtype=object),
                   "volume": np.stack([np.full((1, 2, 2, 2), int(s[1:]), np.float16) for s in chunk])}

    rng = np.random.default_rng(0)
    first = build_shard_cache(batches(ids), owner, 1, (1, 2, 2, 2), str(tmp_path))
    second = build_shard_cache(batches(list(rng.permutation(ids))), owner, 1, (1, 2, 2, 2), str(tmp_path))
    try:
        assert list(first.series_id) == list(second.series_id) == ids[1::2]
        assert np.array_equal(first.volumes, second.volumes)
        assert [int(v) for v in first.volumes[:, 0, 0, 0, 0]] == [1, 3, 5, 7, 9]
        assert first.report[2] == "report s05"
        assert np.array_equal(first.epoch_order(0, 3), second.epoch_order(0, 3))
        assert not np.array_equal(first.epoch_order(0, 3), first.epoch_order(0, 4))
    finally:
        first.close()
        second.close()
    with pytest.raises(RuntimeError, match="never arrived"):
        build_shard_cache(batches(ids[:5]), owner, 1, (1, 2, 2, 2), str(tmp_path))


def test_epoch_evaluation_scores_queries_without_dropout():
    import torch

    from voxsearch.encoders import ClipConfig, ClipModel
    from voxsearch.training.evaluate import score_embeddings

    torch.manual_seed(0)
    model = ClipModel(ClipConfig(vision_variant="nano", embed_dim=16))
    rng = np.random.default_rng(0)
    findings = [json.dumps([{"type": "cyst", "organ": "liver"}]) if i % 3 == 0 else "[]" for i in range(60)]
    emb = {"img": rng.normal(size=(60, 16)).astype(np.float32), "txt": rng.normal(size=(60, 16)).astype(np.float32),
           "findings": np.array(findings, dtype=object)}
    model.eval()
    expected = score_embeddings(model, emb, (60,))["findings"]
    model.train()  # as between training steps
    assert score_embeddings(model, emb, (60,))["findings"] == expected
    assert model.training  # and the caller's mode is given back


def test_finding_thresholds_show_only_calls_that_are_usually_right():
    import torch

    from voxsearch.training.evaluate import finding_thresholds

    rng = np.random.default_rng(1)
    n = 200
    has_cyst = rng.random(n) < 0.1
    sure = np.where(has_cyst, rng.uniform(0.3, 0.5, n), rng.uniform(0.0, 0.25, n))  # separable, under-confident
    noise = rng.uniform(0.0, 1.0, n)  # no signal at all

    class Stub:
        config = type("C", (), {"finding_labels": ("cyst|liver", "stone|kidney")})()

        def predict_findings(self, img):
            return torch.from_numpy(np.stack([sure, noise], 1).astype(np.float32))

    findings = [json.dumps([{"type": "cyst", "organ": "liver"}] if c else []) for c in has_cyst]
    emb = {"img": np.zeros((n, 4), np.float32), "findings": np.array(findings, dtype=object),
           "report": np.array([""] * n, dtype=object)}
    thresholds = finding_thresholds(Stub(), emb)
    assert 0.25 <= thresholds[0] <= 0.3  # the lowest threshold above every negative: well under 0.5
    assert thresholds[1] == 0.95  # a label the head cannot call reliably is not shown


def test_finding_head_applies_each_labels_threshold():
    from voxsearch.encoders import FindingHead

    head = FindingHead(["cyst|liver", "nodule|lung"], np.eye(2, 3, dtype=np.float32), np.zeros(2, np.float32),
                       thresholds=[0.6, 0.3])
    vector = np.array([0.0, 0.0, 1.0], np.float32)  # both probabilities 0.5
    assert [f["label"] for f in head.describe(vector)] == ["nodule|lung"]
    assert head.describe(vector)[0]["finding"] == "nodule in the lung"
    uncalibrated = FindingHead(head.labels, head.weight, head.bias).describe(vector)
    assert {f["label"] for f in uncalibrated} == {"cyst|liver", "nodule|lung"}  # 0.5 without calibration


def test_query_finding_weight_is_chosen_on_held_out_studies_and_saved_with_the_checkpoint(tmp_path):
    import torch

    from voxsearch.encoders import ClipConfig, ClipModel, load_clip, save_clip
    from voxsearch.training.evaluate import query_finding_weight

    torch.manual_seed(0)
    model = ClipModel(ClipConfig(vision_variant="nano", embed_dim=16, finding_labels=("cyst|liver", "nodule|lung")))
    rng = np.random.default_rng(0)
    n = 80
    kind = np.arange(n) % 4  # 0: liver cyst, 1: lung nodule, else normal
    img = rng.normal(size=(n, 16)) * 0.3
    img[kind == 0, 0] += 2.0
    img[kind == 1, 1] += 2.0
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    with torch.no_grad():  # a head that reads each finding off its own axis; the untrained text tower cannot
        model.finding_head.weight.zero_()
        model.finding_head.weight[0, 0] = model.finding_head.weight[1, 1] = 5.0
        model.finding_head.bias.zero_()
    labels = {0: [{"type": "cyst", "organ": "liver"}], 1: [{"type": "nodule", "organ": "lung", "side": "left"}]}
    emb = {"img": img.astype(np.float32), "findings": np.array([json.dumps(labels.get(k, [])) for k in kind], dtype=object)}
    best, scores = query_finding_weight(model, emb, candidates=(0.0, 1.0, 5.0, 50.0, 100.0))
    assert scores["0"] < 0.5 and scores[f"{best:g}"] == 1.0
    assert best == min(float(w) for w, p in scores.items() if p == 1.0)  # the smallest of equals
    # encode_query leans on the head by the checkpoint's weight unless told otherwise, and keeps it on disk.
    model.config.query_finding_weight = best
    model.eval()
    with torch.inference_mode():
        torch.testing.assert_close(model.encode_query(["liver cyst"]), model.encode_query(["liver cyst"], best))
        assert not torch.allclose(model.encode_query(["liver cyst"]), model.encode_query(["liver cyst"], 0.0))
    save_clip(model, tmp_path / "ckpt")
    assert load_clip(tmp_path / "ckpt").config.query_finding_weight == best
    # Without a head there is nothing to choose.
    assert query_finding_weight(ClipModel(ClipConfig(vision_variant="nano", embed_dim=16)), emb) is None
    with pytest.raises(ValueError, match="query_finding_weight"):
        ClipConfig(query_finding_weight=-1)
