"""The server side of DERP over WebSocket (spec §1.6): accept the upgrade, serve the session.

trio-websocket wants to read the HTTP request itself, so it is given a stream that first replays
the request head we already parsed. The byte-stream adapter lives in ``net.websocket``.
"""

from __future__ import annotations

from typing import Callable

import trio
import trio_websocket
from trio_websocket import ConnectionClosed

from .. import logs
from ..net.websocket import MAX_MESSAGE, SUBPROTOCOL, ReplayStream, WebSocketStream
from ..relay.hub import Relay
from ..relay.session import serve_derp
from .endpoints import Request

log = logs.get("derper.http.websocket")


def request_head(req: Request) -> bytes:
    lines = [f"{req.method} {req.target} HTTP/1.1".encode()]
    lines += [k + b": " + v for k, v in req.headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def serve_websocket(relay: Relay, stream: trio.abc.Stream, req: Request, trailing: bytes,
                          remote_ip: str | None, remote_port: int, *, head_timeout: float,
                          not_ideal: bool, on_established: Callable[[], None]) -> None:
    async with trio.open_nursery() as nursery:
        try:
            await _accept_and_serve(nursery, relay, stream, req, trailing, remote_ip,
                                    remote_port, head_timeout, not_ideal, on_established)
        finally:
            nursery.cancel_scope.cancel()  # trio-websocket's reader task


async def _accept_and_serve(nursery: trio.Nursery, relay: Relay, stream: trio.abc.Stream,
                            req: Request, trailing: bytes, remote_ip: str | None,
                            remote_port: int, head_timeout: float, not_ideal: bool,
                            on_established: Callable[[], None]) -> None:
    try:
        with trio.fail_after(head_timeout):
            ws_req = await trio_websocket.wrap_server_stream(
                nursery, ReplayStream(request_head(req) + trailing, stream),
                message_queue_size=4, max_message_size=MAX_MESSAGE)
            if SUBPROTOCOL not in ws_req.proposed_subprotocols:
                ws = await ws_req.accept()
                await ws.aclose(code=1008, reason="subprotocol derp required")
                return
            ws = await ws_req.accept(subprotocol=SUBPROTOCOL)
    except (trio.TooSlowError, ConnectionClosed, trio.BrokenResourceError) as e:
        relay.log_throttle.log(log, "info", "WebSocket upgrade failed",
                               remote=f"{remote_ip}:{remote_port}", error=type(e).__name__)
        return
    relay.stats.websocket_accepts += 1
    await serve_derp(relay, WebSocketStream(ws), remote_ip=remote_ip, remote_port=remote_port,
                     on_established=on_established, not_ideal=not_ideal, transport="websocket")
