"""The FastAPI ingress: HTTP API under /api/v1, the web page, auth, limits and metrics.

The ingress validates and preprocesses uploads itself (they arrive here) and hands tensors, vectors and
ids to the deployments behind it. Every failure caused by the request answers 4xx with a message that
names the input by kind and size; client file names are never echoed or logged (they often hold
patient names) and uploads are deleted as soon as they are read.
"""


import asyncio
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.datastructures import Headers
from ray import serve

from voxsearch.common import __version__
from voxsearch.common.hashing import content_sha256
from voxsearch.index.errors import IndexConflictError, IndexLockTimeout
from voxsearch.ingest.deid import scrub
from voxsearch.serve.auth import KeyChecker, LoopbackOnly
from voxsearch.serve.config import ServeConfig, is_loopback
from voxsearch.serve.errors import PublicError, cause_of, describe_failure, new_error_id, redact_paths, scrub_library_logs
from voxsearch.serve.limits import RequestBodyLimit
from voxsearch.serve.metrics import RequestMetrics
from voxsearch.serve.public import normalise_filters, public_metadata, valid_series_id
from voxsearch.serve.render import CT_WINDOWS, PLANES, RenderError
from voxsearch.serve.schemas import (
    EmbedResponse,
    ErrorResponse,
    Health,
    Readiness,
    ReportResponse,
    SearchResponse,
    StudyResponse,
    TextSearchRequest,
)
from voxsearch.serve.studies import StudyNotFound
from voxsearch.serve.uploads import DecodeSlots, UploadError, describe, prepare_upload, save_upload

log = logging.getLogger("voxsearch.serve")
STATIC_DIR = Path(__file__).with_name("static")
UPLOAD_ROUTES = ("/api/v1/search/scan", "/api/v1/report", "/api/v1/embed")
BODY_PART = re.compile(r"^[A-Za-z0-9 _-]{1,64}$")
BACKEND_TIMEOUT_S = 120.0

DESCRIPTION = """Search an archive of 3D scans (CT, MRI) by free text or by example scan, add new studies,
view slices and draft reports. Uploads: a NIfTI volume (.nii, .nii.gz) or a zip holding one DICOM series.
When the server requires API keys, send `X-API-Key: <key>` (or `Authorization: Bearer <key>`)."""

app = FastAPI(
    title="voxsearch",
    version=__version__,
    description=DESCRIPTION,
    docs_url="/api/v1/docs",
    openapi_url="/api/v1/openapi.json",
    redoc_url=None,
)
ERRORS = {400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}, 404: {"model": ErrorResponse},
          413: {"model": ErrorResponse}, 415: {"model": ErrorResponse}, 422: {"model": ErrorResponse}}


class _Runtime:
    """Per-replica state the middleware reads (set by the ingress constructor)."""

    keys = KeyChecker([], required=False)
    # Host/Origin checks of a loopback server without keys; None where keys (or a proxy) decide.
    local: LoopbackOnly | None = None
    limits = None
    metrics = RequestMetrics()
    # The server's own folders, cut out of anything logged even where a message names them relatively.
    roots: tuple[str, ...] = ()


def _error(status: int, detail: str, error: str | None = None, error_id: str | None = None) -> JSONResponse:
    names = {400: "bad_request", 401: "unauthorized", 404: "not_found", 409: "conflict", 411: "length_required",
             413: "too_large", 415: "unsupported_media_type", 422: "unprocessable", 500: "internal_error",
             503: "unavailable"}
    body = {"error": error or names.get(status, "error"), "detail": detail}
    if error_id:
        body["error_id"] = error_id
    return JSONResponse(body, status_code=status)


def _body_refused(status: int, upload: bool) -> None:
    if upload:
        _Runtime.metrics.reject_upload(status)


