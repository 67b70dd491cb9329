"""A client connection's protocol rules and owed frames, without sockets (``relay.conn``)."""

from __future__ import annotations

import pytest

from derper.errors import ProtocolError
from derper.metrics.counters import Stats
from derper.proto import wire
from derper.proto.wire import FrameType, PeerGoneReason, PeerPresentFlags
from derper.relay.conn import ClientConn, Event

K, SERVER, OTHER = b"\x01" * 32, b"\x02" * 32, b"\x03" * 32


def conn(*, can_mesh=False, key=K, **kw) -> ClientConn:
    opts = {"is_prober": False, "not_ideal": False, "connected_at": 0.0, **kw}
    return ClientConn(key, Stats(), server_key=SERVER, can_mesh=can_mesh, **opts)


def receive(c: ClientConn, ftype: int, payload: bytes, now: float = 1.0):
    buf = bytearray(b"xx" + payload)  # payload at an offset, as in a read buffer
    return c.receive(ftype, buf, 2, 2 + len(payload), now)


def written(c: ClientConn) -> list[bytes]:
    batch: list = []
    c.head(batch)
    batch.append(b"<packets>")
    c.tail(batch)
    c.written()
    return batch


def test_present_flags():
    assert conn().present_flags == PeerPresentFlags.REGULAR
    assert conn(can_mesh=True, is_prober=True, not_ideal=True).present_flags == (
        PeerPresentFlags.MESH | PeerPresentFlags.PROBER | PeerPresentFlags.NOT_IDEAL)


def test_one_pending_pong_and_its_counters():
    c = conn()
    assert receive(c, FrameType.PING, b"12345678extra") is Event.WAKE
    assert receive(c, FrameType.PING, b"abcdefgh") is None  # a pong is already pending
    assert c.pending() and c.stats.got_ping == 2
    assert written(c) == [wire.pong(b"12345678"), b"<packets>"]
    assert c.stats.sent_pong == 1 and not c.pending()
    with pytest.raises(ProtocolError, match="shorter than 8"):
        receive(c, FrameType.PING, b"1234567")


def test_control_frames_are_written_around_the_packets_in_order():
    c = conn()
    c.presence_gone(OTHER)
    c.peer_present(K, "192.0.2.1", 41641, 1)
    c.peer_gone(OTHER, PeerGoneReason.NOT_HERE)
    c.peer_gone(OTHER, PeerGoneReason.DISCONNECTED)  # coalesced by key: the last one wins
    c.restarting(wire.restarting(1000, 30000))
    c.keepalive()
    assert written(c) == [wire.KEEP_ALIVE, wire.peer_gone(OTHER, PeerGoneReason.DISCONNECTED),
                          b"<packets>", wire.peer_gone(OTHER, PeerGoneReason.DISCONNECTED),
                          wire.peer_present(K, "192.0.2.1", 41641, 1),
                          wire.restarting(1000, 30000)]
    assert (c.stats.peer_gone_disconnected_frames, c.stats.peer_gone_not_here_frames) == (1, 0)
    assert not c.restart_pending and not c.pending()


def test_restarting_queued_during_a_write_stays_pending():
    c = conn()
    c.restarting(b"first")
    batch: list = []
    c.head(batch)
    c.tail(batch)
    c.restarting(b"second")  # arrives while the batch is being written
    c.written()
    assert c.restart_pending


def test_not_here_is_rate_limited_per_sender():
    c = conn()
    assert [c.not_here(OTHER, 0.0) for _ in range(4)] == [True, True, True, False]
    assert c.not_here(OTHER, 1.0) is True  # one token a second


def test_note_preferred_counts_moves_after_the_grace():
    c = conn(connected_at=100.0)
    assert receive(c, FrameType.NOTE_PREFERRED, b"\x01", now=101.0) is None
    assert c.preferred and c.stats.current_home_connections == 1
    assert c.stats.home_moves_in == 0  # within 5 s of connecting: not a move
    receive(c, FrameType.NOTE_PREFERRED, b"\x00", now=110.0)
    assert (c.stats.current_home_connections, c.stats.home_moves_out) == (0, 1)
    with pytest.raises(ProtocolError, match="exactly one byte"):
        receive(c, FrameType.NOTE_PREFERRED, b"")


@pytest.mark.parametrize("ftype, payload, name", [
    (FrameType.FORWARD_PACKET, bytes(64), "ForwardPacket"),
    (FrameType.WATCH_CONNS, b"", "WatchConns"),
    (FrameType.CLOSE_PEER, bytes(32), "ClosePeer"),
])
def test_mesh_frames_need_the_mesh_key(ftype, payload, name):
    with pytest.raises(ProtocolError, match=f"{name} requires the mesh key"):
        receive(conn(), ftype, payload)


def test_mesh_frames_with_the_mesh_key():
    c = conn(can_mesh=True)  # (its ForwardPacket frames are routed by the session)
    assert receive(c, FrameType.WATCH_CONNS, b"") is Event.WATCH
    assert receive(c, FrameType.CLOSE_PEER, OTHER) is Event.CLOSE_PEER
    with pytest.raises(ProtocolError, match="exactly one key"):
        receive(c, FrameType.CLOSE_PEER, bytes(33))
    # A node watching itself (its own server key as client key) is not enrolled.
    assert receive(conn(can_mesh=True, key=SERVER), FrameType.WATCH_CONNS, b"") is None


def test_frames_a_server_ignores():
    c = conn()
    for ftype in (FrameType.PONG, FrameType.KEEP_ALIVE, 0x7f):
        assert receive(c, ftype, b"anything") is None
    assert not c.pending()
