"""The checkpoint shipped in the package: small, documented, and it finds what the demo suggests on
phantom studies drawn with a seed its training never saw."""

from __future__ import annotations

import json

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


@pytest.mark.parametrize("query", list(DEMO_QUERIES))
def test_demo_queries_find_their_finding_on_unseen_phantoms(unseen, query):
    # What the shipped model achieves (TRAINED.json): the first hit carries the finding and so do at least
    # two of the first five, 7-10x the share of studies that carry it. The goal of five out of five is
    # not reached yet (issue "Search that sees pathology").
    model, phantoms = unseen
    result = query_precision(model, phantoms, [query], k=5)[query]
    assert result["relevant"] >= 5, "the unseen sample must hold enough studies with the finding"
    assert result["hits_carry"][0], result
    assert result["P@5"] >= max(0.4, 5 * result["chance"]), result
