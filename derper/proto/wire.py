"""DERP v2 framing: frame types, encoders, decoders and an incremental frame reader.

Sans-IO: nothing here touches a socket. A frame is a 1-byte type, a 4-byte big-endian payload
length and the payload (spec §2). All multi-byte integers are big-endian.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Collection, Mapping

from ..errors import ProtocolError

MAGIC = b"DERP\xf0\x9f\x94\x91"  # "DERP🔑"
PROTOCOL_VERSION = 2
HEADER_LEN = 5
KEY_LEN = 32
NONCE_LEN = 24
MAX_PACKET_SIZE = 64 << 10
MAX_INFO_LEN = 1 << 20
MAX_FRAME_LEN = 1 << 20  # what a Go client accepts; we apply it to every frame we do not know
CLIENT_INFO_MIN = KEY_LEN + NONCE_LEN
CLIENT_INFO_MAX = 256 << 10
PING_MAX = 1000
PEER_PRESENT_LEN = 51
DISCO_MAGIC = b"TS\xf0\x9f\x92\xac"  # "TS💬"
DISCO_MIN_LEN = 62

ALL_TYPES = frozenset(range(256))

_HEADER = struct.Struct(">BI")
_U32X2 = struct.Struct(">II")


class FrameType(IntEnum):
    SERVER_KEY = 0x01
    CLIENT_INFO = 0x02
    SERVER_INFO = 0x03
    SEND_PACKET = 0x04
    RECV_PACKET = 0x05
    KEEP_ALIVE = 0x06
    NOTE_PREFERRED = 0x07
    PEER_GONE = 0x08
    PEER_PRESENT = 0x09
    FORWARD_PACKET = 0x0A
    WATCH_CONNS = 0x10
    CLOSE_PEER = 0x11
    PING = 0x12
    PONG = 0x13
    HEALTH = 0x14
    RESTARTING = 0x15


class PeerGoneReason(IntEnum):
    DISCONNECTED = 0x00
    NOT_HERE = 0x01
    MESH_CONN_BROKE = 0xF0  # never on the wire; a mesh client invents it locally


class PeerPresentFlags:
    REGULAR = 0x01
    MESH = 0x02
    PROBER = 0x04
    NOT_IDEAL = 0x08


def is_disco(buf: bytes, start: int = 0, end: int | None = None) -> bool:
    """Whether ``buf[start:end]`` is a Tailscale disco message (selects queue and metric kind)."""
    if end is None:
        end = len(buf)
    return end - start >= DISCO_MIN_LEN and buf.startswith(DISCO_MAGIC, start)


# ---- encoders -------------------------------------------------------------------------------

def frame(ftype: int, payload: bytes = b"") -> bytes:
    return _HEADER.pack(ftype, len(payload)) + payload


def header(ftype: int, length: int) -> bytes:
    return _HEADER.pack(ftype, length)


# ``pack_header_into(buf, offset, ftype, length)``: ``header`` written in place (the relay's hot
# path builds each frame in one buffer).
pack_header_into = _HEADER.pack_into


def server_key(public: bytes) -> bytes:
    return frame(FrameType.SERVER_KEY, MAGIC + public)


def send_packet(dst: bytes, packet: bytes) -> bytes:
    _check_packet(packet)
    return header(FrameType.SEND_PACKET, KEY_LEN + len(packet)) + dst + packet


def recv_packet(src: bytes, packet: bytes) -> bytes:
    _check_packet(packet)
    return header(FrameType.RECV_PACKET, KEY_LEN + len(packet)) + src + packet


def forward_packet(src: bytes, dst: bytes, packet: bytes) -> bytes:
    _check_packet(packet)
    return header(FrameType.FORWARD_PACKET, 2 * KEY_LEN + len(packet)) + src + dst + packet


KEEP_ALIVE = frame(FrameType.KEEP_ALIVE)
WATCH_CONNS = frame(FrameType.WATCH_CONNS)


def note_preferred(preferred: bool) -> bytes:
    return frame(FrameType.NOTE_PREFERRED, b"\x01" if preferred else b"\x00")


def peer_gone(key: bytes, reason: int) -> bytes:
    return frame(FrameType.PEER_GONE, key + bytes((reason,)))


_V4_MAPPED = b"\x00" * 10 + b"\xff\xff"


def _ipv4_packed(ip: str) -> bytes | None:
    """Dotted-quad IPv4 as ``ipaddress`` reads it (four decimal octets, no leading zeros), or
    None for anything else; a fifth of its cost, and PeerPresent goes out once per connect per
    watcher (every mesh peer and sibling worker, in a storm)."""
    parts = ip.split(".")
    if len(parts) != 4:
        return None
    for p in parts:
        if not (p.isascii() and p.isdigit() and len(p) <= 3) or (p[0] == "0" and len(p) > 1):
            return None
    octets = [int(p) for p in parts]
    return bytes(octets) if max(octets) <= 255 else None


def peer_present(key: bytes, ip: str | None, port: int, flags: int) -> bytes:
    ip16 = bytes(16)
    if ip:
        v4 = _ipv4_packed(ip)
        # Not IPv4 (which the fast path reads whole): IPv6, or a ValueError for no address.
        ip16 = ipaddress.IPv6Address(ip).packed if v4 is None else _V4_MAPPED + v4
    return frame(FrameType.PEER_PRESENT, key + ip16 + struct.pack(">HB", port, flags))


def close_peer(key: bytes) -> bytes:
    return frame(FrameType.CLOSE_PEER, key)


def ping(data: bytes) -> bytes:
    return frame(FrameType.PING, data)


def pong(data: bytes) -> bytes:
    return frame(FrameType.PONG, data)


def health(problem: str) -> bytes:
    return frame(FrameType.HEALTH, problem.encode())


def restarting(reconnect_in_ms: int, try_for_ms: int) -> bytes:
    return frame(FrameType.RESTARTING, _U32X2.pack(reconnect_in_ms, try_for_ms))


def _check_packet(packet: bytes) -> None:
    if len(packet) > MAX_PACKET_SIZE:
        raise ValueError(f"packet of {len(packet)} bytes exceeds the {MAX_PACKET_SIZE}-byte limit")


# ---- decoders for the frames a client receives ------------------------------------------------

@dataclass(frozen=True)
class PeerPresent:
    key: bytes
    ip: str | None  # None when the server did not say (old 32-byte form, or all zeros)
    port: int
    flags: int


def parse_peer_present(payload: bytes) -> PeerPresent:
    """Accepts the old 32-byte form, the 50-byte form without flags and longer future forms."""
    if len(payload) < KEY_LEN:
        raise ProtocolError(f"PeerPresent payload of {len(payload)} bytes is too short")
    key = bytes(payload[:KEY_LEN])
    if len(payload) < KEY_LEN + 18:
        return PeerPresent(key, None, 0, 0)
    raw = bytes(payload[KEY_LEN:KEY_LEN + 16])
    port = int.from_bytes(payload[KEY_LEN + 16:KEY_LEN + 18], "big")
    flags = payload[KEY_LEN + 18] if len(payload) > KEY_LEN + 18 else 0
    if raw == bytes(16):
        return PeerPresent(key, None, port, flags)
    if raw[:12] == _V4_MAPPED:
        return PeerPresent(key, "%d.%d.%d.%d" % tuple(raw[12:]), port, flags)
    return PeerPresent(key, str(ipaddress.IPv6Address(raw)), port, flags)


def parse_peer_gone(payload: bytes) -> tuple[bytes, int]:
    """(key, reason); old servers omitted the reason byte, which then means Disconnected."""
    if len(payload) < KEY_LEN:
        raise ProtocolError(f"PeerGone payload of {len(payload)} bytes is too short")
    reason = payload[KEY_LEN] if len(payload) > KEY_LEN else PeerGoneReason.DISCONNECTED
    return bytes(payload[:KEY_LEN]), reason


def parse_restarting(payload: bytes) -> tuple[int, int]:
    if len(payload) < 8:
        raise ProtocolError(f"Restarting payload of {len(payload)} bytes is too short")
    return _U32X2.unpack_from(payload)


def parse_server_key(payload: bytes) -> bytes:
    if len(payload) < len(MAGIC) + KEY_LEN or bytes(payload[:len(MAGIC)]) != MAGIC:
        raise ProtocolError("ServerKey frame lacks the DERP magic")
    return bytes(payload[len(MAGIC):len(MAGIC) + KEY_LEN])


# ---- incremental reader -----------------------------------------------------------------------

class FrameReader:
    """Splits a byte stream into frames without copying payloads.

    ``feed`` appends received bytes; ``next`` returns ``(type, start, end)`` of the next complete
    frame whose payload is ``reader.data[start:end]``, or ``None`` when more bytes are needed.
    The buffer is immutable ``bytes`` so slices of it (keys, payloads) are single allocations and
    views stay valid after later feeds.

    ``limits`` bounds the payload length per type, ``default_limit`` all other types; a larger
    length is a ``ProtocolError``. Frames of types outside ``wanted`` are skipped as they stream
    past and never buffered, so a peer cannot make us hold more than one wanted frame.
    """

    __slots__ = ("data", "pos", "_skip", "_limits", "_default_limit", "_wanted")

    def __init__(self, limits: Mapping[int, int], default_limit: int = MAX_FRAME_LEN,
                 wanted: Collection[int] | None = None) -> None:
        self.data = b""
        self.pos = 0
        self._skip = 0
        self._limits = dict(limits)
        self._default_limit = default_limit
        self._wanted = frozenset(wanted if wanted is not None else limits)

    def feed(self, chunk: bytes) -> None:
        if self._skip:
            n = min(self._skip, len(chunk))
            self._skip -= n
            chunk = chunk[n:]
        if self.pos >= len(self.data):
            self.data = bytes(chunk)
        else:
            self.data = self.data[self.pos:] + chunk
        self.pos = 0

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return len(self.data) - self.pos

    def peek_type(self) -> int | None:
        """Type byte of the next frame, as soon as it has arrived."""
        return self.data[self.pos] if len(self.data) > self.pos else None

    def want(self, types: Collection[int]) -> None:
        """Change which frame types are returned (the rest are skipped)."""
        self._wanted = frozenset(types)

    def next(self) -> tuple[int, int, int] | None:
        while True:
            data, pos = self.data, self.pos
            if len(data) - pos < HEADER_LEN:
                return None
            ftype, length = _HEADER.unpack_from(data, pos)
            limit = self._limits.get(ftype, self._default_limit)
            if length > limit:
                raise ProtocolError(
                    f"frame type {ftype:#04x} with length {length} exceeds the limit of {limit}")
            start = pos + HEADER_LEN
            end = start + length
            if ftype in self._wanted:
                if end > len(data):
                    return None
                self.pos = end
                return ftype, start, end
            # Not a type the consumer handles: discard it, including bytes not yet received.
            if end > len(data):
                self._skip = end - len(data)
                self.data, self.pos = b"", 0
                return None
            self.pos = end
