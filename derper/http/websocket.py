"""The server side of DERP over WebSocket (spec §1.6): check the upgrade, answer it, serve the
session on a ``net.websocket`` stream.

The 101 answer goes out in the same write as ServerKey. A client that does not offer exactly
the subprotocol ``derp`` is accepted and closed with 1008, as the Go server does.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import trio

from .. import logs
from ..net.websocket import WebSocketStream
from ..proto import websocket as ws
from ..relay.hub import Relay
from ..relay.session import serve_derp
from .endpoints import Request, Response, error

log = logs.get("derper.http.websocket")


def handshake_problem(req: Request) -> Response | None:
    """The 400 for an upgrade request RFC 6455 would refuse; None if it can be accepted."""
    if req.header(b"sec-websocket-version") != b"13" or not req.header(b"sec-websocket-key"):
        return replace(error(400, "WebSocket upgrade needs Sec-WebSocket-Version 13 and a "
                                  "Sec-WebSocket-Key"), close=True)
    return None


async def serve_websocket(relay: Relay, stream: trio.abc.Stream, req: Request, trailing: bytes,
                          *, head_timeout: float, not_ideal: bool,
                          on_established: Callable[[], None]) -> None:
    """Serve the DERP session ``req`` (checked by ``handshake_problem``) asks for."""
    key = req.header(b"sec-websocket-key")
    remote = f"{req.remote_ip}:{req.remote_port}"
    if ws.SUBPROTOCOL.encode() not in ws.offered(req.header(b"sec-websocket-protocol")):
        conn = WebSocketStream(stream, client=False, preface=ws.accept_response(key, None))
        relay.log_throttle.log(log, "info", "WebSocket upgrade failed", remote=remote,
                               error="subprotocol derp not offered")
        with trio.move_on_after(head_timeout):
            await conn.close(ws.CLOSE_POLICY, "subprotocol derp required")
        return
    conn = WebSocketStream(stream, client=False, initial=trailing,
                           preface=ws.accept_response(key, ws.SUBPROTOCOL))
    relay.stats.websocket_accepts += 1
    await serve_derp(relay, conn, remote_ip=req.remote_ip, remote_port=req.remote_port,
                     on_established=on_established, not_ideal=not_ideal, transport="websocket")
