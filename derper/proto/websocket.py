"""WebSocket (RFC 6455) as DERP uses it (spec §1.6), pure: the upgrade's accept token and
answer, frames out, and a decoder that turns every complete frame of one read into the DERP
bytes they carry.

DERP over WebSocket is a byte stream in binary messages whose boundaries mean nothing, so the
decoder does not assemble messages: it hands back the payload of all data frames at once, one
socket read at a time, and the control frames beside it. A general library (wsproto) spends
about 12 µs per message of 1.3 kB on events and bookkeeping; this spends the unmasking and a
few index operations. No extensions (Go's server disables permessage-deflate too).

Unmasking is the C ``apply_mask`` of the ``websockets`` package's binary wheels: about 1,600
instructions (0.3 µs) per 1.3 kB frame, against 42,000 (6 µs) for the cheapest pure-Python
XOR, which is the fallback where that extension cannot be imported.
"""

from __future__ import annotations

import base64
import hashlib
import struct

from ..errors import ProtocolError

SUBPROTOCOL = "derp"
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
CLOSE_NORMAL, CLOSE_PROTOCOL, CLOSE_UNSUPPORTED, CLOSE_POLICY, CLOSE_TOO_BIG = \
    1000, 1002, 1003, 1008, 1009
MAX_PAYLOAD = 1 << 20  # per frame we read; Go's 32 KiB default is too small for a 64 KiB packet
MAX_OUT = 32 << 10  # per frame we write: what a Go peer's default read limit takes
_FIN = 0x80
_MASKED = 0x80
_H16 = struct.Struct(">H")
_H64 = struct.Struct(">Q")
# A client's usual frame: FIN + binary, masked, a 16-bit length (126..65535 bytes), the key.
_CLIENT_BINARY = struct.Struct(">HH4s")
_CLIENT_BINARY_HEAD = (_FIN | OP_BINARY) << 8 | _MASKED | 126
_XOR = [bytes(i ^ k for i in range(256)) for k in range(256)]  # k → translate table for ^k


class FrameError(ProtocolError):
    """The peer broke RFC 6455 (or sent text); ``code`` is the close code to answer with."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"WebSocket: {reason}")
        self.code = code
        self.reason = reason


# ---- the upgrade ------------------------------------------------------------------------------

def accept_token(key: bytes) -> bytes:
    """``Sec-WebSocket-Accept`` for a ``Sec-WebSocket-Key``."""
    return base64.b64encode(hashlib.sha1(key.strip() + _GUID).digest())


def offered(value: bytes | None) -> list[bytes]:
    """The subprotocols a ``Sec-WebSocket-Protocol`` value offers."""
    return [p.strip() for p in (value or b"").split(b",") if p.strip()]


def accept_response(key: bytes, subprotocol: str | None) -> bytes:
    """The server's ``101 Switching Protocols``."""
    head = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept_token(key) + b"\r\n")
    if subprotocol:
        head += b"Sec-WebSocket-Protocol: " + subprotocol.encode() + b"\r\n"
    return head + b"\r\n"


# ---- frames out -------------------------------------------------------------------------------

def mask_python(payload: bytes | bytearray, key: bytes) -> bytearray:
    """``payload`` XOR the 4-byte ``key`` repeated (masking and unmasking alike), in pure
    Python: four strided ``translate`` passes, one per key byte, the cheapest XOR pure Python
    has (about 42k instructions for 1.3 kB, against 53k for a big-integer XOR)."""
    if isinstance(payload, memoryview):
        payload = bytes(payload)
    out = bytearray(payload)
    k0, k1, k2, k3 = key
    out[0::4] = payload[0::4].translate(_XOR[k0])
    out[1::4] = payload[1::4].translate(_XOR[k1])
    out[2::4] = payload[2::4].translate(_XOR[k2])
    out[3::4] = payload[3::4].translate(_XOR[k3])
    return out


try:  # the same bytes, in C (websockets' binary wheels)
    from websockets.speedups import apply_mask as mask
except ImportError:  # a platform without the wheel's extension
    mask = mask_python


def _header(opcode: int, n: int, masked: bool) -> bytes:
    m = _MASKED if masked else 0
    if n < 126:
        return bytes((_FIN | opcode, m | n))
    if n < 65536:
        return bytes((_FIN | opcode, m | 126)) + _H16.pack(n)
    return bytes((_FIN | opcode, m | 127)) + _H64.pack(n)


def frame(opcode: int, payload: bytes | memoryview, key: bytes | None = None) -> bytes:
    """One final frame; masked with ``key`` (a client's), else plain (a server's)."""
    if key is None:
        return _header(opcode, len(payload), False) + payload
    return _header(opcode, len(payload), True) + key + mask(payload, key)


