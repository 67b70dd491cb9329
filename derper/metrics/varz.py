"""``/debug/varz``: the Go derper's Prometheus text, names and layout, and who may read it.

Dashboards and alerts written against a Go derper (``derp_packets_received``, no ``_total``)
keep working. Go's text is not lint-clean (counters without ``_total``, untyped samples); the
lint-clean exposition is ``/metrics`` on ``-metrics-addr``.
"""

from __future__ import annotations

import ipaddress
from typing import Callable, Iterable

from ..http.endpoints import Request, Response, error
from ..net import addr
from ..net.addr import IPNetwork
from .exposition import Metric

LOOPBACK = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")]
CONTENT_TYPE = "text/plain;version=0.0.4;charset=utf-8"


def go_number(value: float) -> str:
    """A number as Go's ``%v`` prints it: integers plain, floats shortest with Go's exponents."""
    if isinstance(value, int):
        return str(value)
    if value == int(value) and abs(value) < 1e21:
        return str(int(value))
    text = repr(value)
    mantissa, sep, exp = text.partition("e")
    if sep:
        sign = "-" if exp.startswith("-") else "+"
        text = f"{mantissa}e{sign}{exp.lstrip('+-').zfill(2)}"
    return text


def _labels(labels) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}" if labels else ""


def render(metrics: Iterable[Metric]) -> str:
    lines: list[str] = []
    for m in metrics:
        if not m.varz:
            continue
        if m.kind == "histogram":
            lines.append(f"# TYPE {m.name} histogram")
            for bound, count in m.histogram.cumulative():
                le = "+Inf" if bound == float("inf") else go_number(bound)
                lines.append(f'{m.name}_bucket{{le="{le}"}} {count}')
            lines.append(f"{m.name}_sum {m.histogram.sum}")
            lines.append(f"{m.name}_count {m.histogram.cumulative()[-1][1]}")
            continue
        if m.kind != "untyped":
            lines.append(f"# TYPE {m.name} {m.kind}")
        if m.varz_help:
            lines.append(f"# HELP {m.name} {m.help}")
        for labels, value in m.samples:
            lines.append(f"{m.name}{_labels(labels)} {go_number(value)}")
    return "\n".join(lines) + "\n"


# ---- access (spec §1.9) -------------------------------------------------------------------


def parse_cidrs(text: str) -> list[IPNetwork]:
    """``-debug-allow-cidrs``: comma-separated prefixes such as ``10.0.0.0/8,fd00::/8``."""
    return addr.parse_cidrs(text, "-debug-allow-cidrs")


def debug_allowed(remote_ip: str | None, forwarded: bool, allow: list[IPNetwork]) -> bool:
    """Loopback or an allowed prefix, and never through a proxy we do not trust
    (``X-Forwarded-For``): behind a reverse proxy every request would come from loopback.
    ``remote_ip`` is the client's own address (a trusted proxy's headers already applied)."""
    if forwarded or not remote_ip:
        return False
    return addr.ip_in(remote_ip, LOOPBACK) or addr.ip_in(remote_ip, allow)


def handler(metrics: Callable[[], list[Metric]],
            allow: list[IPNetwork]) -> Callable[[Request], Response]:
    """The ``/debug/varz`` endpoint: Go's text to allowed callers, Go's 403 to others."""

    def varz(req: Request) -> Response:
        forwarded = not req.proxied and req.header(b"x-forwarded-for") is not None
        if not debug_allowed(req.remote_ip, forwarded, allow):
            return error(403, "debug access denied")
        return Response(200, [("Content-Type", CONTENT_TYPE)], render(metrics()).encode())

    return varz
