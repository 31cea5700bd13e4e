"""API keys: compared in constant time as digests, taken from the X-API-Key or Authorization header."""

from __future__ import annotations

import hashlib
import hmac

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
