"""The plain HTTP endpoints of a DERP server (spec §1.7, §1.8), as pure request → response code.

Status codes, bodies and headers follow the Go derper so monitoring and clients that probe
these paths (netcheck's latency check, captive-portal checks, bootstrap DNS) see no difference.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from typing import Callable

from ..net.addr import host_literal

BROWSER_HEADERS = [
    ("Strict-Transport-Security", "max-age=63072000; includeSubDomains"),
    ("Content-Security-Policy", "default-src 'self'; frame-ancestors 'none'; "
     "form-action 'self'; base-uri 'self'; block-all-mixed-content; object-src 'none'"),
    ("X-Frame-Options", "DENY"),
    ("X-Content-Type-Options", "nosniff"),
]
NO_CACHE = "no-cache, no-store, must-revalidate, no-transform, max-age=0"
_CHALLENGE_RE = re.compile(rb"[A-Za-z0-9._:-]{1,64}")
PROBE_PATHS = ("/derp/probe", "/derp/latency-check")


@dataclass(frozen=True)
class Request:
    method: str
    target: str  # as sent: path plus query
    headers: list[tuple[bytes, bytes]]  # names lower-cased (h11)
    remote_ip: str | None = None  # the client's: a -trusted-proxies peer's headers applied
    remote_port: int = 0  # 0 when a proxy named the client without a port
    proxied: bool = False  # the address came from a trusted proxy's headers

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None


@dataclass(frozen=True)
class Response:
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    close: bool = False


def error(status: int, text: str) -> Response:
    """Go's http.Error: plain text body with a trailing newline."""
    return Response(status, [("Content-Type", "text/plain; charset=utf-8"),
                             ("X-Content-Type-Options", "nosniff")], (text + "\n").encode())


def validate_home(home: str) -> str:
    """``-home``: empty (default page), ``blank``, or an http(s) URL to redirect to."""
    if home in ("", "blank") or re.match(r"^https?://", home):
        return home
    raise ValueError(f'-home must be empty, "blank" or an http:// or https:// URL, not {home!r}')


def generate_204(req: Request) -> Response:
    """Captive-portal check: 204, echoing a well-formed ``X-Tailscale-Challenge``."""
    headers = [("Cache-Control", NO_CACHE)]
    challenge = req.header(b"x-tailscale-challenge")
    if challenge is not None and _CHALLENGE_RE.fullmatch(challenge):
        headers.append(("X-Tailscale-Response", "response " + challenge.decode()))
    return Response(204, headers)


def probe(req: Request) -> Response:
    if req.method in ("GET", "HEAD"):
        return Response(200, [("Access-Control-Allow-Origin", "*")])
    return error(405, "bogus probe method")


ROBOTS = Response(200, [("Content-Type", "text/plain; charset=utf-8")] + BROWSER_HEADERS,
                  b"User-agent: *\nDisallow: /\n")


def home_page(home: str, derp_enabled: bool) -> Response:
    if home == "blank":
        return Response(200, [("Content-Type", "text/html; charset=utf-8")] + BROWSER_HEADERS)
    if home:
        return Response(302, [("Location", home)] + BROWSER_HEADERS)
    status = "" if derp_enabled else "<p>Status: disabled</p>\n"
    body = (
        "<!DOCTYPE html>\n<html><head><title>DERP</title></head><body>\n"
        "<h1>DERP</h1>\n"
        "<p>This is a <a href=\"https://tailscale.com/kb/1232/derp-servers\">DERP</a> relay "
        "server for <a href=\"https://tailscale.com/\">Tailscale</a> clients.</p>\n"
        f"{status}"
        "<p>Documentation: <a href=\"https://tailscale.com/kb/1118/custom-derp-servers\">"
        "custom DERP servers</a>.</p>\n"
        "</body></html>\n"
    )
    return Response(200, [("Content-Type", "text/html; charset=utf-8")] + BROWSER_HEADERS,
                    body.encode())


class Endpoints:
    """Routes the main listener's non-DERP requests."""

    def __init__(self, *, home: str, derp_enabled: bool,
                 bootstrap_body: Callable[[], bytes],
                 varz: Callable[[Request], Response] | None = None) -> None:
        self.home = validate_home(home)
        self.varz = varz
        self.derp_enabled = derp_enabled
        self.bootstrap_body = bootstrap_body

    def handle(self, req: Request) -> Response:
        path = req.path
        if path in PROBE_PATHS:
            return probe(req)
        if path == "/generate_204":
            return generate_204(req)
        if path == "/robots.txt":
            return ROBOTS
        if path == "/bootstrap-dns":
            return Response(200, [("Content-Type", "application/json")] + BROWSER_HEADERS,
                            self.bootstrap_body(), close=True)
        if path == "/debug/varz" and self.varz is not None:
            return self.varz(req)
        if path == "/derp" and not self.derp_enabled:
            return error(404, "derp server disabled")
        return home_page(self.home, self.derp_enabled)


def https_redirect(req: Request, hostname: str, tls_port: int) -> Response:
    """The port-80 helper: captive-portal checks answered, everything else sent to HTTPS.

    Unlike Go (which redirects to the request's Host on 443 even when TLS is elsewhere), the
    target is our own ``-hostname`` and TLS port, so the redirect works on custom ports and
    never reflects a forged Host header.
    """
    if req.path == "/generate_204":
        return generate_204(req)
    if req.method not in ("GET", "HEAD"):
        return error(400, "Use HTTPS")
    host = host_literal(hostname.strip("[]"))
    port = "" if tls_port == 443 else f":{tls_port}"
    target = req.target if req.target.startswith("/") else "/"
    return Response(302, [("Location", f"https://{host}{port}{target}"),
                          ("Content-Type", "text/html; charset=utf-8")],
                    f'<a href="{html.escape(f"https://{host}{port}{target}")}">Found</a>.\n'
                    .encode())
