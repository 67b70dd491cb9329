"""A tiny HTTP/1.1 client on h11 for the admission checks: one request per connection.

Enough for an admission controller (``-verify-client-url``, plain HTTP or HTTPS with the system
CA roots) and tailscaled's LocalAPI over its unix socket; no redirects, no keep-alive, and only
the first ``max_body`` bytes of a response are read, so a hostile or broken server costs at most
one small buffer and the caller's timeout.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

import h11
import trio

from ..errors import IOFailure

RECV_SIZE = 16 << 10

_default_ssl: ssl.SSLContext | None = None


class HTTPClientError(IOFailure):
    """The request could not be completed (connect, TLS, protocol); the message says why."""


@dataclass(frozen=True)
class HTTPResponse:
    status: int
    body: bytes  # at most max_body bytes


def _ssl_context() -> ssl.SSLContext:
    global _default_ssl
    if _default_ssl is None:
        _default_ssl = ssl.create_default_context()
    return _default_ssl


async def request(method: str, url: str, *, body: bytes = b"", headers=(),
                  unix_socket: str | None = None, max_body: int = 4096,
                  ssl_context: ssl.SSLContext | None = None) -> HTTPResponse:
    """Send one request and read the status and the start of the body.

    With ``unix_socket`` the URL only names the Host and path (the LocalAPI's
    ``http://local-tailscaled.sock/...``). The caller bounds the time with a cancel scope.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise HTTPClientError(f"unsupported URL {url!r} (want http:// or https://)")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host = parts.hostname
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        if unix_socket is not None:
            stream: trio.abc.Stream = await trio.open_unix_socket(unix_socket)
        else:
            stream = await trio.open_tcp_stream(host, port)
        if parts.scheme == "https" and unix_socket is None:
            stream = trio.SSLStream(stream, ssl_context or _ssl_context(), server_hostname=host)
    except OSError as e:
        raise HTTPClientError(f"cannot connect: {e.strerror or e}") from None
    async with stream:
        return await _exchange(stream, method, target, parts.netloc, body, headers, max_body)


async def _exchange(stream: trio.abc.Stream, method: str, target: str, netloc: str,
                    body: bytes, headers, max_body: int) -> HTTPResponse:
    conn = h11.Connection(h11.CLIENT)
    head = [("Host", netloc), ("User-Agent", "derper"), ("Connection", "close"),
            ("Content-Length", str(len(body))), *headers]
    try:
        data = conn.send(h11.Request(method=method, target=target, headers=head))
        data += conn.send(h11.Data(data=body)) if body else b""
        data += conn.send(h11.EndOfMessage())
        await stream.send_all(data)
        status = None
        chunks: list[bytes] = []
        size = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(RECV_SIZE))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                chunks.append(event.data)
                size += len(event.data)
                if size >= max_body:
                    break
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                break
    except h11.ProtocolError as e:
        raise HTTPClientError(f"bad HTTP response: {e}") from None
    except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError) as e:
        raise HTTPClientError(f"connection failed: {e}") from None
    if status is None:
        raise HTTPClientError("connection closed before a response")
    return HTTPResponse(status, b"".join(chunks)[:max_body])
