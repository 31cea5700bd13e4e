"""Who may call: API keys (compared in constant time as digests, from the X-API-Key or Authorization
header) and, on a loopback server without keys, only this machine's own clients and pages."""

from __future__ import annotations

import hashlib
import hmac
import re

from voxsearch.serve.config import is_loopback

# Paths anyone may read: the page and its assets hold no data; probes must work without credentials.
PUBLIC_PATHS = {"/", "/favicon.ico", "/api/v1/health", "/api/v1/ready", "/api/v1/docs", "/api/v1/openapi.json"}
PUBLIC_PREFIXES = ("/static/",)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class KeyChecker:
    def __init__(self, keys: list[str], required: bool):
        self.required = required
        self._digests = [_digest(k) for k in keys]

    @staticmethod
    def is_public(path: str) -> bool:
        return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)

    @staticmethod
    def presented(headers) -> str | None:
        key = headers.get("x-api-key")
        if key:
            return key
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            return auth[7:].strip()
        return None

    def allows(self, path: str, headers) -> bool:
        if not self.required or self.is_public(path):
            return True
        key = self.presented(headers)
        if not key:
            return False
        digest = _digest(key)
        # Check every key (no early exit) so timing does not reveal which one matched.
        return bool(sum(hmac.compare_digest(digest, d) for d in self._digests))


# host, or [IPv6], then an optional port; nothing else (no userinfo, path or second address).
_AUTHORITY = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(?::([0-9]{1,5}))?")


def _loopback_authority(authority: str, port: int) -> bool:
    """Whether `host[:port]` names this server on loopback (an absent port is HTTP's 80)."""
    match = _AUTHORITY.fullmatch(authority.strip())
    if not match:
        return False
    return is_loopback(match.group(1)) and int(match.group(2) or 80) == port


class LoopbackOnly:
    """Without API keys a loopback server trusts whoever reaches it, and web pages on other sites can:
    DNS rebinding points a foreign name at 127.0.0.1, and a cross-site form POST (to /embed or /report)
    is a "simple" request a browser sends without asking. So a request must name this server by a
    loopback address and port (Host), and come from no page or from one this server served (Origin).
    """

    def __init__(self, port: int):
        self.port = port

    def refusal(self, headers) -> str | None:
        """Why a request is refused, or None; never repeats the header values (they are the caller's)."""
        if not _loopback_authority(headers.get("host", ""), self.port):
            return (f"this server only answers requests addressed to it on this machine (Host must be "
                    f"localhost, 127.0.0.1 or [::1] with port {self.port}); it has no API keys to check")
        origin = headers.get("origin")
        if origin is not None:
            scheme, sep, authority = origin.strip().partition("://")
            if not (sep and scheme.lower() == "http" and _loopback_authority(authority, self.port)):
                return ("cross-site request refused: this server has no API keys, so only its own page "
                        f"(http://localhost:{self.port}/ or http://127.0.0.1:{self.port}/) may call it")
        return None