class Guard:
    """Loopback Host/Origin checks, API keys and request metrics, as a pure ASGI middleware (Starlette's
    BaseHTTPMiddleware runs each request through an extra task and memory streams: a large share of a
    search's CPU in the ingress)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        path = scope["path"]
        headers = Headers(scope=scope)
        refusal = _Runtime.local.refusal(headers) if _Runtime.local is not None else None
        status = 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if refusal:
                await _error(403, refusal, "forbidden")(scope, receive, send_status)
            elif not _Runtime.keys.allows(path, headers):
                await _error(401, "missing or invalid API key: send it in the X-API-Key header")(scope, receive, send_status)
            else:
                await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", None) or ("/static" if path.startswith("/static/") else "unmatched")
            _Runtime.metrics.observe(scope["method"], route, status, time.perf_counter() - started)


# Middleware added last runs first: the guard checks keys before the body limit reads anything, and
# counts the body limit's refusals.
app.add_middleware(RequestBodyLimit, limits=lambda: _Runtime.limits, upload_routes=UPLOAD_ROUTES,
                   on_refuse=_body_refused)
app.add_middleware(Guard)


def log_failure(what: str, exc: BaseException, identifiers=(), level: int = logging.WARNING) -> str:
    """Log a failure under a new error id, its cause scrubbed (serve/errors.py); returns the id.

    The one way this module logs an exception: its text may echo header values and server paths.
    """
    error_id = new_error_id()
    log.log(level, "%s [error_id %s]: %s", what, error_id, describe_failure(exc, identifiers, _Runtime.roots))
    return error_id


@app.exception_handler(UploadError)
async def _upload_error(request: Request, exc: UploadError):
    _Runtime.metrics.reject_upload(exc.status)
    # Our own text, naming the upload by kind and size; a path a check let through is cut all the same.
    detail = redact_paths(exc.message, _Runtime.roots)
    error_id = log_failure(f"upload refused ({exc.status})", exc, level=logging.INFO)
    response = _error(exc.status, detail, error_id=error_id)
    response.headers.update(exc.headers)  # Retry-After on a 503
    return response


@app.exception_handler(PublicError)
async def public_error(request: Request, exc: PublicError):
    if exc.upload:
        _Runtime.metrics.reject_upload(exc.status)
    level = logging.WARNING if exc.status >= 500 else logging.INFO
    error_id = log_failure(f"request failed ({exc.status})", exc.cause or exc, exc.identifiers, level)
    return _error(exc.status, exc.message, error_id=error_id)


@app.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException):
    response = _error(exc.status_code, str(exc.detail))
    response.headers.update(exc.headers or {})
    return response


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return _error(422, "; ".join(parts) or "invalid request", "invalid_request")


def backend_failure(exc: BaseException) -> Exception:
    """The HTTP error for a failed backend call.

    Only messages we wrote about what the client asked for pass through (an unknown study, a slice out
    of range). Anything else comes from reading stored scans or from a library, so it may name server
    paths or echo header values: the client gets the failure class and an error id.
    """
    cause = cause_of(exc)
    if isinstance(cause, StudyNotFound):  # removed from the catalog since the request looked it up
        return HTTPException(404, f"no study with series_id {cause.args[0]}")
    if isinstance(cause, RenderError):
        return HTTPException(400, str(cause))
    if isinstance(cause, (IndexLockTimeout, IndexConflictError)):  # other writers kept the index busy
        return HTTPException(503, "the index is busy with another writer; retry", headers={"Retry-After": "5"})
    if isinstance(cause, (ValueError, KeyError)):
        return PublicError(400, "the server could not read or process the stored data this request needs", exc)
    return PublicError(500, "the server failed while processing this request", exc)


def _thumbs(series_id: str) -> dict[str, str]:
    sid = quote(series_id, safe="")
    return {plane: f"/api/v1/studies/{sid}/thumbnail/{plane}.png" for plane in PLANES}


def _check_id(series_id: str) -> str:
    if not valid_series_id(series_id):
        raise HTTPException(400, "series_id must be 1-128 characters of letters, digits, '.', '_', ':' or '-'")
    return series_id


def _form_filters(modality, body_part, split, abnormal) -> dict:
    raw = {"modality": modality, "body_part": body_part, "split": split, "abnormal": abnormal}
    return {k: v for k, v in raw.items() if v not in (None, "")}


def _public_study(found: dict | None) -> dict:
    out = dict(found or {})
    for key in ("report", "report_excerpt", "series_id"):
        out.pop(key, None)
    return out


def _stream_text(pieces, method: str) -> StreamingResponse:
    async def body():
        try:
            if hasattr(pieces, "__aiter__"):
                async for piece in pieces:
                    yield piece
            else:
                for piece in pieces:
                    yield piece
        except Exception as exc:  # noqa: BLE001 - headers are sent; say it in the body instead
            yield f"\n[report generation failed; error id {log_failure('report stream failed', exc)}]"

    return StreamingResponse(body(), media_type="text/plain; charset=utf-8", headers={"X-Report-Method": method})


@dataclass
class DecodedUpload:
    volume: Any
    arrays: list[np.ndarray]  # one model input per requested preprocessing
    what: str  # how messages name the upload (kind and size)
    identifiers: tuple[str, ...]  # the patient identifiers its DICOM headers hold: scrub text with them


async def read_upload(file, modality: str | None, configs: list, limits, upload_dir: str | None) -> DecodedUpload:
    """Save, validate and decode an upload, then delete it.

    A file that fails to decode answers 422 with the failure class only: reader messages echo header
    values and paths, so they go to the log, scrubbed of them and of the upload's identifiers.
    """
    from voxsearch.ingest import preprocess_volume, read_volume_path
    from voxsearch.ingest.dicom_reader import scan_series

    if modality not in (None, "", "CT", "MR"):
        raise UploadError(422, f"modality must be CT or MR, got {modality!r}")
    workdir, path, size = await save_upload(file, limits, upload_dir)
    upload = None
    identifiers: list[str] = []  # filled before the pixels are decoded, so a failure's log line is scrubbed of them
    try:
        upload = await asyncio.to_thread(prepare_upload, workdir, path, size, limits)
        what = describe(upload.kind, size)

        def decode():
            files = None
            if upload.kind == "dicom-zip":
                series, _ = scan_series(upload.path)
                identifiers.extend(v for info in series for v in info.identifiers.values() if v)
                # With one series, read it from this listing; otherwise the reader says what is wrong.
                files = series[0].files if len(series) == 1 else None
            volume = read_volume_path(upload.path, modality=modality or None, files=files, max_voxels=limits.max_voxels)
            arrays = [preprocess_volume(volume, cfg, name="upload") for cfg in configs]
            return volume, arrays

        try:
            volume, arrays = await asyncio.to_thread(decode)
        except MemoryError:
            raise UploadError(413, f"{what} is too large to decode on this server") from None
        except Exception as exc:  # noqa: BLE001 - corrupt files raise anything; all are the client's input
            kind = "a DICOM series" if upload.kind == "dicom-zip" else "a NIfTI volume"
            raise PublicError(422, f"{what} could not be read as {kind}", exc, identifiers, upload=True) from None
        log.info("upload decoded: %s, %d voxels, modality %s", upload.kind, upload.voxels, volume.modality)
        return DecodedUpload(volume, arrays, what, tuple(identifiers))
    finally:
        if upload is not None:
            upload.cleanup()
        else:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)


def added_row(upload: DecodedUpload, report: str | None, body_part: str | None) -> dict[str, Any]:
    """The catalog row of a study added through /embed, named by the hash of its voxels and spacing.

    Its text is scrubbed of the identifiers the upload's own headers hold: a report sent with a scan
    often names its patient.
    """
    volume = upload.volume
    content = content_sha256(volume.array, volume.spacing)
    return {
        "series_id": f"api-{content[:24]}", "study_id": f"api-study-{content[:16]}", "modality": volume.modality,
        "body_part": scrub(body_part, upload.identifiers), "split": "added", "abnormal": None,
        "report": scrub(report, upload.identifiers),
        "shape": [int(s) for s in volume.array.shape], "spacing": [float(s) for s in volume.spacing],
        "orientation": "RAS", "content_sha256": content, "findings": None,
    }


@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    def __init__(self, config: ServeConfig, text_encoder, image_encoder, searcher, studies, reporter):
        from voxsearch.encoders import open_checkpoint
        from voxsearch.ingest import PreprocessConfig

        from voxsearch.serve.app import added_dir
        from voxsearch.serve.deployments import IndexSearcher, StudyStore, local_deployment

        self.config = config
        self.text = text_encoder
        self.image = image_encoder
        # None: co-located (ServeConfig.colocate_data), built here and called like a handle.
        self.searcher = searcher if searcher is not None else local_deployment(IndexSearcher, config)
        self.studies = studies if studies is not None else local_deployment(StudyStore, config, added_dir(config))
        self.reporter = reporter
        self.limits = config.limits
        # config.host and port are where the proxy really listens (app.start).
        _Runtime.keys = KeyChecker(config.resolved_api_keys(), config.keys_required())
        _Runtime.local = None if config.keys_required() or not is_loopback(config.host) else LoopbackOnly(config.port)
        _Runtime.limits = config.limits
        self.decode_slots = DecodeSlots(config.limits.max_concurrent_decodes, config.limits.decode_wait_s)
        _Runtime.roots = tuple(str(p) for p in (config.upload_dir, config.data_dir, config.catalog, config.index,
                                                 config.checkpoint, config.report_model) if p)
        scrub_library_logs()  # uploads are decoded here
        from voxsearch.reports.drafting import drafting_head

        checkpoint = open_checkpoint(config.checkpoint)
        self.finding_head = checkpoint.finding_head()
        self.draft_head = drafting_head(self.finding_head)
        self.preprocess = PreprocessConfig.from_dict(checkpoint.preprocess)
        self._caps: dict | None = None
        self.replica = serve.get_replica_context().replica_tag

    # ---------------------------------------------------------------- helpers
    async def _call(self, response):
        try:
            return await asyncio.wait_for(response, BACKEND_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise HTTPException(503, "a backend deployment did not answer in time; retry") from None
        except Exception as exc:  # noqa: BLE001 - every backend failure is answered by backend_failure
            raise backend_failure(exc) from None

    async def capabilities(self) -> dict:
        if self._caps is None:
            self._caps = await self._call(self.reporter.capabilities.remote())
        return self._caps

    def _filters(self, filters: dict | None) -> dict:
        try:
            return normalise_filters(filters)
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None

    def _k(self, k: int) -> int:
        if not 1 <= k <= self.limits.max_k:
            raise HTTPException(422, f"k must be between 1 and {self.limits.max_k}, got {k}")
        return k

    async def _read_upload(self, file: UploadFile, modality: str | None, configs: list) -> DecodedUpload:
        async with self.decode_slots.claim():
            return await read_upload(file, modality, configs, self.limits, self.config.upload_dir)

    async def _results(self, hits: list[dict], vectors: dict[str, np.ndarray | None]) -> list[dict]:
        described = await self._call(self.studies.describe_many.remote([h["id"] for h in hits]))
        predicted = self._describe_findings(vectors)
        results = []
        for rank, hit in enumerate(hits, 1):
            known = described.get(hit["id"])
            metadata = {**public_metadata(hit.get("metadata") or {}), **(known or {})}
            excerpt = metadata.pop("report_excerpt", None)
            metadata.pop("series_id", None)
            results.append({
                "rank": rank, "series_id": hit["id"], "score": round(float(hit["score"]), 6),
                "report_excerpt": excerpt, "metadata": metadata,
                # An index may hold vectors whose study this server cannot show: built from another
                # catalog, or a study sync removed from the catalog before the index followed. Such a
                # hit is kept, ranked, but marked (no links, no report excerpt: the catalog is what
                # decides what may be shown), rather than dropped, so k and the scores stay the index's.
                "thumbnails": _thumbs(hit["id"]) if known else None,
                "url": f"/api/v1/studies/{quote(hit['id'], safe='')}" if known else None,
                "predicted_findings": predicted.get(hit["id"]),
            })
        return results

    def _describe_findings(self, vectors: dict[str, np.ndarray | None]) -> dict[str, list[dict]]:
        """The finding head's reading of stored vectors (empty without a head)."""
        if self.finding_head is None:
            return {}
        return {i: self.finding_head.describe(v) for i, v in vectors.items() if v is not None}

    async def _predicted(self, ids: list[str]) -> dict[str, list[dict] | None]:
        if self.finding_head is None or not ids:
            return {}
        return self._describe_findings(await self._call(self.searcher.vectors.remote(ids)))

    async def _search(self, vector: np.ndarray | None, k: int, filters: dict, from_id: str | None = None,
                      exclude: str | None = None) -> dict:
        """Hits as results and the index version searched: one call to the searcher, one to the studies.
        With ``from_id`` the query is that study's stored vector; ``found`` False: it has none."""
        query = np.asarray(vector, np.float32) if vector is not None else None
        found = await self._call(self.searcher.query.remote(query, k, filters, from_id, exclude,
                                                            self.finding_head is not None))
        if found["found"]:
            found["results"] = await self._results(found["hits"], found["vectors"])
        return found

    async def _index_info(self) -> dict:
        return await self._call(self.searcher.info.remote())

    async def _retrieval_draft(self, embedding: np.ndarray, exclude: list[str], detected: list[dict] | None) -> dict:
        """A draft from the reports of the nearest indexed *training* studies (so a test study never
        drafts from its own report); with detected findings, from neighbours whose reports state them."""
        from voxsearch.reports.drafting import Neighbour, compose_draft

        wanted = self.config.draft_neighbours
        k = wanted * (4 if detected is not None else 1) + len(exclude)
        query = np.asarray(embedding, dtype=np.float32)[None, :]
        try:
            hits = (await self._call(self.searcher.search.remote(query, k, {"split": "train"})))[0]
        except HTTPException:
            raise
        except Exception as exc:  # noqa: BLE001 - indexes built without a split column cannot filter on it
            log.info("searching training studies by split failed (%s); drafting from all studies", exc)
            hits = (await self._call(self.searcher.search.remote(query, k, None)))[0]
        hits = [h for h in hits if h["id"] not in exclude][: k - len(exclude)]
        reports = await self._call(self.studies.reports.remote([h["id"] for h in hits]))
        neighbours = [Neighbour(h["id"], h["score"], reports.get(h["id"]) or "") for h in hits]
        draft = compose_draft(neighbours, detected=detected, max_neighbours=wanted)
        return {"method": draft.method, "report": draft.text, "sources": draft.sources, "detected": detected}

    async def _study_vector(self, series_id: str) -> np.ndarray:
        """An indexed study's stored vector, or its encoding when the index cannot give it back."""
        vectors = await self._call(self.searcher.vectors.remote([series_id]))
        if vectors.get(series_id) is not None:
            return vectors[series_id]
        return await self._encode_study(series_id)

    async def _encode_study(self, series_id: str) -> np.ndarray:
        if not await self._call(self.studies.has.remote(series_id)):
            raise HTTPException(404, f"no study with series_id {series_id}")
        volume = await self._call(self.studies.model_input.remote(series_id, self.preprocess.to_dict()))
        return await self._call(self.image.encode.remote(volume))

    # ---------------------------------------------------------------- page
    @app.get("/", include_in_schema=False)
    async def page(self):
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(self, name: str):
        allowed = {p.name for p in STATIC_DIR.iterdir() if p.is_file()}
        if name not in allowed:
            raise HTTPException(404, "no such static file")
        return FileResponse(STATIC_DIR / name)

    # ---------------------------------------------------------------- probes
    @app.get("/api/v1/health", response_model=Health, tags=["operations"])
    async def health(self):
        """Liveness: the ingress answers."""
        return {"status": "ok"}

    @app.get("/api/v1/ready", response_model=Readiness, tags=["operations"],
             responses={503: {"model": Readiness}})
    async def ready(self):
        """Readiness: every deployment answers and the index is loaded."""
        checks = {
            "searcher": self.searcher.info.remote(),
            "studies": self.studies.size.remote(),
            "text_encoder": self.text.dim.remote(),
            "image_encoder": self.image.stats.remote(),
            "reporter": self.reporter.capabilities.remote(),
        }
        components, ok = {}, True
        for name, response in checks.items():
            try:
                components[name] = await asyncio.wait_for(response, 10)
            except Exception as exc:  # noqa: BLE001 - any failure means not ready
                # Public (probes need no key): the type only; the log has the rest under the id.
                error_id = log_failure(f"readiness check of {name} failed", exc)
                components[name] = {"error": type(cause_of(exc)).__name__, "error_id": error_id}
                ok = False
        body = {"ready": ok, "components": components}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/api/v1/metrics", response_class=PlainTextResponse, tags=["operations"])
    async def metrics(self):
        """Prometheus text format: requests, latency, rejected uploads, index size and version."""
        gauges: dict[str, float] = {}
        try:
            info = await asyncio.wait_for(self.searcher.info.remote(), 10)
            gauges.update(index_size=info["size"], index_reloads=info["reloads"], index_poll_errors=info["poll_errors"])
            stats = await asyncio.wait_for(self.image.stats.remote(), 10)
            gauges.update(image_batches_total=stats["batches"], image_batch_size_mean=stats["mean_batch"])
        except Exception as exc:  # noqa: BLE001 - metrics stay available when a backend is down
            gauges["backend_up"] = 0
            log_failure("metrics: backend query failed", exc)
        else:
            gauges["backend_up"] = 1
        return PlainTextResponse(_Runtime.metrics.render(str(self.replica), gauges),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/api/v1/filters", tags=["search"])
    async def filters(self) -> dict[str, Any]:
        """The values each filter can take in this archive (for building a search form)."""
        values = await self._call(self.studies.filter_values.remote())
        return {**values, "abnormal": [True, False]}

    # ---------------------------------------------------------------- search
    @app.post("/api/v1/search/text", response_model=SearchResponse, responses=ERRORS, tags=["search"])
    async def search_text(self, body: TextSearchRequest):
        """Studies whose scans best match a free-text description."""
        started = time.perf_counter()
        query = body.query.strip()
        if not query:
            raise HTTPException(422, "query is empty")
        if len(query) > self.limits.max_query_chars:
            raise HTTPException(422, f"query has {len(query)} characters, over the limit of {self.limits.max_query_chars}")
        k = self._k(body.k)
        filters = self._filters(body.filters.model_dump(exclude_none=True) if body.filters else None)
        vector, query_findings = await self._call(self.text.encode_query.remote(query))
        found = await self._search(vector, k, filters)
        return {"results": found["results"], "index_version": found["version"], "took_ms": (time.perf_counter() - started) * 1e3,
                "query": {"text": query, "k": k, "filters": filters, "findings": query_findings}}

    @app.post("/api/v1/search/scan", response_model=SearchResponse, responses=ERRORS, tags=["search"])
    async def search_scan(
        self,
        file: UploadFile | None = File(None, description="NIfTI (.nii/.nii.gz) or zip of one DICOM series"),
        series_id: str | None = Form(None, description="an indexed study to search from, instead of a file"),
        k: int = Form(10),
        modality: str | None = Form(None, description="filter: CT or MR"),
        body_part: str | None = Form(None),
        split: str | None = Form(None),
        abnormal: bool | None = Form(None),
        scan_modality: str | None = Form(None, description="the upload's modality when the file does not say (NIfTI)"),
    ):
        """Studies most similar to an uploaded scan or to an indexed study."""
        started = time.perf_counter()
        k = self._k(k)
        filters = self._filters(_form_filters(modality, body_part, split, abnormal))
        if (file is None) == (not series_id):
            raise HTTPException(422, "send exactly one of: file (an upload) or series_id (an indexed study)")
        if file is not None:
            (volume,) = (await self._read_upload(file, scan_modality, [self.preprocess])).arrays
            found = await self._search(await self._call(self.image.encode.remote(volume)), k, filters)
            exclude = None
        else:
            exclude = _check_id(series_id)
            found = await self._search(None, k, filters, from_id=exclude)
            if not found["found"]:  # a catalogued study the index does not hold (yet): encode its scan
                found = await self._search(await self._encode_study(exclude), k, filters, exclude=exclude)
        return {"results": found["results"], "index_version": found["version"], "took_ms": (time.perf_counter() - started) * 1e3,
                "query": {"series_id": exclude, "upload": file is not None, "k": k, "filters": filters}}

    # ---------------------------------------------------------------- studies
    @app.get("/api/v1/studies/{series_id}", response_model=StudyResponse, responses=ERRORS, tags=["studies"])
    async def study(self, series_id: str):
        """A study's metadata, full report and slice counts."""
        _check_id(series_id)
        found = await self._call(self.studies.study.remote(series_id))
        if found is None:
            raise HTTPException(404, f"no study with series_id {series_id}")
        try:
            slices = await self._call(self.studies.slices.remote(series_id))
        except HTTPException:
            slices = {}
        except PublicError as exc:  # the metadata is still worth showing without its pixels
            log_failure(f"slices of study {series_id} unavailable", exc.cause or exc)
            slices = {}
        report = found.pop("report", None)
        found.pop("report_excerpt", None)
        found.pop("series_id", None)
        predicted = await self._predicted([series_id])
        return {"series_id": series_id, "metadata": found, "report": report, "slices": slices,
                "thumbnails": _thumbs(series_id), "predicted_findings": predicted.get(series_id)}

    async def _png(self, series_id: str, plane: str, index: int | None, window: str | None, size: int) -> Response:
        _check_id(series_id)
        if plane not in PLANES:
            raise HTTPException(404, f"unknown plane '{plane}'; use one of {', '.join(PLANES)}")
        if window is not None and window not in CT_WINDOWS:
            raise HTTPException(422, f"unknown window '{window}'; use one of {', '.join(CT_WINDOWS)}")
        if not await self._call(self.studies.has.remote(series_id)):
            raise HTTPException(404, f"no study with series_id {series_id}")
        png = await self._call(self.studies.render.remote(series_id, plane, index, window, size))
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/api/v1/studies/{series_id}/thumbnail/{plane}.png", response_class=Response, responses=ERRORS,
             tags=["studies"])
    async def thumbnail(self, series_id: str, plane: str, size: int = Query(192, ge=32, le=512),
                        window: str | None = Query(None, description="CT window: soft, lung, bone, brain")):
        """The mid-slice of one plane (axial, coronal or sagittal) as PNG."""
        return await self._png(series_id, plane, None, window, size)

    @app.get("/api/v1/studies/{series_id}/slices/{plane}/{index}.png", response_class=Response, responses=ERRORS,
             tags=["studies"])
    async def slice_png(self, series_id: str, plane: str, index: int, size: int = Query(384, ge=32, le=1024),
                        window: str | None = Query(None)):
        """Any slice of one plane as PNG (for scrolling through a study)."""
        return await self._png(series_id, plane, index, window, size)

    # ---------------------------------------------------------------- reports
    @app.post("/api/v1/report", response_model=ReportResponse, responses=ERRORS, tags=["reports"])
    async def report(
        self,
        file: UploadFile | None = File(None),
        series_id: str | None = Form(None),
        method: str = Form("auto", description="auto (the report model if configured), generate or retrieval"),
        stream: bool | None = Form(None, description="stream text/plain; default: when the text is long"),
        prompt: str | None = Form(None, description="instruction for the report model"),
        max_new_tokens: int = Form(256, ge=1, le=1024),
        scan_modality: str | None = Form(None),
    ):
        """Draft a report for an uploaded scan or an indexed study.

        With a report model configured, `generate` runs it (streamed token by token). Otherwise the draft
        is retrieval-based: composed from the reports of the most similar indexed training studies, and
        it says so.
        """
        if (file is None) == (not series_id):
            raise HTTPException(422, "send exactly one of: file (an upload) or series_id (an indexed study)")
        caps = await self.capabilities()
        if method not in ("auto", "generate", "retrieval"):
            raise HTTPException(422, f"method must be auto, generate or retrieval, got {method!r}")
        if method == "generate" and not caps["generator"]:
            raise HTTPException(409, "no report model is configured on this server; use method=retrieval")
        chosen = "generate" if method == "generate" or (method == "auto" and caps["generator"]) else "retrieval"
        if prompt and len(prompt) > self.limits.max_query_chars:
            raise HTTPException(422, f"prompt is over {self.limits.max_query_chars} characters")
        from voxsearch.ingest import PreprocessConfig

        report_pp = PreprocessConfig.from_dict(caps["generator_preprocess"]) if chosen == "generate" else None
        exclude: list[str] = []
        report_volume = None
        if file is not None:
            configs = [self.preprocess] + ([report_pp] if report_pp is not None and report_pp != self.preprocess else [])
            arrays = (await self._read_upload(file, scan_modality, configs)).arrays
            clip_volume = arrays[0]
            report_volume = arrays[-1]
            embedding = None if chosen == "generate" else await self._call(self.image.encode.remote(clip_volume))
        else:
            sid = _check_id(series_id)
            exclude = [sid]
            if chosen == "generate":
                if not await self._call(self.studies.has.remote(sid)):
                    raise HTTPException(404, f"no study with series_id {sid}")
                report_volume = await self._call(self.studies.model_input.remote(sid, report_pp.to_dict()))
                embedding = None
            else:
                embedding = await self._study_vector(sid)

        if chosen == "retrieval":
            detected = self.draft_head.describe(np.asarray(embedding, np.float32)) if self.draft_head else None
            draft = await self._retrieval_draft(embedding, exclude, detected)
            note = "retrieval-based draft: sentences from the reports of the most similar indexed training studies"
            if detected is not None:
                note += ", preferring those whose reports state the findings the model detects"
            if stream:
                return _stream_text([draft["report"]], "retrieval")
            return {**draft, "note": note}

        pieces = self.reporter.options(stream=True).generate_stream.remote(report_volume, prompt, max_new_tokens)
        if stream is False:
            text = "".join([p async for p in pieces]).strip()
            return {"method": "generate", "report": text, "sources": [],
                    "note": "generated by the configured report model; review before use"}
        return _stream_text(pieces, "generate")

    # ---------------------------------------------------------------- new studies
    @app.post("/api/v1/embed", response_model=EmbedResponse, status_code=201, responses=ERRORS, tags=["studies"])
    async def embed(
        self,
        file: UploadFile = File(..., description="NIfTI (.nii/.nii.gz) or zip of one DICOM series"),
        report: str | None = Form(None, description="the study's report, if any"),
        scan_modality: str | None = Form(None, description="CT or MR when the file does not say"),
        body_part: str | None = Form(None),
    ):
        """Add a new study: it is validated, de-identified (only voxels and spacing are kept), embedded and
        added to the index; searches see it as soon as this returns."""
        if report is not None and len(report) > self.limits.max_report_chars:
            raise HTTPException(422, f"report is over {self.limits.max_report_chars} characters")
        if body_part is not None and not BODY_PART.match(body_part):
            raise HTTPException(422, "body_part must be 1-64 letters, digits, spaces, '_' or '-'")
        upload = await self._read_upload(file, scan_modality, [self.preprocess])
        volume, (array,) = upload.volume, upload.arrays
        row = added_row(upload, report, body_part)
        series_id = row["series_id"]
        # The same voxels may be indexed under a catalog series_id (ingested from any file format) or
        # under the id an earlier upload got; the first of them the index holds is the duplicate.
        same = await self._call(self.studies.find_content.remote(row["content_sha256"]))
        candidates = list(dict.fromkeys([*([same] if same else []), series_id]))
        known = await self._call(self.searcher.contains.remote(candidates))
        duplicate = next((c for c in candidates if known.get(c)), None)
        if duplicate and await self._call(self.studies.has.remote(duplicate)):
            info = await self._index_info()
            found = await self._call(self.studies.study.remote(duplicate))
            return JSONResponse({
                "series_id": duplicate, "duplicate": True, "index_version": info["version"],
                "index_size": info["size"], "metadata": _public_study(found), "thumbnails": _thumbs(duplicate),
            }, status_code=200)
        vector = await self._call(self.image.encode.remote(array))
        await self._call(self.studies.add.remote(row, volume.array, volume.spacing))
        index_meta = {k: row.get(k) for k in ("study_id", "modality", "body_part", "split", "abnormal")}
        result = await self._call(self.searcher.add.remote([series_id], vector[None], [index_meta]))
        log.info("added study %s (%s) to index version %s", series_id, upload.what, result["version"])
        found = await self._call(self.studies.study.remote(series_id))
        return {"series_id": series_id, "duplicate": False, "index_version": result["version"],
                "index_size": result["size"], "metadata": _public_study(found), "thumbnails": _thumbs(series_id)}

