"""Reading DERP frames off a byte stream: the one loop every reader of the handshake shares.

The relay's steady-state read loop (``relay.session``) reads inline instead, for speed; it still
uses ``RECV_SIZE``.
"""

from __future__ import annotations

import trio

from ..proto.wire import FrameReader

RECV_SIZE = 64 << 10  # one socket read: four full TLS records, or a burst of small packets


async def read_more(stream: trio.abc.Stream, reader: FrameReader) -> None:
    """One read from ``stream`` into ``reader``; ``EOFError`` when the peer has closed."""
    data = await stream.receive_some(RECV_SIZE)
    if not data:
        raise EOFError("peer closed the connection")
    reader.feed(data)


async def next_frame(stream: trio.abc.Stream, reader: FrameReader) -> tuple[int, int, int]:
    """The next complete frame ``(type, start, end)``, reading as needed; ``EOFError`` on EOF."""
    while (f := reader.next()) is None:
        await read_more(stream, reader)
    return f


class ReplayStream(trio.abc.Stream):
    """``prefix`` first, then ``stream``: bytes already read, offered to a reader again."""

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
