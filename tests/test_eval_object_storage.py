"""`voxsearch eval` and report models with s3:// URIs, against moto's S3 server (tests/conftest.py): the
catalog (and the volumes its rows point at) read from the bucket, CLIP checkpoints and report models
fetched once per machine into the checkpoint cache, the serve config's report_model checked there."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from test_object_storage import _upload_folder, downloads  # noqa: F401 (a fixture)
from voxsearch.common.storage import location

CLIP_SIZE = (32, 64, 64)
REPORT_IMAGE = (32, 64, 64)
TEXTS = ["There is a 12 mm nodule in the right lung.", "No abnormality is seen.", "A 20 mm cyst in the liver."]


# -- eval retrieval --------------------------------------------------------------------------------------


@pytest.fixture
def data_workers_reach_moto(ray_session, bucket, monkeypatch):
    """Ray Data's preprocessing actors read the bucket's volumes themselves. The session's Ray started its
    workers before `bucket` set the AWS_* variables, so the actors are given them (on a cluster each node
    has its own)."""
    import ray.data

    env = {name: os.environ[name] for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                               "AWS_REGION")}
    real = ray.data.Dataset.map_batches

    def with_env(self, fn, *args, **kwargs):
        kwargs.setdefault("runtime_env", {"env_vars": env})
        return real(self, fn, *args, **kwargs)

    monkeypatch.setattr(ray.data.Dataset, "map_batches", with_env)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A small random CLIP checkpoint (text weights from the installed package)."""
    import torch

    from voxsearch.encoders import ClipConfig, ClipModel, TextTowerConfig, save_clip

    torch.manual_seed(0)
    model = ClipModel(ClipConfig(vision_variant="nano", embed_dim=16, text=TextTowerConfig(max_length=32),
                                 image_size=CLIP_SIZE))
    return save_clip(model, tmp_path_factory.mktemp("clip") / "ckpt", packaged_text=True,
                     extra={"preprocess": {"spatial_size": list(CLIP_SIZE)}})


def _catalogs(bucket: str, tmp_path, n: int = 8):
    """A small NIfTI archive (a report beside each volume) in the bucket, ingested into a catalog there;
    and the same catalog locally, its rows pointing at a local copy of the archive. (Ingesting the local
    copy would draw other splits: a NIfTI's patient key comes from its path.)"""
    from test_ingest_helpers import phantom_hu, save_nifti
    from voxsearch.ingest import IngestConfig, read_catalog, run_ingest
    from voxsearch.ingest.catalog import CatalogWriter

    archive = tmp_path / "archive"
    archive.mkdir()
    for i in range(n):
        # Shapes differ, so a random model tells the scans apart: no near-ties that batching could flip.
        save_nifti(archive / f"v{i}.nii.gz", phantom_hu(shape=(12 + 3 * i, 24 - i, 12 + i), seed=i), np.eye(4))
        (archive / f"v{i}.txt").write_text(f"FINDINGS: a {3 + 2 * i} mm nodule in the {['liver', 'lung'][i % 2]}.")
    _upload_folder(archive, f"{bucket}/archive")
    summary = run_ingest(IngestConfig(archive=f"{bucket}/archive", out=f"{bucket}/catalog", engine="local",
                                      progress=False, salt="s", check_preprocess=None))
    assert (summary.added, summary.failed) == (n, 0)
    remote = read_catalog(f"{bucket}/catalog")

    def here(value):
        return value.replace(f"{bucket}/archive", str(archive)) if isinstance(value, str) else value

    writer = CatalogWriter(tmp_path / "catalog", "local")
    for row in remote.to_pylist():
        writer.add_row({**row, "source_path": here(row["source_path"]),
                        "source_files": [here(f) for f in row["source_files"]] if row["source_files"] else None})
    writer.close({"rows": n})
    local = read_catalog(tmp_path / "catalog")
    assert local.num_rows == n and str(archive) in local.column("source_path").to_pylist()[0]
    return local, remote


