"""Hostile input to the server, without Ray: decompression bombs, body limits, the loopback guard.

Uploads: a header that declares gigabytes, a gzip stream that runs past its header, zips and DICOM series
that inflate past the limits, and more decodes at once than a replica allows. Requests: bodies over their
limit however their Content-Type is spelled or framed. Access: where keys are required is decided by the
address the proxy really binds, and a loopback server without keys answers only its own machine's pages.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import time
import tracemalloc
import zipfile

import numpy as np
import pytest
from fastapi import FastAPI, File, UploadFile

from serve_testlib import dicom_header, refused_upload
from voxsearch.serve.auth import LoopbackOnly
from voxsearch.serve.config import Limits, ServeConfig, ServeConfigError
from voxsearch.serve.limits import MULTIPART_SLACK, RequestBodyLimit
from voxsearch.serve.uploads import (
    CHUNK,
    NIFTI_GZ_SLACK,
    DecodeSlots,
    UploadError,
    check_dicom_folder,
    extract_zip,
)


def _header(shape, dtype) -> bytes:
    """A single-file NIfTI-1 header and its extension flag: what precedes the voxels."""
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_data_offset(352)
    return header.binaryblock + b"\0" * 4


def _refused(tmp_path, data: bytes, limits: Limits = Limits()) -> UploadError:
    return refused_upload(tmp_path, data, limits)


def test_nifti_declaring_gigabytes_is_refused_from_its_header(tmp_path):
    # 1000 x 1000 x 400 float64 is within the voxel limit but 3.2 GB of data; the upload is a few KB.
    data = gzip.compress(_header((1000, 1000, 400), np.float64) + b"\0" * 3_000_000)
    assert len(data) < Limits().max_upload_bytes
    tracemalloc.start()
    try:
        err = _refused(tmp_path, data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert err.status == 413 and "float64" in err.message and "3,200 MB" in err.message
    assert peak < 16 * CHUNK  # refused from the header: nothing near the declared size was allocated
    assert not (tmp_path / "w" / "upload.nii").exists()


def test_gzip_bomb_behind_a_small_header_stops_at_what_the_header_declares(tmp_path):
    head = _header((8, 9, 10), np.int16)
    declared = len(head) + 8 * 9 * 10 * 2
    err = _refused(tmp_path, gzip.compress(head + b"\0" * (64 * CHUNK)))  # 64 MiB of zeros, ~64 KB compressed
    assert err.status == 413 and "gzip bomb" in err.message
    # Inflation stopped within one read of the declared size.
    assert (tmp_path / "w" / "upload.nii").stat().st_size <= declared + NIFTI_GZ_SLACK


def test_gzip_stream_shorter_than_its_header_declares_is_refused_before_decoding(tmp_path):
    err = _refused(tmp_path, gzip.compress(_header((64, 64, 64), np.float32) + b"\0" * 1000))
    assert err.status == 422 and "truncated" in err.message


def test_zip_of_many_small_bombs_is_refused_before_inflating(tmp_path):
    # Each entry stays at the per-entry floor (CHUNK), so only the whole-archive ratio catches it.
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for i in range(20):
            zf.writestr(f"{i}.dcm", b"\0" * CHUNK)
    path = tmp_path / "up.zip"
    path.write_bytes(buf.getvalue())
    with pytest.raises(UploadError) as err:
        extract_zip(path, tmp_path / "out", Limits(), path.stat().st_size)
    assert err.value.status == 413 and "overall" in err.value.message
    assert not (tmp_path / "out").exists()


def _dicom_header_only(path, rows: int, cols: int, samples: int, bits: int) -> None:
    import pydicom
    from pydicom.uid import SecondaryCaptureImageStorage

    ds = dicom_header(rows, cols, sop_class=SecondaryCaptureImageStorage)
    ds.SamplesPerPixel, ds.BitsAllocated = samples, bits
    pydicom.dcmwrite(str(path), ds, enforce_file_format=True)


def test_dicom_series_declaring_too_many_pixel_bytes_is_refused(tmp_path):
    # Few voxels, but three 16-bit samples each: the bytes, not the voxel count, pass the limit.
    for i in range(2):
        _dicom_header_only(tmp_path / f"{i}.dcm", rows=10, cols=10, samples=3, bits=16)
    with pytest.raises(UploadError) as err:
        check_dicom_folder(tmp_path, Limits(max_voxels=1000, max_decoded_bytes=1000), "the uploaded zip")
    assert err.value.status == 413 and "pixel data" in err.value.message


# ------------------------------------------------------------------ concurrent decodes
def test_decode_slots_wait_a_bounded_time_then_refuse_with_retry_after():
    async def scenario():
        slots = DecodeSlots(1, wait_s=0.3)
        async with slots.claim():
            started = time.monotonic()
            with pytest.raises(UploadError) as err:
                async with slots.claim():
                    pass
            waited = time.monotonic() - started
        assert err.value.status == 503 and int(err.value.headers["Retry-After"]) > 0
        assert waited >= 0.3  # it waited for a slot before refusing

        # A slot freed while a request waits goes to that request: answered, not refused.
        order = []

        async def holder():
            async with slots.claim():
                order.append("first")
                await asyncio.sleep(0.1)

        async def waiter():
            await asyncio.sleep(0.01)
            async with slots.claim():
                order.append("second")

        await asyncio.gather(holder(), waiter())
        assert order == ["first", "second"]

    asyncio.run(scenario())


def test_ingress_answers_503_with_retry_after_while_its_decode_slots_are_taken():
    from voxsearch.serve import api

    class FakeIngress:
        decode_slots = DecodeSlots(1)

    async def taken():
        async with FakeIngress.decode_slots.claim():
            # The file is never touched: the slot is claimed before the upload is saved.
            await api.Ingress.func_or_class._read_upload(FakeIngress(), None, None, [])

    with pytest.raises(UploadError) as err:
        asyncio.run(taken())
    response = asyncio.run(api.app.exception_handlers[UploadError](None, err.value))
    assert response.status_code == 503 and response.headers["retry-after"] == str(DecodeSlots.RETRY_AFTER_S)


# ------------------------------------------------------------------ request bodies
LIMITS = Limits(max_upload_bytes=100_000, max_body_bytes=1000)
UPLOADS = ("/api/v1/embed",)


def _app(ran: list):
    app = FastAPI()

    @app.post("/api/v1/embed")
    async def embed(file: UploadFile = File(...)):
        ran.append("embed")
        return {"size": len(await file.read())}

    @app.post("/api/v1/search/text")
    async def search(body: dict):
        ran.append("search")
        return {"keys": sorted(body)}

    return RequestBodyLimit(app, limits=lambda: LIMITS, upload_routes=UPLOADS)


def _call(app, path: str, headers: dict[str, str], chunks: list[bytes]):
    """One HTTP request straight into an ASGI app; returns (status, JSON body, chunks the app pulled)."""
    pulled = []
    sent = []

    async def receive():
        if len(pulled) < len(chunks):
            pulled.append(chunks[len(pulled)])
            return {"type": "http.request", "body": pulled[-1], "more_body": len(pulled) < len(chunks)}
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
             "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()],
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000)}
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(body), len(pulled)


def _multipart(size: int) -> tuple[bytes, str]:
    body = (b"--x\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.bin\"\r\n"
            b"Content-Type: application/octet-stream\r\n\r\n" + b"v" * size + b"\r\n--x--\r\n")
    return body, str(len(body))


@pytest.mark.parametrize("content_type", ["Multipart/Form-Data; boundary=x", " multipart/form-data; boundary=x",
                                          "MULTIPART/FORM-DATA;boundary=x"])
def test_oversized_upload_is_refused_from_its_length_however_the_type_is_spelled(content_type):
    ran = []
    declared = str(LIMITS.max_upload_bytes + MULTIPART_SLACK + 1)
    status, body, pulled = _call(_app(ran), "/api/v1/embed", {"content-type": content_type, "content-length": declared},
                                 [b"x" * 1000] * 200)
    assert (status, body["error"], pulled, ran) == (413, "too_large", 0, [])


def test_upload_within_its_limit_goes_through_and_without_length_is_411():
    ran = []
    data, length = _multipart(50_000)
    headers = {"content-type": "Multipart/Form-Data; boundary=x", "content-length": length}
    status, body, _ = _call(_app(ran), "/api/v1/embed", headers, [data[i:i + 4096] for i in range(0, len(data), 4096)])
    assert (status, body, ran) == (200, {"size": 50_000}, ["embed"])
    chunked = {"content-type": "multipart/form-data; boundary=x"}
    status, body, pulled = _call(_app(ran), "/api/v1/embed", chunked, [data])
    assert (status, body["error"], pulled) == (411, "length_required", 0)


def test_chunked_json_over_the_limit_is_cut_off_while_streaming():
    ran = []
    chunks = [b'{"query": "' + b"a" * 300] + [b"a" * 300] * 1000  # ~300 KB, no Content-Length
    status, body, pulled = _call(_app(ran), "/api/v1/search/text", {"content-type": "application/json"}, chunks)
    assert status == 413 and body["error"] == "too_large" and ran == []
    assert pulled == LIMITS.max_body_bytes // 300 + 1  # stopped at the first chunk past the limit


def test_json_limits_declared_length_and_small_chunked_bodies_pass():
    ran = []
    big = {"content-type": "application/json", "content-length": str(LIMITS.max_body_bytes + 1)}
    assert _call(_app(ran), "/api/v1/search/text", big, [b"{}"])[:1] == (413,)
    # Multipart to a route that takes no upload gets the small limit too.
    data, length = _multipart(5000)
    form = {"content-type": "multipart/form-data; boundary=x", "content-length": length}
    assert _call(_app(ran), "/api/v1/search/text", form, [data])[:1] == (413,)
    bad = {"content-type": "application/json", "content-length": "1_000"}
    status, body, _ = _call(_app(ran), "/api/v1/search/text", bad, [b"{}"])
    assert (status, body) == (400, {"error": "bad_request", "detail": "Content-Length is not a number"})
    assert ran == []
    status, body, _ = _call(_app(ran), "/api/v1/search/text", {"content-type": "application/json"},
                            [b'{"query":', b' "liver"}'])
    assert (status, body, ran) == (200, {"keys": ["query"]}, ["search"])


def test_the_ingress_app_limits_every_body(monkeypatch):
    from voxsearch.serve import api

    monkeypatch.setattr(api._Runtime, "limits", LIMITS)
    over = str(LIMITS.max_upload_bytes + MULTIPART_SLACK + 1)
    status, body, pulled = _call(api.app, "/api/v1/report",
                                 {"content-type": "Multipart/Form-Data; boundary=x", "content-length": over}, [b"x"])
    assert (status, body["error"], pulled) == (413, "too_large", 0)
    status, body, _ = _call(api.app, "/api/v1/search/text", {"content-type": "application/json"},
                            [b'{"query": "' + b"a" * 600] * 10)
    assert (status, body["error"]) == (413, "too_large")


# ------------------------------------------------------------------ who may call
def test_keys_follow_the_address_the_proxy_really_binds(tmp_path, monkeypatch):
    monkeypatch.delenv("VOXSEARCH_API_KEYS", raising=False)
    config = ServeConfig(host="127.0.0.1", port=8000)
    with pytest.raises(ServeConfigError, match="already listens on 0.0.0.0:8000"):
        config.bound_to("0.0.0.0", 8000)
    keyed = ServeConfig(host="127.0.0.1", port=8000, api_keys=["0123456789abcdef-key"]).bound_to("0.0.0.0", 8000)
    assert keyed.keys_required() and keyed.host == "0.0.0.0"
    local = config.bound_to("127.0.0.1", 8123)
    assert not local.keys_required() and local.port == 8123


def test_start_refuses_a_running_proxy_on_a_public_address_without_keys(tmp_path, monkeypatch, capsys):
    import ray.serve

    import voxsearch.common.runtime
    import voxsearch.serve.deployments
    from voxsearch.serve import app

    monkeypatch.delenv("VOXSEARCH_API_KEYS", raising=False)
    for name in ("index", "ckpt", "cat"):
        (tmp_path / name).mkdir()
    config = ServeConfig(index=str(tmp_path / "index"), checkpoint=str(tmp_path / "ckpt"),
                         catalog=str(tmp_path / "cat"))
    served = []
    # The folders are placeholders: what a real checkpoint and index would have to pass is not at stake.
    monkeypatch.setattr(voxsearch.serve.deployments, "check_before_start", lambda cfg: None)
    monkeypatch.setattr(voxsearch.common.runtime, "init_ray", lambda cfg: None)
    monkeypatch.setattr(ray.serve, "start", lambda http_options: None)  # a running instance keeps its options
    monkeypatch.setattr(ray.serve, "run", lambda *a, **k: served.append(a))
    monkeypatch.setattr(app, "build_app", lambda cfg: cfg)
    monkeypatch.setattr(app, "wait_ready", lambda url, timeout: None)

    monkeypatch.setattr(app, "serve_http_bind", lambda: ("0.0.0.0", 8000))
    assert app.serve_until_stopped(config, exit_after=0) == 2
    assert "already listens on 0.0.0.0:8000" in capsys.readouterr().out and served == []

    monkeypatch.setattr(app, "serve_http_bind", lambda: ("127.0.0.1", 8123))
    assert app.start(config) == "http://127.0.0.1:8123"
    (bound,) = served[0]
    assert (bound.host, bound.port, bound.keys_required()) == ("127.0.0.1", 8123, False)


def test_loopback_without_keys_answers_only_its_own_host_and_origin():
    guard = LoopbackOnly(8000)
    for headers in ({"host": "127.0.0.1:8000"}, {"host": "localhost:8000"}, {"host": "[::1]:8000"},
                    {"host": "127.0.0.1:8000", "origin": "http://localhost:8000"}):
        assert guard.refusal(headers) is None, headers
    for headers in (
        {"host": "evil.example:8000"},  # DNS rebinding: a foreign name resolving to 127.0.0.1
        {"host": "evil.example"},
        {"host": "127.0.0.1:9999"},
        {"host": "evil@127.0.0.1:8000"},
        {},
        {"host": "127.0.0.1:8000", "origin": "http://evil.example"},  # a cross-site form POST
        {"host": "127.0.0.1:8000", "origin": "http://127.0.0.1:9999"},
        {"host": "127.0.0.1:8000", "origin": "null"},
    ):
        refusal = guard.refusal(headers)
        assert refusal and "evil" not in refusal, headers


def test_the_ingress_app_refuses_foreign_host_and_origin_with_403(monkeypatch):
    from voxsearch.serve import api

    monkeypatch.setattr(api._Runtime, "local", LoopbackOnly(8000))
    data, length = _multipart(10)
    form = {"content-type": "multipart/form-data; boundary=x", "content-length": length}
    status, body, pulled = _call(api.app, "/api/v1/embed", {**form, "host": "evil.example:8000"}, [data])
    assert (status, body["error"], pulled) == (403, "forbidden", 0)
    status, body, _ = _call(api.app, "/api/v1/embed", {**form, "host": "127.0.0.1:8000",
                                                       "origin": "http://evil.example"}, [data])
    assert (status, body["error"]) == (403, "forbidden")
    # Its own origin, or none, gets past the guard (to the router: no such route here).
    for extra in ({}, {"origin": "http://127.0.0.1:8000"}):
        status, _, _ = _call(api.app, "/api/v1/nowhere", {"host": "127.0.0.1:8000", **extra}, [b""])
        assert status == 404
