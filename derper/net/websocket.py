"""DERP over WebSocket (subprotocol ``derp``, spec §1.6): a WebSocket as a DERP byte stream,
right on the connection's own stream (TLS or plain), for the server and the client alike.

Why not a WebSocket library's connection object: one socket read here is decoded completely
(every frame it brought, ``proto.websocket``), a writer's whole batch goes out as one message
in one write, and over TLS the relay's non-blocking direct write (``send_nowait``) still works.
The server's accept lives in ``http.websocket``, the client's upgrade in ``http.client``.
"""

from __future__ import annotations

import os

import trio

from ..proto import websocket as ws
from .reading import RECV_SIZE
from .sending import send_alone

CLOSE_TIMEOUT = 0.25
_KEYS = 1024  # client mask keys drawn from the OS at once


class WebSocketStream(trio.abc.Stream):
    """Binary messages over ``transport`` as a byte stream (both directions).

    ``client``: this end masks what it sends and expects unmasked frames. ``initial``: bytes
    already read past the upgrade; ``preface``: raw bytes (the 101 answer) that go out with
    the first send. A peer's ping is answered, its close ends the stream (EOF) after our reply;
    a protocol violation is answered with the matching close and raised as a ProtocolError.
    """

    def __init__(self, transport: trio.abc.Stream, *, client: bool, initial: bytes = b"",
                 preface: bytes = b"") -> None:
        self.transport = transport
        self._client = client
        self._decoder = ws.Decoder(from_client=not client)
        self._pending = initial
        self._preface = preface
        self._lock = trio.Lock()  # the reader's pongs and close replies against the writer
        self._closed = False  # a close frame went out
        self._eof = False  # the peer's close frame came in
        self._keys = b""
        self._key_pos = 0
        if hasattr(transport, "send_nowait"):  # TLS: the relay's direct write
            self.send_nowait = self._send_nowait

    # ---- reading --------------------------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """The DERP bytes of every frame the next socket read completed; ``b""`` at EOF."""
        while not self._eof:
            data, self._pending = self._pending, b""
            if not data:
                data = await self.transport.receive_some(RECV_SIZE)
                if not data:
                    return b""
            try:
                payload, controls = self._decoder.feed(data)
            except ws.FrameError as e:
                await self._close_quietly(e.code, e.reason)
                raise
            if controls and not await self._control(controls):
                return payload  # a close: what came before it, then EOF
            if payload:
                return payload
        await trio.lowlevel.checkpoint()
        return b""

    async def _control(self, controls: list[tuple[int, bytes]]) -> bool:
        """Answer pings and a close; False once the peer has closed."""
        for opcode, payload in controls:
            if opcode == ws.OP_PING:
                await self._send_raw(self._with_preface(self._frame(ws.OP_PONG, payload)))
            elif opcode == ws.OP_CLOSE:
                self._eof = True
                self._pending = b""
                await self._close_quietly(ws.CLOSE_NORMAL, "", echo=payload[:2])
                return False
        return True

    # ---- writing --------------------------------------------------------------------------

    def _frame(self, opcode: int, payload: bytes) -> bytes:
        return ws.frame(opcode, payload, self._mask_keys(1) if self._client else None)

    def _mask_keys(self, count: int) -> bytes:
        """32 fresh random bits per frame (RFC 6455 §5.3), from a pool drawn from the OS at
        once."""
        pos, end = self._key_pos, self._key_pos + 4 * count
        if end > len(self._keys):
            self._keys, pos, end = os.urandom(max(4 * _KEYS, 4 * count)), 0, 4 * count
        self._key_pos = end
        return self._keys[pos:end]

    def _client_frames(self, chunks: list) -> list[bytes]:
        return ws.client_frames(chunks, self._mask_keys(len(chunks)))

    def _encode(self, data) -> bytes:
        if not data:  # the relay's writer flushing what a direct write left: no empty frame
            return self._with_preface(b"")
        if not self._client:
            out = ws.server_frames(data)
        else:
            view = memoryview(data)
            out = b"".join(self._client_frames([view[p:p + ws.MAX_OUT]
                                                for p in range(0, len(view), ws.MAX_OUT)]))
        return self._with_preface(out)

    def _with_preface(self, out: bytes) -> bytes:
        if self._preface:
            out, self._preface = self._preface + out, b""
        return out

    async def send_all(self, data) -> None:
        await self._send_raw(self._encode(data))

    async def send_records(self, chunks) -> None:
        """One message per chunk (as Tailscale's WebSocket client writes one per packet),
        over TLS one record each, in one socket write."""
        frames = (self._client_frames(chunks) if self._client
                  else [ws.frame(ws.OP_BINARY, c) for c in chunks])
        send = getattr(self.transport, "send_records", None)
        if send is None:
            await self._send_raw(b"".join(frames))
        else:
            await self._locked(send, frames)

    async def _send_raw(self, data: bytes) -> None:
        await self._locked(self.transport.send_all, data)

    async def _locked(self, send, data) -> None:
        await send_alone(self._lock, send, data)

    def can_send_now(self) -> bool:
        return not self._lock.locked() and self.transport.can_send_now()

    def _send_nowait(self, data) -> bool:
        return self.transport.send_nowait(self._encode(data))

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    # ---- closing --------------------------------------------------------------------------

    async def _close_quietly(self, code: int, reason: str, echo: bytes | None = None) -> None:
        """Our close frame, best effort and briefly (the peer may be gone or not reading)."""
        if self._closed or self._lock.locked():
            return
        self._closed = True
        payload = echo if echo is not None else ws.close_payload(code, reason)
        with trio.move_on_after(CLOSE_TIMEOUT):
            try:
                await self._send_raw(self._with_preface(self._frame(ws.OP_CLOSE, payload)))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def close(self, code: int, reason: str) -> None:
        """Close with ``code`` (the upgrade was refused: 1008), then the transport."""
        with trio.CancelScope(shield=True):
            await self._close_quietly(code, reason)
        await self.transport.aclose()

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self._close_quietly(ws.CLOSE_NORMAL, "")
        await self.transport.aclose()
