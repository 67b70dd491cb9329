"""Real admission back ends on loopback: a verify-URL controller and a LocalAPI look-alike.

Both are small h11 servers (one request per connection) that record what they were asked, so
tests check the exact request a real Headscale or tailscaled would see.
"""

from __future__ import annotations

import json
import socket
import ssl
from dataclasses import dataclass, field

import h11
import trio


@dataclass
class Seen:
    method: str
    target: str
    headers: dict
    body: bytes


@dataclass
class FakeBackend:
    """``answer(seen) -> (status, body)``; an answer of None means "accept, never reply"."""

    answer: object
    requests: list = field(default_factory=list)
    port: int = 0
    path: str = ""
    delay: float = 0.0  # seconds before answering

    async def handle(self, stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER)
        async with stream:
            req, body = None, b""
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    conn.receive_data(data)
                elif isinstance(event, h11.Request):
                    req = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
            seen = Seen(req.method.decode(), req.target.decode(),
                        {k.decode().lower(): v.decode() for k, v in req.headers}, body)
            self.requests.append(seen)
            reply = self.answer(seen)
            if reply is None:
                await trio.sleep_forever()
            await trio.sleep(self.delay)
            status, payload = reply
            out = conn.send(h11.Response(status_code=status, headers=[
                ("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]))
            out += conn.send(h11.Data(data=payload)) + conn.send(h11.EndOfMessage())
            try:
                await stream.send_all(out)
            except trio.BrokenResourceError:
                pass


def headscale_answer(allowed: set[str]):
    """Headscale's /verify: ``{"Allow":bool}`` + newline, 400 on bad JSON."""

    def answer(seen: Seen):
        try:
            node = json.loads(seen.body)["NodePublic"]
        except (ValueError, KeyError):
            return 400, b"bad request\n"
        return 200, json.dumps({"Allow": node in allowed}).encode() + b"\n"

    return answer


def localapi_answer(known: set[str]):
    """tailscaled's whois: 200 + a WhoIsResponse for a known node key, 404 otherwise."""

    def answer(seen: Seen):
        prefix = "/localapi/v0/whois?addr=nodekey%3A"
        if (seen.method != "GET" or not seen.target.startswith(prefix)
                or seen.headers.get("host") != "local-tailscaled.sock"
                or not seen.headers.get("tailscale-cap")):
            return 400, b"invalid localapi request\n"
        key = "nodekey:" + seen.target[len(prefix):]
        if key in known:
            return 200, json.dumps({"Node": {"Key": key}}).encode()
        return 404, b"not found\n"

    return answer


async def serve_tcp(backend: FakeBackend, nursery: trio.Nursery,
                    ssl_context: ssl.SSLContext | None = None) -> FakeBackend:
    """Plain HTTP on loopback, or HTTPS with ``ssl_context``."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    backend.port = listeners[0].socket.getsockname()[1]
    if ssl_context is not None:
        listeners = [trio.SSLListener(lst, ssl_context, https_compatible=True)
                     for lst in listeners]
    nursery.start_soon(trio.serve_listeners, backend.handle, listeners)
    return backend


async def serve_unix(backend: FakeBackend, path: str, nursery: trio.Nursery) -> FakeBackend:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen(16)
    backend.path = path
    nursery.start_soon(trio.serve_listeners, backend.handle, [trio.SocketListener(sock)])
    return backend
