"""A tiny HTTP/1.1 client on h11: one request per connection, for admission and DERP upgrades.

Enough for an admission controller (``-verify-client-url``, plain HTTP or HTTPS with the system
CA roots), tailscaled's LocalAPI over its unix socket, and the DERP client's ``Upgrade: DERP``
request (spec §1.2) and its WebSocket variant (§1.6). No redirects, no keep-alive, and only the
first ``max_body`` bytes of a response are read, so a hostile or broken server costs at most one
small buffer and the caller's timeout.
"""

from __future__ import annotations

import base64
import os
import ssl
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

import h11
import trio

from .. import __version__
from ..errors import IOFailure
from ..net.addr import host_literal
from ..net.reading import RECV_SIZE
from ..net.websocket import WebSocketStream
from ..proto import websocket as ws

MAX_ERROR_BODY = 4096  # what an upgrade error shows of the server's answer

_default_ssl: ssl.SSLContext | None = None


class HTTPClientError(IOFailure):
    """The request could not be completed (connect, TLS, protocol); the message says why."""


@dataclass(frozen=True)
class HTTPResponse:
    status: int
    headers: list[tuple[bytes, bytes]]  # names lower-cased, as h11 gives them
    body: bytes  # at most max_body bytes
    after: bytes = b""  # what followed a 101 response: the first bytes of the new protocol


class Exchange:
    """One request and its response; h11 keeps the state between the two."""

    def __init__(self, method: str, target: str, headers, body: bytes = b"") -> None:
        self._conn = h11.Connection(h11.CLIENT)
        data = self._conn.send(h11.Request(method=method, target=target, headers=headers))
        data += self._conn.send(h11.Data(data=body)) if body else b""
        self.request = data + self._conn.send(h11.EndOfMessage())

    async def read_response(self, stream: trio.abc.Stream, max_body: int) -> HTTPResponse:
        """The response to ``request``; a 101 returns at once, with the bytes after it.

        ``HTTPClientError`` when the answer is not HTTP or the server closes without one;
        errors of the stream itself are the caller's to map.
        """
        conn = self._conn
        status, headers, chunks, size = None, [], [], 0
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(RECV_SIZE)
                    if not data and status is None:
                        raise HTTPClientError("server closed the connection before answering")
                    conn.receive_data(data)
                elif isinstance(event, h11.InformationalResponse) and event.status_code == 101:
                    return HTTPResponse(101, list(event.headers), b"",
                                        bytes(conn.trailing_data[0]))
                elif isinstance(event, h11.Response):
                    status, headers = event.status_code, list(event.headers)
                elif isinstance(event, h11.Data):
                    chunks.append(event.data)
                    size += len(event.data)
                    if size >= max_body:
                        break
                elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    break
        except h11.ProtocolError as e:
            raise HTTPClientError(f"bad HTTP response: {e}") from e
        return HTTPResponse(status, headers, b"".join(chunks)[:max_body])

    async def read_101(self, stream: trio.abc.Stream) -> bytes:
        """The bytes after a ``101 Switching Protocols``; any other answer is an
        ``HTTPClientError`` with its status and the start of its body."""
        resp = await self.read_response(stream, MAX_ERROR_BODY)
        if resp.status != 101:
            raise HTTPClientError(f"server answered the upgrade with HTTP {resp.status}: "
                                  f"{resp.body.decode('utf-8', 'replace').strip()}")
        return resp.after


def host_header(url: SplitResult) -> str:
    """``Host`` as a Go client sends it: the port only when it is not the scheme's default."""
    host = host_literal(url.hostname)
    default = 443 if url.scheme == "https" else 80
    return host if url.port in (None, default) else f"{host}:{url.port}"


def derp_upgrade(host: str, *, fast_start: bool, ideal_node: str | None,
                 extra_headers=()) -> Exchange:
    """``GET /derp`` with ``Upgrade: DERP``, headers in the Go client's order (spec §1.2),
    then ``extra_headers``."""
    headers = [("Host", host), ("User-Agent", f"derper-client/{__version__}"),
               ("Connection", "Upgrade")]
    if fast_start:
        headers.append(("Derp-Fast-Start", "1"))
    if ideal_node:
        headers.append(("Ideal-Node", ideal_node))
    headers.append(("Upgrade", "DERP"))
    headers.extend(extra_headers)
    return Exchange("GET", "/derp", headers)


async def open_websocket(stream: trio.abc.Stream, host: str, path: str = "/derp",
                         extra_headers=()) -> WebSocketStream:
    """The client's WebSocket upgrade on ``stream``; HTTPClientError if it is refused."""
    key = base64.b64encode(os.urandom(16))
    exchange = Exchange("GET", path, [
        ("Host", host), ("User-Agent", f"derper-client/{__version__}"),
        ("Upgrade", "websocket"), ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", key), ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Protocol", ws.SUBPROTOCOL), *extra_headers])
    await stream.send_all(exchange.request)
    resp = await exchange.read_response(stream, MAX_ERROR_BODY)
    if resp.status != 101:
        raise HTTPClientError(f"server answered the WebSocket upgrade with HTTP {resp.status}: "
                              f"{resp.body.decode('utf-8', 'replace').strip()}")
    headers = dict(resp.headers)
    if headers.get(b"sec-websocket-accept", b"").strip() != ws.accept_token(key):
        raise HTTPClientError("server answered the WebSocket upgrade with a wrong "
                              "Sec-WebSocket-Accept")
    if headers.get(b"sec-websocket-protocol", b"").strip() != ws.SUBPROTOCOL.encode():
        raise HTTPClientError("server did not agree to the WebSocket subprotocol derp")
    return WebSocketStream(stream, client=True, initial=resp.after)


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
    head = [("Host", netloc), ("User-Agent", "derper"), ("Connection", "close"),
            ("Content-Length", str(len(body))), *headers]
    try:
        exchange = Exchange(method, target, head, body)
        await stream.send_all(exchange.request)
        return await exchange.read_response(stream, max_body)
    except h11.ProtocolError as e:
        raise HTTPClientError(f"bad HTTP request: {e}") from None
    except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError) as e:
        raise HTTPClientError(f"connection failed: {e}") from None
