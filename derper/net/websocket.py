"""DERP over WebSocket (subprotocol ``derp``, spec §1.6): a WebSocket as a DERP byte stream.

Binary messages carry the DERP byte stream; message boundaries mean nothing. Both sides use
this adapter: the server's accept lives in ``http.websocket``, the client's open here.
"""

from __future__ import annotations

import trio
import trio_websocket
from trio_websocket import ConnectionClosed

MAX_MESSAGE = 1 << 20  # Go's 32 KiB default is too small for a 64 KiB packet
SUBPROTOCOL = "derp"


class ReplayStream(trio.abc.Stream):
    """``prefix`` first, then ``stream``: trio-websocket's server side wants to read the HTTP
    request itself, so it is given the head we already parsed again."""

    def __init__(self, prefix: bytes, stream: trio.abc.Stream) -> None:
        self._prefix = prefix
        self._stream = stream

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            data, self._prefix = self._prefix, b""
            return data
        return await self._stream.receive_some(max_bytes)

    async def send_all(self, data) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._stream.aclose()


class WebSocketStream(trio.abc.Stream):
    """A WebSocket connection as a byte stream of binary messages (both directions)."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        try:
            message = await self.ws.get_message()
        except ConnectionClosed:
            return b""
        if isinstance(message, str):
            await self.ws.aclose(code=1003, reason="DERP needs binary messages")
            raise trio.BrokenResourceError("text WebSocket message")
        return message

    async def send_all(self, data) -> None:
        try:
            await self.ws.send_message(bytes(data))
        except ConnectionClosed as e:
            raise trio.BrokenResourceError("WebSocket closed") from e

    async def wait_send_all_might_not_block(self) -> None:
        pass

    async def aclose(self) -> None:
        await self.ws.aclose()


async def open_client(nursery: trio.Nursery, stream: trio.abc.Stream, host: str,
                      path: str = "/derp", extra_headers=()) -> WebSocketStream:
    """The client's WebSocket upgrade on ``stream``. A refusal (``ConnectionRejected``) is
    raised in ``nursery``, where trio-websocket's reader task runs."""
    ws = await trio_websocket.wrap_client_stream(
        nursery, stream, host, path, subprotocols=[SUBPROTOCOL], max_message_size=MAX_MESSAGE,
        extra_headers=[(k.encode(), v.encode()) for k, v in extra_headers])
    return WebSocketStream(ws)
