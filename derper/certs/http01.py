"""ACME HTTP-01 answers on the port-80 helper (spec §1.8).

Two sources: the tokens of derper's own ACME orders (kept in memory while an order runs), and
files that certbot's ``--webroot`` mode writes under ``-acme-webroot``, so certbot can renew
while derper holds port 80. With ``-workers``, the worker that orders also writes its tokens
into a directory every worker serves (``shared``): the CA's request may reach any of them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..http.endpoints import Request, Response, error

PREFIX = "/.well-known/acme-challenge/"
_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{1,256}")  # base64url (RFC 8555 §8.3): no path tricks
_MAX_FILE = 4096  # a key authorization is under 200 bytes


class Http01Responder:
    def __init__(self, webroot: Path | None = None, shared: Path | None = None) -> None:
        self.webroot = webroot
        self.shared = shared
        self._tokens: dict[str, bytes] = {}

    def publish(self, token: str, key_authorization: str) -> None:
        """Called from the ACME worker thread; a dict store is atomic under the GIL."""
        body = key_authorization.encode()
        if self.shared is not None and _TOKEN_RE.fullmatch(token):
            path = self._shared_path(token)
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = path.with_name(f".{token}.tmp")
            tmp.write_bytes(body)
            os.replace(tmp, path)
        self._tokens[token] = body

    def withdraw(self, token: str) -> None:
        self._tokens.pop(token, None)
        if self.shared is not None and _TOKEN_RE.fullmatch(token):
            self._shared_path(token).unlink(missing_ok=True)

    def _shared_path(self, token: str) -> Path:
        return self.shared / ".well-known" / "acme-challenge" / token

    def handle(self, req: Request) -> Response | None:
        """The answer for a challenge path, or None for every other path."""
        if not req.path.startswith(PREFIX):
            return None
        token = req.path[len(PREFIX):]
        if req.method not in ("GET", "HEAD") or not _TOKEN_RE.fullmatch(token):
            return error(404, "404 page not found")
        body = self._tokens.get(token)
        for root in (self.shared, self.webroot):
            if body is None and root is not None:
                body = _read_token(root, token)
        if body is None:
            return error(404, "404 page not found")
        return Response(200, [("Content-Type", "text/plain")], body)


def _read_token(root: Path, token: str) -> bytes | None:
    path = root / ".well-known" / "acme-challenge" / token
    try:
        with path.open("rb") as f:
            body = f.read(_MAX_FILE + 1)
    except OSError:
        return None
    return body if len(body) <= _MAX_FILE else None
