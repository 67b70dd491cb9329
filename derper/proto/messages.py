"""What a DERP client receives: one type per server frame, and ``decode`` from frame to message.

Pure, so a client, a mesh link or a diagnostic decodes frames the same way without a socket.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ProtocolError
from . import wire
from .wire import FrameType

# Payload bounds of a client's FrameReader: a RecvPacket holds one full packet; every other
# frame is bounded by wire.MAX_FRAME_LEN, as a Go client bounds it.
LIMITS = {FrameType.RECV_PACKET: wire.KEY_LEN + wire.MAX_PACKET_SIZE}


@dataclass(frozen=True)
class ReceivedPacket:
    source: bytes
    data: bytes


@dataclass(frozen=True)
class PeerGoneMessage:
    peer: bytes
    reason: int


@dataclass(frozen=True)
class KeepAliveMessage:
    pass


@dataclass(frozen=True)
class PingMessage:
    data: bytes


@dataclass(frozen=True)
class PongMessage:
    data: bytes


@dataclass(frozen=True)
class HealthMessage:
    problem: str


@dataclass(frozen=True)
class RestartingMessage:
    reconnect_in_ms: int
    try_for_ms: int


PeerPresentMessage = wire.PeerPresent
Message = (ReceivedPacket | PeerGoneMessage | PeerPresentMessage | KeepAliveMessage
           | PingMessage | PongMessage | HealthMessage | RestartingMessage)


def decode(ftype: int, payload: bytes) -> Message | None:
    """The message a frame carries; None for frames a client skips (ServerKey, ServerInfo after
    the handshake, unknown types: spec §2.2). A malformed payload is a ``ProtocolError``."""
    if ftype == FrameType.RECV_PACKET:
        if len(payload) < wire.KEY_LEN:
            raise ProtocolError(f"RecvPacket payload of {len(payload)} bytes is too short")
        return ReceivedPacket(payload[:wire.KEY_LEN], payload[wire.KEY_LEN:])
    if ftype == FrameType.KEEP_ALIVE:
        return KeepAliveMessage()
    if ftype == FrameType.PING:
        return PingMessage(payload)
    if ftype == FrameType.PONG:
        return PongMessage(payload)
    if ftype == FrameType.PEER_GONE:
        return PeerGoneMessage(*wire.parse_peer_gone(payload))
    if ftype == FrameType.PEER_PRESENT:
        return wire.parse_peer_present(payload)
    if ftype == FrameType.HEALTH:
        return HealthMessage(payload.decode("utf-8", "replace"))
    if ftype == FrameType.RESTARTING:
        return RestartingMessage(*wire.parse_restarting(payload))
    return None
