"""ACME HTTP-01 answers on the port-80 helper (spec §1.8).

Two sources: the tokens of derper's own ACME orders (kept in memory while an order runs), and
files that certbot's ``--webroot`` mode writes under ``-acme-webroot``, so certbot can renew
while derper holds port 80.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..http.endpoints import Request, Response, error

PREFIX = "/.well-known/acme-challenge/"
_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{1,256}")  # base64url (RFC 8555 §8.3): no path tricks
_MAX_FILE = 4096  # a key authorization is under 200 bytes


class Http01Responder:
    def __init__(self, webroot: Path | None = None) -> None:
        self.webroot = webroot
        self._tokens: dict[str, bytes] = {}

    def publish(self, token: str, key_authorization: str) -> None:
        """Called from the ACME worker thread; a dict store is atomic under the GIL."""
        self._tokens[token] = key_authorization.encode()

    def withdraw(self, token: str) -> None:
        self._tokens.pop(token, None)

    def handle(self, req: Request) -> Response | None:
        """The answer for a challenge path, or None for every other path."""
        if not req.path.startswith(PREFIX):
            return None
        token = req.path[len(PREFIX):]
        if req.method not in ("GET", "HEAD") or not _TOKEN_RE.fullmatch(token):
            return error(404, "404 page not found")
        body = self._tokens.get(token)
        if body is None and self.webroot is not None:
            body = self._read_webroot(token)
        if body is None:
            return error(404, "404 page not found")
        return Response(200, [("Content-Type", "text/plain")], body)

    def _read_webroot(self, token: str) -> bytes | None:
        path = self.webroot / ".well-known" / "acme-challenge" / token
        try:
            with path.open("rb") as f:
                body = f.read(_MAX_FILE + 1)
        except OSError:
            return None
        return body if len(body) <= _MAX_FILE else None