def test_eval_retrieval_from_the_bucket_scores_like_local_folders(bucket, clip_folder, tmp_path, downloads,
                                                                  data_workers_reach_moto, capsys, monkeypatch):
    from voxsearch.cli import main

    monkeypatch.chdir(tmp_path)  # where Path("s3://...") would make up a local folder "s3:"
    local, remote = _catalogs(bucket, tmp_path)
    downloads.clear()  # the ingest's reads
    # The bucket's rows point at the bucket's volumes: the preprocessing workers read them from there.
    assert sorted(remote.column("source_path").to_pylist()) == sorted(
        f"{bucket}/archive/v{i}.nii.gz" for i in range(local.num_rows))
    splits = local.column("split").to_pylist()
    split = max(set(splits), key=splits.count)
    assert splits.count(split) >= 3
    _upload_folder(clip_folder, f"{bucket}/models/clip")

    def evaluate(checkpoint: str, catalog: str, name: str) -> dict:
        out = tmp_path / f"{name}.json"
        assert main(["eval", "retrieval", "--checkpoint", checkpoint, "--catalog", catalog, "--split", split,
                     "--ns", "100", "--workers", "1", "--batch-size", "4", "--json", str(out)]) == 0
        return json.loads(out.read_text())

    here = evaluate(str(clip_folder), str(tmp_path / "catalog"), "local")
    assert not downloads
    there = evaluate(f"{bucket}/models/clip", f"{bucket}/catalog", "remote")
    assert sorted(d for d in downloads if "/models/" in d) == sorted(f"{bucket}/models/clip/{p.relative_to(clip_folder).as_posix()}"
                                       for p in clip_folder.rglob("*") if p.is_file())
    assert list((tmp_path / "cache" / "checkpoints").iterdir())  # the copy is in the checkpoint cache
    assert not list(tmp_path.glob("s3*"))
    [n] = here["recall"]
    assert int(n) == splits.count(split)
    assert there["recall"].keys() == here["recall"].keys()
    assert there["recall"][n] == pytest.approx(here["recall"][n], abs=1e-6)
    assert there["integrity"] == here["integrity"] and there["preprocess_id"] == here["preprocess_id"]
    capsys.readouterr()
    # Missing objects: an error naming the URI, no traceback, no local folder made up.
    assert main(["eval", "retrieval", "--checkpoint", f"{bucket}/models/none", "--catalog",
                 f"{bucket}/catalog"]) == 1
    assert main(["eval", "retrieval", "--checkpoint", f"{bucket}/models/clip", "--catalog",
                 f"{bucket}/nothing"]) == 1


def test_retrieval_evaluation_api_takes_uris(bucket, clip_folder, tmp_path, downloads, data_workers_reach_moto):
    """evaluate_retrieval and load_catalog themselves (not only the command) read URIs."""
    from voxsearch.training import evaluate_retrieval
    from voxsearch.training.data import load_catalog

    local, remote = _catalogs(bucket, tmp_path, n=4)
    assert load_catalog(f"{bucket}/catalog").equals(remote)
    with pytest.raises(FileNotFoundError, match=f"catalog not found: {bucket}/none$"):
        load_catalog(f"{bucket}/none")
    _upload_folder(clip_folder, f"{bucket}/models/clip")
    split = remote.column("split").to_pylist()[0]
    result = evaluate_retrieval(f"{bucket}/models/clip", f"{bucket}/catalog", split=split, ns=(100,), workers=1,
                                batch_size=4, allow_split_overlap=True)
    assert result["split"] == split and result["recall"]
    with pytest.raises(FileNotFoundError, match=f"checkpoint directory not found: {bucket}/models/none$"):
        evaluate_retrieval(f"{bucket}/models/none", f"{bucket}/catalog", split=split)


