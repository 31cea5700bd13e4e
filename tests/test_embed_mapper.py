"""The pipeline's stages called in-process (no Ray): read task, model actor, driver-side row assembly."""

from __future__ import annotations

import gzip

import numpy as np
import pyarrow as pa
import pytest
from embed_testlib import EMBED_DIM, make_checkpoint

from voxsearch.embed.mapper import BulkEncoder, load_row
from voxsearch.embed.reader import loader_blocks
from voxsearch.embed.runner import _Batches, _driver_meta, resolve_model
from voxsearch.embed.shards import embedding_schema


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.getbasetemp() / "embed_checkpoint")


@pytest.fixture(scope="module")
def catalog(synth_archive, tmp_path_factory) -> pa.Table:
    from voxsearch.ingest import IngestConfig, read_catalog, run_ingest

    out = tmp_path_factory.mktemp("embed_local_catalog") / "catalog"
    run_ingest(IngestConfig(archive=synth_archive, out=out, engine="local", salt="test-salt", progress=False,
                            check_preprocess=None))
    return read_catalog(out).slice(0, 6)


def _batch(outputs: list[dict]) -> dict:
    """What Ray Data hands the actor: one numpy column per key."""
    batch = {k: np.array([o[k] for o in outputs]) for k in outputs[0] if k not in ("volume", "report")}
    batch["volume"] = np.stack([o["volume"] for o in outputs])
    batch["report"] = np.array([o["report"] for o in outputs], dtype=object)
    return batch


def test_stages_give_the_model_output_and_one_row_per_input(catalog, checkpoint, tmp_path):
    import torch

    from voxsearch.encoders import load_clip
    from voxsearch.ingest import load_volume

    model_info = resolve_model(checkpoint)
    rows = pa.concat_tables(loader_blocks(catalog, with_text=True, rows_per_block=2)).to_pylist()
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(gzip.compress(b"garbage"))
    rows[1]["source_path"], rows[1]["source_format"] = str(corrupt), "nifti"
    rows[2]["source_path"] = str(tmp_path / "missing.nii.gz")

    outputs = [load_row(r, model_info.preprocess.to_dict()) for r in rows]
    assert [bool(o["error"]) for o in outputs] == [False, True, True, False, False, False]
    assert "missing.nii.gz" in outputs[2]["error"] and outputs[2]["stage"] == "read"
    assert all(o["volume"].shape == (1, 32, 64, 64) and o["t_read"] >= 0 for o in outputs)

    encoded = BulkEncoder(str(checkpoint), with_text=True, threads=1)(_batch(outputs))
    model = load_clip(checkpoint)
    good = [0, 3, 4, 5]
    with torch.no_grad():
        direct = model.encode_image(torch.from_numpy(np.stack([load_volume(catalog.to_pylist()[i],
                                                                            model_info.preprocess) for i in good])))
        direct_text = model.encode_text([rows[i]["report"] for i in good])
    np.testing.assert_allclose(encoded["vector"][good], direct.numpy(), atol=1e-5)
    np.testing.assert_allclose(encoded["text_vector"][good], direct_text.numpy(), atol=1e-5)
    assert not encoded["has_text"][[1, 2]].any()

    schema = embedding_schema(catalog.schema, EMBED_DIM, EMBED_DIM, "float32")
    batches = _Batches(_driver_meta(catalog), schema, model_info.model_id, model_info.preprocess.id, np.float32)
    embedded, errors, arrived = batches.split(encoded)
    assert arrived == 6 and embedded.num_rows == 4 and errors.num_rows == 2
    assert embedded.schema == schema
    assert embedded.column("id").to_pylist() == [rows[i]["series_id"] for i in good]
    assert errors.column("id").to_pylist() == [rows[1]["series_id"], rows[2]["series_id"]]
    assert embedded.column("study_id").to_pylist() == [catalog.column("study_id")[i].as_py() for i in good]
    # A retried task delivering the same rows again must not produce rows twice.
    again, again_errors, arrived_again = batches.split(encoded)
    assert (again.num_rows, again_errors.num_rows, arrived_again) == (0, 0, 0)
    assert set(batches.stage_seconds) == {"read", "preprocess", "model"}


def test_a_volume_that_makes_the_model_fail_becomes_an_error_row(catalog, checkpoint):
    model_info = resolve_model(checkpoint)
    rows = pa.concat_tables(loader_blocks(catalog.slice(0, 2), with_text=False, rows_per_block=2)).to_pylist()
    batch = _batch([dict(load_row(r, model_info.preprocess.to_dict()), report="") for r in rows])
    batch["volume"][1] = np.nan  # e.g. a decoder bug upstream: NaN must never reach the index
    out = BulkEncoder(str(checkpoint), with_text=False, threads=1)(batch)
    assert list(out["error"] != "") == [False, True]
    assert out["stage"][1] == "model" and np.isfinite(out["vector"][0]).all()
