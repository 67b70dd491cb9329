"""proto/messages.decode: every frame a client receives, malformed payloads, skipped types."""

from __future__ import annotations

import pytest

from derper.errors import ProtocolError
from derper.proto import messages, wire
from derper.proto.messages import (HealthMessage, KeepAliveMessage, PeerGoneMessage, PingMessage,
                                   PongMessage, ReceivedPacket, RestartingMessage, decode)
from derper.proto.wire import FrameReader, FrameType, PeerGoneReason, PeerPresent

K = bytes.fromhex("50d20b455ecf12bc453f83c2cfdb2a24925d06cf2598dcaa54e91af82ce9f765")


def decode_frame(frame: bytes):
    """Decode one encoded frame the way a client reads it: through a FrameReader."""
    reader = FrameReader(messages.LIMITS, wanted=wire.ALL_TYPES)
    reader.feed(frame)
    ftype, start, end = reader.next()
    return decode(ftype, reader.data[start:end])


@pytest.mark.parametrize("frame, expected", [
    (wire.recv_packet(K, b"hello"), ReceivedPacket(K, b"hello")),
    (wire.recv_packet(K, b""), ReceivedPacket(K, b"")),
    (wire.KEEP_ALIVE, KeepAliveMessage()),
    (wire.ping(b"12345678"), PingMessage(b"12345678")),
    (wire.pong(b"12345678"), PongMessage(b"12345678")),
    (wire.peer_gone(K, PeerGoneReason.NOT_HERE), PeerGoneMessage(K, PeerGoneReason.NOT_HERE)),
    (wire.frame(FrameType.PEER_GONE, K), PeerGoneMessage(K, PeerGoneReason.DISCONNECTED)),
    (wire.peer_present(K, "198.51.100.7", 41641, 1), PeerPresent(K, "198.51.100.7", 41641, 1)),
    (wire.frame(FrameType.PEER_PRESENT, K), PeerPresent(K, None, 0, 0)),
    (wire.health("duplicate"), HealthMessage("duplicate")),
    (wire.health(""), HealthMessage("")),
    (wire.frame(FrameType.HEALTH, b"bad \xff utf-8"), HealthMessage("bad \ufffd utf-8")),
    (wire.restarting(1500, 10000), RestartingMessage(1500, 10000)),
])
def test_every_server_frame_decodes(frame, expected):
    assert decode_frame(frame) == expected


@pytest.mark.parametrize("frame", [
    wire.server_key(K),  # a fast-start client skips it
    wire.frame(FrameType.SERVER_INFO, bytes(40)),
    wire.send_packet(K, b"x"),  # client → server types mean nothing to a client
    wire.frame(FrameType.CLIENT_INFO, bytes(56)),
    wire.note_preferred(True),
    wire.WATCH_CONNS,
    wire.frame(0x7F, b"future"),
    wire.frame(0xFF),
])
def test_other_types_are_skipped(frame):
    assert decode_frame(frame) is None


@pytest.mark.parametrize("ftype, payload", [
    (FrameType.RECV_PACKET, K[:31]),
    (FrameType.RECV_PACKET, b""),
    (FrameType.PEER_GONE, K[:31]),
    (FrameType.PEER_PRESENT, K[:10]),
    (FrameType.RESTARTING, b"\x00" * 7),
])
def test_malformed_payloads_are_protocol_errors(ftype, payload):
    with pytest.raises(ProtocolError, match="too short"):
        decode(ftype, payload)


def test_client_limits_allow_a_full_packet_and_no_more():
    reader = FrameReader(messages.LIMITS, wanted=wire.ALL_TYPES)
    reader.feed(wire.recv_packet(K, bytes(wire.MAX_PACKET_SIZE)))
    assert reader.next() is not None
    reader.feed(wire.header(FrameType.RECV_PACKET, wire.KEY_LEN + wire.MAX_PACKET_SIZE + 1))
    with pytest.raises(ProtocolError):
        reader.next()