# -- report models ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def report_folder(tmp_path_factory):
    from tiny_lm_testlib import build_tiny_lm
    from voxsearch.reports.model import ReportModelConfig, build_report_model, save_report_model

    lm_dir = build_tiny_lm(tmp_path_factory.mktemp("tiny_lm"), TEXTS * 4)
    cfg = ReportModelConfig(vision_variant="nano", image_size=REPORT_IMAGE, lm=str(lm_dir), low_tokens=(8, 4),
                            high_tokens=(4, 4))
    model = build_report_model(cfg, preprocess={"spatial_size": list(REPORT_IMAGE)}, seed=3)
    return save_report_model(model, tmp_path_factory.mktemp("report") / "model", extra={"stage": 2})


def test_report_model_from_the_bucket_equals_the_local_one_and_is_fetched_once(bucket, report_folder, tmp_path,
                                                                              downloads, capsys, monkeypatch):
    import torch

    monkeypatch.chdir(tmp_path)  # where Path("s3://...") would make up a local folder "s3:"
    from test_ingest_helpers import phantom_hu, save_nifti
    from voxsearch.cli import main
    from voxsearch.reports.model import load_report_model, read_report_meta

    uri = f"{bucket}/models/report"
    _upload_folder(report_folder, uri)
    here, there = load_report_model(report_folder), load_report_model(uri)
    objects = sorted(p for p in report_folder.rglob("*") if p.is_file())
    assert len(downloads) == len(objects)
    mine, theirs = here.state_dict(), there.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert there.preprocess == here.preprocess
    torch.manual_seed(0)
    image = torch.rand(1, 1, *REPORT_IMAGE)
    assert there.generate(image, "Is there a nodule?", max_new_tokens=6) == here.generate(
        image, "Is there a nodule?", max_new_tokens=6)
    assert read_report_meta(uri) == read_report_meta(report_folder)
    assert len(downloads) == len(objects)  # read from the machine's copy since

    # `voxsearch report --model s3://...` prints what the local folder's model prints.
    scan = save_nifti(tmp_path / "scan.nii.gz", phantom_hu(seed=5), np.eye(4))
    capsys.readouterr()
    assert main(["report", str(scan), "--model", str(report_folder), "--max-new-tokens", "5"]) == 0
    printed = capsys.readouterr().out
    assert main(["report", str(scan), "--model", uri, "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out == printed
    assert len(downloads) == len(objects)
    assert not list(tmp_path.glob("s3*"))

    with pytest.raises(FileNotFoundError, match=f"{bucket}/models/none: no objects under it"):
        load_report_model(f"{bucket}/models/none")
    location(f"{bucket}/models/odd/notes.txt").write_text("not a model")
    with pytest.raises(FileNotFoundError, match=f"{bucket}/models/odd is not a report model directory"):
        load_report_model(f"{bucket}/models/odd")


def test_serve_config_takes_a_report_model_uri(bucket, report_folder, tmp_path, s3_endpoint):
    from voxsearch.serve.config import ServeConfig, ServeConfigError

    for name in ("index", "ckpt", "catalog"):
        (tmp_path / name).mkdir()
    _upload_folder(report_folder, f"{bucket}/models/report")

    def config(report_model: str) -> ServeConfig:
        return ServeConfig(index=str(tmp_path / "index"), checkpoint=str(tmp_path / "ckpt"),
                           catalog=str(tmp_path / "catalog"), report_model=report_model)

    config(f"{bucket}/models/report").validate()
    config(str(report_folder)).validate()
    with pytest.raises(ServeConfigError, match=f"report_model directory {bucket}/models/missing does not exist"):
        config(f"{bucket}/models/missing").validate()
    with pytest.raises(ServeConfigError, match=f"report_model directory {tmp_path}/missing does not exist"):
        config(str(tmp_path / "missing")).validate()
    keyed = (f"{bucket}/models/missing?access_key=AKIDPLANTED&secret_key=planted-secret"
             f"&endpoint_override={s3_endpoint.split('://')[1]}&scheme=http")
    with pytest.raises(ServeConfigError) as failed:
        config(keyed).validate()
    assert f"{bucket}/models/missing" in str(failed.value)
    assert "planted" not in str(failed.value) and "AKID" not in str(failed.value) and "?" not in str(failed.value)
