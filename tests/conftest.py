"""Session-wide test fixtures: one local Ray per test run, the shared Med3DVLM fixtures, an S3 server with a
fresh bucket per test, tiny archives."""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

# Before anything imports ray or transformers: loopback tests need no token auth, and nothing may
# reach a model hub.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def med3dvlm_fixtures() -> Path:
    # Kept in the repository (copied from shared/fixtures/med3dvlm, ~10 MB) so a clone anywhere passes.
    path = REPO / "tests" / "fixtures" / "med3dvlm"
    if not path.is_dir():
        pytest.fail(f"Med3DVLM reference fixtures not found at {path}")
    return path


@pytest.fixture(scope="session")
def ray_session():
    """The one Ray of the test run; tests that need Ray take this fixture."""
    from voxsearch.common.runtime import RayConfig, init_ray

    ray = init_ray(RayConfig(num_cpus=2, object_store_memory=500_000_000))
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()


# --- object storage: moto's S3 server on 127.0.0.1 with fake keys ------------------------------------


@pytest.fixture(scope="session")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def bucket(s3_endpoint, monkeypatch) -> str:
    """A fresh bucket per test, reached the way a deployment reaches MinIO: endpoint and keys from env."""
    import pyarrow.fs as pafs

    for name in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    name = f"vox-{uuid.uuid4().hex[:12]}"
    admin = pafs.S3FileSystem(endpoint_override=s3_endpoint.split("://")[1], scheme="http", region="us-east-1",
                              allow_bucket_creation=True, connect_timeout=5, request_timeout=10)
    admin.create_dir(name)
    return f"s3://{name}"


# --- ingest fixtures (owned by the ingest component) ---------------------------------------------


@pytest.fixture(scope="session")
def synth_archive(tmp_path_factory) -> Path:
    """A tiny seeded phantom archive: 24 studies (CT and MR; head, chest, abdomen; a quarter as
    DICOM series with planted fake patient identifiers), manifest.csv with ground-truth findings."""
    from voxsearch.ingest import SynthConfig, generate_archive

    out = tmp_path_factory.mktemp("synth") / "archive"
    return generate_archive(SynthConfig(n=24, seed=7, out=out, size="tiny", dicom_share=0.25))


@pytest.fixture(scope="session")
def tiny_catalog(synth_archive, ray_session, tmp_path_factory) -> Path:
    """The catalog folder ingested (on the test Ray) from `synth_archive`; read it with
    voxsearch.ingest.read_catalog and load volumes with voxsearch.ingest.load_volume."""
    from voxsearch.ingest import IngestConfig, read_catalog, run_ingest

    out = tmp_path_factory.mktemp("catalog") / "catalog"
    summary = run_ingest(IngestConfig(archive=synth_archive, out=out, salt="test-salt", progress=False))
    if summary.failed or read_catalog(out).num_rows != 24:
        pytest.fail(f"tiny_catalog ingest incomplete: {summary}")
    return out
