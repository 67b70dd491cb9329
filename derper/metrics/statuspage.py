"""The ``/status`` page's files, shipped inside the package: no CDN, no external fonts, so the
page works offline and through an SSH tunnel. Read once, on first request."""

from __future__ import annotations

from functools import cache
from importlib.resources import files

# URL path → (file in derper/metrics/static/, content type)
ASSETS = {
    "/status": ("status.html", "text/html; charset=utf-8"),
    "/status/status.js": ("status.js", "text/javascript; charset=utf-8"),
    "/status/status.css": ("status.css", "text/css; charset=utf-8"),
    "/status/uplot.min.js": ("uPlot.iife.min.js", "text/javascript; charset=utf-8"),
    "/status/uplot.min.css": ("uPlot.min.css", "text/css; charset=utf-8"),
    "/status/uplot-license.txt": ("uPlot-LICENSE", "text/plain; charset=utf-8"),
}
# Only our own files, and charts drawn on a canvas: nothing else may load or run.
CSP = b"default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'"


def asset(path: str) -> tuple[bytes, str] | None:
    """The body and content type served at ``path``, or None if it is not one of ours."""
    entry = ASSETS.get(path)
    if entry is None:
        return None
    name, content_type = entry
    return _read(name), content_type


@cache  # keyed by the few names in ASSETS only: a scanner's paths never reach it
def _read(name: str) -> bytes:
    return (files(__package__) / "static" / name).read_bytes()
