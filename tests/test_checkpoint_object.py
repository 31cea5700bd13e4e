"""One checkpoint object (voxsearch.encoders.open_checkpoint) behind every user of a CLIP checkpoint:
embedding, serving, evaluation and the report model's vision init read the same contract and accept
the same checkpoints; the server refuses an index of another model."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from voxsearch.encoders import ClipConfig, ClipModel, TextTowerConfig, open_checkpoint, packaged_checkpoint, save_clip
from voxsearch.ingest import PreprocessConfig

SIZE = (32, 64, 64)
OTHER_MODEL = "0123456789abcdef"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    """Checkpoint folders of every kind the project writes, and a broken one. Text weights come from the
    installed package (export_clip's small form) to keep the folders small."""
    root = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    model = ClipModel(ClipConfig(vision_variant="nano", embed_dim=16, text=TextTowerConfig(max_length=32),
                                 image_size=SIZE, finding_labels=("mass|liver",)))
    trained = PreprocessConfig(spatial_size=SIZE, ct_window=(50.0, 350.0)).to_dict()
    other_size = PreprocessConfig(spatial_size=(16, 32, 32)).to_dict()
    return {
        "trained": save_clip(model, root / "trained", extra={"preprocess": trained}, packaged_text=True),
        # What an imported Med3DVLM model saved with save_clip looks like: no preprocessing recorded.
        "no_contract": save_clip(model, root / "no_contract", packaged_text=True),
        "packaged": packaged_checkpoint(),
        "other_size": save_clip(model, root / "other_size", extra={"preprocess": other_size}, packaged_text=True),
    }


def _accepts(load) -> bool | str:
    try:
        load()
    except (ValueError, OSError, RuntimeError) as exc:
        return str(exc)
    return True


def test_open_checkpoint_reads_model_contract_and_id(checkpoints, tmp_path):
    opened = open_checkpoint(checkpoints["trained"])
    assert opened.image_size == SIZE and opened.embed_dim == 16
    assert PreprocessConfig.from_dict(opened.preprocess) == PreprocessConfig(spatial_size=SIZE, ct_window=(50.0, 350.0))
    # The id names config and weights: the same as the published formula, stable across opens.
    folder = checkpoints["trained"]
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    digest.update(hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest().encode())
    assert opened.model_id == digest.hexdigest()[:16] == open_checkpoint(folder).model_id
    assert opened.finding_head().labels == ("mass|liver",)
    model = opened.load_model(inference=True)
    assert not model.training and model.vision.bn_folded

    # No recorded preprocessing, or one without a size: the defaults at the model's own size.
    assert open_checkpoint(checkpoints["no_contract"]).preprocess == {"spatial_size": list(SIZE)}
    sizeless = tmp_path / "sizeless"
    sizeless.mkdir()
    meta = json.loads((folder / "config.json").read_text())
    meta["extra"]["preprocess"] = {"ct_window": [50.0, 350.0]}
    (sizeless / "config.json").write_text(json.dumps(meta))
    (sizeless / "model.safetensors").symlink_to(folder / "model.safetensors")
    assert PreprocessConfig.from_dict(open_checkpoint(sizeless).preprocess).spatial_size == SIZE


def test_embed_serve_and_evaluation_accept_the_same_checkpoints(checkpoints, tmp_path):
    from voxsearch.embed.mapper import BulkEncoder
    from voxsearch.embed.runner import resolve_model
    from voxsearch.serve.config import ServeConfig
    from voxsearch.serve.deployments import ImageEncoder
    from voxsearch.training.evaluate import _model_and_preprocess

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    kinds = {**checkpoints, "broken": broken, "missing": tmp_path / "missing"}
    for kind, path in kinds.items():
        by = {
            "embed driver": _accepts(lambda: resolve_model(path)),
            "embed actor": _accepts(lambda: BulkEncoder(str(path), with_text=False, threads=1)),
            "serve": _accepts(lambda: ImageEncoder.func_or_class(ServeConfig(checkpoint=str(path)))),
            "evaluate": _accepts(lambda: _model_and_preprocess(path, None)),
        }
        accepted = {name for name, answer in by.items() if answer is True}
        if kind in ("trained", "no_contract", "packaged"):
            assert accepted == set(by), (kind, by)
        else:
            assert not accepted, (kind, by)
            assert all(path.name in answer for answer in by.values()), (kind, by)
    # A recorded preprocessing at another size than the model's is refused by all, saying why.
    assert "spatial_size (16, 32, 32) differs" in _accepts(lambda: resolve_model(checkpoints["other_size"]))
    # The preprocessing each one uses is the checkpoint's own.
    assert resolve_model(checkpoints["trained"]).preprocess.ct_window == (50.0, 350.0)
    assert _model_and_preprocess(checkpoints["trained"], None)[1].ct_window == (50.0, 350.0)


def _index(folder, model_id: str | None, seed: int = 0):
    from voxsearch.index import VectorIndex

    vectors = np.random.default_rng(seed).normal(size=(8, 16)).astype(np.float32)
    source = {"model_id": model_id} if model_id else None
    return VectorIndex.build([f"s{seed}-{i}" for i in range(8)], vectors, source=source).save(folder)


def test_server_refuses_an_index_embedded_by_another_model(checkpoints, tmp_path, capsys):
    from voxsearch.serve.app import serve_until_stopped
    from voxsearch.serve.config import ServeConfig
    from voxsearch.serve.deployments import IndexSearcher

    mine = open_checkpoint(checkpoints["trained"]).model_id
    _index(tmp_path / "other", OTHER_MODEL)
    (tmp_path / "catalog").mkdir()
    config = ServeConfig(index=str(tmp_path / "other"), checkpoint=str(checkpoints["trained"]),
                         catalog=str(tmp_path / "catalog"))
    # Refused before anything starts, saying which two models: what the user sees.
    assert serve_until_stopped(config, exit_after=0) == 2
    said = capsys.readouterr().out
    assert OTHER_MODEL in said and mine in said
    # A replica built another way (build_app) refuses it as well.
    with pytest.raises(ValueError) as refused:
        IndexSearcher.func_or_class(config)
    assert OTHER_MODEL in str(refused.value) and mine in str(refused.value)

    _index(tmp_path / "mine", mine)
    searcher = IndexSearcher.func_or_class(ServeConfig(index=str(tmp_path / "mine"),
                                                       checkpoint=str(checkpoints["trained"]), index_poll_s=3600))
    try:
        assert searcher.info()["model_id"] == mine
        live = searcher.holder.version
        # A new version written by another model is never swapped in: the live one keeps serving.
        _index(tmp_path / "mine", OTHER_MODEL, seed=1)
        with pytest.raises(ValueError, match=OTHER_MODEL):
            searcher.holder.reload()
        assert searcher.holder.version == live and searcher.info()["model_id"] == mine
    finally:
        searcher._stop.set()


def test_report_vision_init_brings_its_image_size_and_preprocessing(checkpoints, tmp_path):
    from voxsearch.cli import build_parser
    from voxsearch.commands.report import build_train_config
    from voxsearch.reports.model import read_report_meta
    from tiny_lm_testlib import build_tiny_lm
    from voxsearch.reports.train import _initial_model

    lm = build_tiny_lm(tmp_path / "lm", ["No abnormality is seen.", "A mass in the liver."] * 4)
    argv = ["train", "report", "--stage", "1", "--catalog", str(tmp_path), "--out", str(tmp_path / "out"),
            "--lm", str(lm), "--vision-init", str(checkpoints["trained"]), "--visual-tokens", "4", "4"]
    init_dir, preprocess = _initial_model(build_train_config(build_parser().parse_args(argv)), tmp_path / "work")
    assert tuple(preprocess["spatial_size"]) == SIZE and preprocess["ct_window"] == [50.0, 350.0]
    meta = read_report_meta(init_dir)
    assert tuple(meta["config"]["image_size"]) == SIZE and meta["config"]["vision_variant"] == "nano"

    with pytest.raises(ValueError, match="--vision-init"):
        build_train_config(build_parser().parse_args([*argv, "--image-size", "16", "32", "32"]))
