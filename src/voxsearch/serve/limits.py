"""Request body limits: every request has one, enforced before the body is read and while it streams.

Uploads (multipart POSTs to the upload routes) may be as large as the upload limit plus multipart framing;
every other body (JSON searches, id-only forms) gets the small `max_body_bytes`. A declared Content-Length
over the limit is refused before the app runs; a body without one (chunked) is counted as it streams and
cut off with 413 the moment it passes the limit, so the app never buffers more than that.

Whether a request is an upload is read from its Content-Type with the parser Starlette itself uses for
forms, so whatever Starlette would parse as multipart ('Multipart/Form-Data', ' multipart/form-data') is
recognised as such; anything else gets the small limit.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection

from python_multipart.multipart import parse_options_header
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from voxsearch.serve.config import Limits

# Room for multipart framing (boundaries, part headers, the small form fields) around the file.
MULTIPART_SLACK = 64 * 1024
_DIGITS = re.compile(r"[0-9]+")
_ERRORS = {400: "bad_request", 411: "length_required", 413: "too_large"}


def media_type(content_type: str | None) -> str:
    """The media type of a Content-Type header: lower case, without parameters or surrounding space."""
    return parse_options_header(content_type or "")[0].decode("latin-1")


class BodyTooLarge(Exception):
    """Raised to the app from `receive` once a streamed body passes its limit."""


class RequestBodyLimit:
    """Pure ASGI middleware. `limits` is read per request (the config arrives after the app is built);
    `on_refuse(status, upload)` hears of every refusal, e.g. to count rejected uploads."""

    def __init__(self, app: ASGIApp, limits: Callable[[], Limits | None], upload_routes: Collection[str],
                 on_refuse: Callable[[int, bool], None] | None = None):
        self.app = app
        self.limits = limits
        self.upload_routes = frozenset(upload_routes)
        self.on_refuse = on_refuse

    def _limit(self, scope: Scope, headers: Headers) -> tuple[int, bool, str]:
        """(bytes allowed, whether it is an upload, the message when a body passes it)."""
        limits = self.limits() or Limits()
        upload = (scope["method"] == "POST" and scope["path"] in self.upload_routes
                  and media_type(headers.get("content-type")) == "multipart/form-data")
        if upload:
            return (limits.max_upload_bytes + MULTIPART_SLACK, True,
                    f"upload exceeds the limit of {limits.max_upload_bytes / 1e6:.0f} MB")
        return (limits.max_body_bytes, False,
                f"request body exceeds the limit of {limits.max_body_bytes:,} bytes for this endpoint")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        limit, upload, too_large = self._limit(scope, headers)
        declared = headers.get("content-length")
        if declared is None and upload:
            # An upload's size is known before it is sent; requiring it lets an oversized one be refused unread.
            await self._refuse(scope, receive, send, 411, upload,
                               "uploads need a Content-Length header (chunked uploads are not accepted)")
            return
        if declared is not None and not _DIGITS.fullmatch(declared.strip()):
            await self._refuse(scope, receive, send, 400, upload, "Content-Length is not a number")
            return
        if declared is not None and int(declared) > limit:
            await self._refuse(scope, receive, send, 413, upload, too_large)
            return

        received = 0
        over = False
        started = False

        async def counted_receive() -> Message:
            nonlocal received, over
            if over:
                raise BodyTooLarge()
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    over = True
                    raise BodyTooLarge()
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if over and not started:
                return  # the app's answer to a body it could not finish reading: the 413 below replaces it
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:  # noqa: BLE001 - whatever the app made of BodyTooLarge (FastAPI: a 400)
            if not over or started:
                raise
        if over and not started:
            await self._refuse(scope, receive, send, 413, upload, too_large)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, status: int, upload: bool, detail: str):
        if self.on_refuse is not None:
            self.on_refuse(status, upload)
        # Close the connection: the client may still be sending the body this answer refuses.
        response = JSONResponse({"error": _ERRORS[status], "detail": detail}, status_code=status,
                                headers={"Connection": "close"})
        await response(scope, receive, send)
