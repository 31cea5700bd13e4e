"""`run_embedding` end to end on the tiny synthetic catalog: exactly-once rows, parity with the model applied
directly, bad input, changed content, the index, and `voxsearch search` over it."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pyarrow as pa
import pytest
from embed_testlib import EMBED_DIM, ids_of, make_checkpoint, shard_table

from voxsearch.embed import EmbedConfig, run_embedding
from voxsearch.embed import runner as embed_runner
from voxsearch.common.runtime import RayConfig


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.getbasetemp() / "embed_checkpoint")


@pytest.fixture(scope="module")
def catalog_table(tiny_catalog):
    from voxsearch.ingest import read_catalog

    return read_catalog(tiny_catalog)


def _config(catalog, checkpoint, out, **kw) -> EmbedConfig:
    return EmbedConfig(catalog=catalog, checkpoint=checkpoint, out=out, shard_rows=4, batch_size=3, progress=False,
                       ray=RayConfig(num_cpus=2), **kw)


@pytest.fixture(scope="module")
def embedded(ray_session, tiny_catalog, checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("embed_main")
    cfg = _config(tiny_catalog, checkpoint, folder / "emb", index=folder / "idx")
    return cfg, run_embedding(cfg)


def test_every_catalog_row_ends_as_exactly_one_row(embedded, catalog_table):
    cfg, summary = embedded
    good, bad = ids_of(cfg.out), ids_of(cfg.out, errors=True)
    assert len(good) == len(set(good)) and len(bad) == len(set(bad)) and not set(good) & set(bad)
    assert sorted(good + bad) == sorted(catalog_table.column("series_id").to_pylist())
    assert summary.embedded == len(good) > 0 and summary.failed == len(bad) and summary.skipped == 0
    assert set(summary.stage_seconds) == {"read", "preprocess", "model", "write"}


def test_pipeline_vectors_equal_the_model_applied_directly(embedded, catalog_table, checkpoint):
    import torch

    from voxsearch.encoders import load_clip, model_id
    from voxsearch.ingest import PreprocessConfig, load_volume
    from voxsearch.embed.runner import resolve_model

    cfg, _ = embedded
    stored = shard_table(cfg.out)
    assert set(stored.column("model_id").to_pylist()) == {model_id(checkpoint)}
    preprocess = resolve_model(checkpoint).preprocess
    assert preprocess == PreprocessConfig(spatial_size=(32, 64, 64))  # from the checkpoint's extra
    assert set(stored.column("preprocess_id").to_pylist()) == {preprocess.id}
    model = load_clip(checkpoint)  # plain eval model: no BN folding, no Ray
    rows = {r["series_id"]: r for r in catalog_table.to_pylist()}
    picked = [r for r in stored.to_pylist() if rows[r["id"]]["report"]][:3]
    assert len(picked) == 3
    with torch.no_grad():
        volumes = torch.from_numpy(np.stack([load_volume(rows[r["id"]], preprocess) for r in picked]))
        direct = model.encode_image(volumes).numpy()
        texts = [rows[r["id"]]["report"] for r in picked]
        direct_text = model.encode_text(texts).numpy()
    np.testing.assert_allclose(np.array([r["vector"] for r in picked]), direct, atol=1e-5)
    np.testing.assert_allclose(np.array([r["text_vector"] for r in picked]), direct_text, atol=1e-5)
    assert stored.schema.field("vector").type == pa.list_(pa.float32(), EMBED_DIM)
    for r in picked:  # metadata copied from the catalog row
        for col in ("study_id", "modality", "body_part", "split", "abnormal", "content_sha256"):
            assert r[col] == rows[r["id"]][col]


def test_index_holds_every_embedding_and_finds_each_by_its_vector(embedded):
    from voxsearch.index import VectorIndex

    cfg, summary = embedded
    index = VectorIndex.load(cfg.index)
    stored = shard_table(cfg.out)
    assert sorted(index.ids()) == sorted(stored.column("id").to_pylist())
    assert summary.index["action"] == "built" and summary.index["size"] == stored.num_rows
    probe = stored.slice(1, 1).to_pylist()[0]
    hit = index.search(np.array([probe["vector"]], np.float32), k=1)[0][0]
    assert hit.id == probe["id"] and hit.score == pytest.approx(1.0, abs=1e-4)
    assert hit.metadata["modality"] == probe["modality"]


def test_rerun_skips_everything_and_writes_nothing(embedded):
    cfg, first = embedded
    before = sorted(p.name for p in cfg.out.rglob("part-*.parquet"))
    again = run_embedding(cfg)
    assert (again.embedded, again.failed, again.skipped) == (0, 0, first.embedded + first.failed)
    assert sorted(p.name for p in cfg.out.rglob("part-*.parquet")) == before
    assert again.index["action"] == "unchanged"


def test_bad_and_changed_inputs(ray_session, tiny_catalog, catalog_table, checkpoint, tmp_path, monkeypatch):
    """Corrupt and missing files become error rows; a series whose content changed is redone once and
    the index follows (replaced, or dropped when the new content fails)."""
    from voxsearch.index import VectorIndex

    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(gzip.compress(b"not a nifti header at all"))
    ids = catalog_table.column("series_id").to_pylist()
    paths = catalog_table.column("source_path").to_pylist()
    formats = catalog_table.column("source_format").to_pylist()
    nifti = [i for i, f in enumerate(formats) if f == "nifti"]
    broken = {nifti[0]: str(corrupt), nifti[1]: str(tmp_path / "missing.nii.gz")}

    def with_paths(replaced: dict, sha_suffix: dict) -> pa.Table:
        table = catalog_table.set_column(
            catalog_table.schema.get_field_index("source_path"), "source_path",
            pa.array([replaced.get(i, p) for i, p in enumerate(paths)], pa.string()))
        shas = table.column("content_sha256").to_pylist()
        return table.set_column(table.schema.get_field_index("content_sha256"), "content_sha256",
                                pa.array([s + sha_suffix.get(i, "") for i, s in enumerate(shas)], pa.string()))

    # Reads as tasks of their own here (the other runs read inside the model actor, the default on 2 CPUs):
    # bad inputs become error rows either way.
    cfg = _config(tiny_catalog, checkpoint, tmp_path / "emb", index=tmp_path / "idx", read_in_model_actor=False)
    monkeypatch.setattr(embed_runner, "load_catalog", lambda _: with_paths(broken, {}))
    first = run_embedding(cfg)
    errors = shard_table(cfg.out, errors=True).to_pylist()
    by_id = {e["id"]: e for e in errors}
    assert {ids[i] for i in broken} <= set(by_id)
    assert "missing.nii.gz" in by_id[ids[nifti[1]]]["error"]  # the message names the input
    assert first.embedded + first.failed == len(ids)

    # Series nifti[2] was replaced by new content (now corrupt), nifti[3] by new readable content.
    changed = {**broken, nifti[2]: str(corrupt)}
    monkeypatch.setattr(embed_runner, "load_catalog", lambda _: with_paths(changed, {nifti[2]: "-v2", nifti[3]: "-v2"}))
    second = run_embedding(_config(tiny_catalog, checkpoint, tmp_path / "emb", index=tmp_path / "idx"))
    assert second.actors["reads_in_actor"] and not first.actors["reads_in_actor"]
    assert (second.superseded, second.embedded, second.failed) == (2, 1, 1)
    good, bad = ids_of(cfg.out), ids_of(cfg.out, errors=True)
    assert sorted(good + bad) == sorted(ids) and len(set(good + bad)) == len(ids)
    assert ids[nifti[2]] in bad and ids[nifti[3]] in good
    index = VectorIndex.load(cfg.index)
    assert sorted(index.ids()) == sorted(good)  # nifti[2] left the index, nifti[3] was replaced
    assert second.index["deleted"] == 1

    # The files are fixed and the content is back: failed rows are redone with --retry-failed (their
    # error rows replaced), changed rows are redone again.
    monkeypatch.setattr(embed_runner, "load_catalog", lambda _: catalog_table)
    third = run_embedding(_config(tiny_catalog, checkpoint, tmp_path / "emb", index=tmp_path / "idx", retry_failed=True))
    good, bad = ids_of(cfg.out), ids_of(cfg.out, errors=True)
    assert {ids[i] for i in nifti[:4]} <= set(good)
    assert sorted(good + bad) == sorted(ids) and len(set(good + bad)) == len(ids)
    assert third.embedded >= 4 and sorted(VectorIndex.load(cfg.index).ids()) == sorted(good)


def test_search_command_text_like_scan_and_filters(embedded, catalog_table, checkpoint, capsys):
    from voxsearch.cli import main

    cfg, _ = embedded
    stored = shard_table(cfg.out).to_pylist()
    assert main(["search", "small nodule in the lung", "--index", str(cfg.index), "--checkpoint", str(checkpoint),
                 "--k", "3"]) == 0
    out = capsys.readouterr().out
    assert "score" in out and "study_id" in out and "report" in out
    assert len([line for line in out.splitlines()[2:] if line.strip()]) == 3

    probe = stored[0]
    assert main(["search", "--like", probe["id"], "--index", str(cfg.index), "--k", "4", "--json"]) == 0
    hits = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(hits) == 4 and probe["id"] not in [h["id"] for h in hits]

    modality = probe["modality"]
    assert main(["search", "--like", probe["id"], "--index", str(cfg.index), "--filter", f"modality={modality}",
                 "--json"]) == 0
    hits = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert hits and {h["modality"] for h in hits} == {modality}

    row = next(r for r in catalog_table.to_pylist() if r["series_id"] == probe["id"])
    if row["source_format"] in ("nifti", "npy"):
        assert main(["search", "--scan", row["source_path"], "--index", str(cfg.index), "--checkpoint",
                     str(checkpoint), "--k", "1", "--json"]) == 0
        top = json.loads(capsys.readouterr().out.splitlines()[0])
        assert top["id"] == probe["id"] and top["score"] > 0.999

    assert main(["search", "--like", "no-such-series", "--index", str(cfg.index)]) == 2
    assert "no such series" in capsys.readouterr().err