def client_frames(chunks, keys: bytes) -> list[bytes]:
    """Each chunk as one masked binary message (a client's, as Tailscale's writes one per
    packet), chunk ``i`` masked with ``keys[4i:4i + 4]``."""
    pack = _CLIENT_BINARY.pack
    out = []
    pos = 0
    for chunk in chunks:
        key = keys[pos:pos + 4]
        pos += 4
        n = len(chunk)
        out.append(pack(_CLIENT_BINARY_HEAD, n, key) + mask(chunk, key) if 126 <= n < 65536
                   else frame(OP_BINARY, chunk, key))
    return out


def server_frames(data: bytes | bytearray | memoryview) -> bytes:
    """``data`` as binary messages of at most ``MAX_OUT`` bytes each, unmasked: a writer's
    whole batch in one buffer, for one socket write."""
    n = len(data)
    if n <= MAX_OUT:
        return _header(OP_BINARY, n, False) + data
    view = memoryview(data)
    parts = []
    for pos in range(0, n, MAX_OUT):
        chunk = view[pos:pos + MAX_OUT]
        parts += (_header(OP_BINARY, len(chunk), False), chunk)
    return b"".join(parts)


def close_payload(code: int, reason: str = "") -> bytes:
    return _H16.pack(code) + reason.encode()[:123]


# ---- frames in --------------------------------------------------------------------------------

class Decoder:
    """Frames from one peer; ``from_client`` frames must be masked, a server's must not."""

    __slots__ = ("_buf", "_from_client", "_in_message")

    def __init__(self, *, from_client: bool) -> None:
        self._buf = b""
        self._from_client = from_client
        self._in_message = False  # a binary message is open: continuation frames may follow

    def feed(self, data: bytes) -> tuple[bytes, list[tuple[int, bytes]]]:
        """The DERP bytes of every complete data frame so far, and the control frames
        ``(opcode, payload)`` among them. Raises FrameError."""
        buf = self._buf + data if self._buf else data
        end = len(buf)
        pos = 0
        out = []
        controls = []
        want_mask = _MASKED if self._from_client else 0
        view = None
        if want_mask:  # the fast path: a run of a client's usual frames (one per packet)
            unpack_from = _CLIENT_BINARY.unpack_from
            while end - pos >= 8:
                first, n, key = unpack_from(buf, pos)  # the first two bytes, as one word
                stop = pos + 8 + n
                if first != _CLIENT_BINARY_HEAD or stop > end:
                    break
                out.append(mask(buf[pos + 8:stop], key))
                pos = stop
            if out:
                self._in_message = False
        while end - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            n = b1 & 0x7F
            head = pos + 2
            if n == 126:
                if end - head < 2:
                    break
                n = _H16.unpack_from(buf, head)[0]
                head += 2
            elif n == 127:
                if end - head < 8:
                    break
                n = _H64.unpack_from(buf, head)[0]
                head += 8
                if n > MAX_PAYLOAD:
                    raise FrameError(CLOSE_TOO_BIG, f"frame of {n} bytes is too large")
            if b1 & _MASKED != want_mask:
                raise FrameError(CLOSE_PROTOCOL, "client frames must be masked, server frames "
                                                 "must not")
            start = head + 4 if want_mask else head
            stop = start + n
            if stop > end:
                break
            if b0 & 0x70:
                raise FrameError(CLOSE_PROTOCOL, "reserved bits set (no extension agreed)")
            opcode = b0 & 0x0F
            if want_mask:
                payload = mask(buf[start:stop], buf[head:start])
            else:  # a server's: copied once, by the join below
                if view is None:
                    view = memoryview(buf)
                payload = view[start:stop]
            if opcode == OP_BINARY or (opcode == OP_CONTINUATION and self._in_message):
                out.append(payload)
                self._in_message = not b0 & _FIN
            elif opcode >= OP_CLOSE and opcode <= OP_PONG:
                if n > 125 or not b0 & _FIN:
                    raise FrameError(CLOSE_PROTOCOL, "control frame fragmented or too long")
                controls.append((opcode, bytes(payload)))
            elif opcode == OP_TEXT:
                raise FrameError(CLOSE_UNSUPPORTED, "DERP needs binary messages")
            else:
                raise FrameError(CLOSE_PROTOCOL, f"unexpected opcode {opcode:#x}")
            pos = stop
        self._buf = buf[pos:]
        if len(self._buf) > MAX_PAYLOAD + 14:  # a header and a partial frame at most
            raise FrameError(CLOSE_TOO_BIG, "frame too large")
        return (out[0] if len(out) == 1 and want_mask else b"".join(out)), controls
