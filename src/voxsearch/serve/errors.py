"""What a failure may tell the client and what it may tell the log.

Exception text from readers and backends is not ours: it echoes DICOM header values ("could not convert
string to float: 'DOE JOHN'") and server paths (folder names often hold patient names). Such text never
reaches a client: the client gets a message for the failure class plus a random error id, and the log
gets that id with the exception type and a scrubbed message (quoted values, paths and the identifiers
known for the request removed), enough for an operator to find the cause.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Iterable

from voxsearch.ingest.deid import scrub

MAX_DETAIL_CHARS = 300
# Python and pydicom quote the offending value in their messages; that value may be any header text.
_QUOTED = re.compile(r"'[^'\n]*'|\"[^\"\n]*\"")
# An absolute path runs to the separator our readers put after it ("<path>: reason"), not to the first
# space: folder names hold spaces ("/data/Doe John/ct").
_PATH = re.compile(r"(?<![\w.~/\\<])(?:~|[A-Za-z]:)?[/\\](?=[^\s/\\])[^\n]*?(?=: |, |; |\)|\]|$)", re.M)


class PublicError(Exception):
    """A failure answered with text we wrote; `cause` (foreign text) only reaches the log, scrubbed.

    `identifiers` are the patient identifiers known for the request (an upload's DICOM headers);
    `upload` marks a refused upload for the metrics.
    """

    def __init__(self, status: int, message: str, cause: BaseException | None = None,
                 identifiers: Iterable[str] = (), upload: bool = False):
        super().__init__(message)
        self.status = status
        self.message = message
        self.cause = cause
        self.identifiers = tuple(v for v in identifiers if v)
        self.upload = upload


def new_error_id() -> str:
    return secrets.token_hex(6)


def cause_of(exc: BaseException) -> BaseException:
    """The user-level exception inside a Ray task error."""
    return getattr(exc, "cause", None) or exc


def redact_paths(text: str, roots: Iterable[str] = ()) -> str:
    """`text` without server paths: absolute ones, and relative ones under one of the folders `roots`."""
    for root in sorted({str(r).rstrip("/") for r in roots if r}, key=len, reverse=True):
        text = re.sub(r"(?<![\w.])" + re.escape(root) + r"/[^\n]*?(?=: |, |; |\)|\]|$)", "<path>", text, flags=re.M)
    return _PATH.sub("<path>", text)


def scrub_text(text: str, identifiers: Iterable[str] = (), roots: Iterable[str] = ()) -> str:
    """`text` without quoted values, server paths and the given identifiers, on one line."""
    text = redact_paths(_QUOTED.sub("'…'", text), roots)
    text = scrub(text, list(identifiers)) or ""
    return " ".join(text.split())[:MAX_DETAIL_CHARS]


def describe_failure(exc: BaseException, identifiers: Iterable[str] = (), roots: Iterable[str] = ()) -> str:
    """What the log may say about an exception: its type and its scrubbed message."""
    cause = cause_of(exc)
    lines = [line for line in str(cause).strip().splitlines() if line.strip()]
    # A Ray error without a cause carries a remote traceback; its last line is the message.
    message = scrub_text(lines[-1], identifiers, roots) if lines else ""
    return f"{type(cause).__name__}: {message}" if message else type(cause).__name__


class _ScrubRecords(logging.Filter):
    """Rewrites a library's log records through scrub_text before any handler sees them."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = scrub_text(record.getMessage())
        record.args = ()
        return True


def scrub_library_logs() -> None:
    """Keep pydicom's warnings about invalid values (which quote the value) out of the logs raw.

    pydicom both logs and `warnings.warn`s each message; the log record is kept, scrubbed, and the
    duplicate warning (printed raw to stderr, which Ray collects) is dropped.
    """
    import warnings

    logger = logging.getLogger("pydicom")
    if not any(isinstance(f, _ScrubRecords) for f in logger.filters):
        logger.addFilter(_ScrubRecords())
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")
