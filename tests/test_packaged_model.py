"""The checkpoint shipped in the package: small, documented, and it finds what the demo suggests on
phantom studies drawn with a seed its training never saw."""

from __future__ import annotations

import json

import numpy as np
import pytest

from phantom_eval_testlib import DEMO_QUERIES, draw_phantoms, query_precision
from voxsearch.encoders import load_clip, packaged_checkpoint, read_clip_meta
from voxsearch.ingest import PreprocessConfig

UNSEEN_SEED = 31337  # training used the bench archive (seed 0); the demo draws seed 2026


def test_packaged_checkpoint_is_small_and_says_how_it_was_made():
    ckpt = packaged_checkpoint()
    size = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
    assert size < 10_000_000
    meta = read_clip_meta(ckpt)
    assert meta["text_weights"] == "packaged" and meta["clip_config"]["finding_labels"]
    made = json.loads((ckpt / "TRAINED.json").read_text())
    assert any("voxsearch train clip" in c for c in made["commands"])
    assert made["test_metrics"]["P@10"] > made["test_metrics"]["chance_P@10"]
    with pytest.raises(FileNotFoundError, match="no packaged checkpoint"):
        packaged_checkpoint("no-such-model")


@pytest.fixture(scope="module")
def unseen():
    ckpt = packaged_checkpoint()
    model = load_clip(ckpt).prepare_for_inference()
    pp = PreprocessConfig.from_dict(read_clip_meta(ckpt)["extra"]["preprocess"])
    return model, draw_phantoms(300, UNSEEN_SEED, pp)


def test_demo_queries_find_lesions_where_they_ask_on_unseen_phantoms(unseen):
    # What the shipped model achieves (TRAINED.json): every one of the first five hits of each demo query is
    # an abnormal study of the body part the query names, and the named finding is among them at several
    # times its share. The goal of five out of five with the finding is not reached (issue "Search that
    # sees pathology"): "brain hemorrhage" (CT +60 HU, MR +300 over brain) is mostly answered with brain
    # masses (+90 HU, +260), the lesions that look most like it.
    model, phantoms = unseen
    results = query_precision(model, phantoms, list(DEMO_QUERIES), k=5)
    for query, result in results.items():
        assert result["relevant"] >= 5, f"the unseen sample must hold enough studies with {query!r}"
        assert all(result["hits_abnormal_in_body"]), (query, result)
    precision = np.mean([r["P@5"] for r in results.values()])
    chance = np.mean([r["chance"] for r in results.values()])
    assert precision >= max(0.4, 5 * chance), results
    assert sum(r["hits_carry"][0] for r in results.values()) >= 2, results
