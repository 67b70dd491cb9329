"""A reader writes packets to an idle destination itself (``Outbox.flush``); the writer
takes over whenever that could block or reorder frames. Over real TLS on loopback."""

from __future__ import annotations

import socket
import sys

import pytest
import trio

from derper import client as dc
from derper.metrics.counters import DropReason
from derper.net.tls_stream import TLSStream
from derper.proto import wire
from derper.proto.messages import KeepAliveMessage, PeerGoneMessage, PongMessage, ReceivedPacket
from derper.relay.outbox import Outbox
from tests.conftest import url
from tests.relay_helpers import assert_relays, connect_opts, expect_closed, recv_kind, wait_until


@pytest.fixture
def direct_writes(monkeypatch) -> list[bool]:
    """What every reader's direct write (``Outbox.flush``'s ``send_nowait``) returned (True:
    the kernel took it all); the writers' own calls are not counted."""
    calls: list[bool] = []
    real = TLSStream.send_nowait

    def spy(self, data):
        done = real(self, data)
        if sys._getframe(1).f_code is Outbox.flush.__code__:
            calls.append(done)
        return done

    monkeypatch.setattr(TLSStream, "send_nowait", spy)
    return calls


async def test_packets_to_an_idle_receiver_go_out_from_the_senders_read(start_server, ca,
                                                                        direct_writes):
    server = await start_server(tls=True)
    stats = server.relay.stats
    async with dc.connect(url(server), **connect_opts(server, ca)) as a, \
            dc.connect(url(server), **connect_opts(server, ca)) as b:
        await assert_relays(a, b)  # both writers have started and parked
        direct_writes.clear()
        sent_before, ones_before = stats.packets_sent, stats.buffered_write_frames.by_value[1]
        for i in range(20):
            await a.send(b.public_key, i.to_bytes(2, "big"))
            assert (await recv_kind(b, ReceivedPacket)).data == i.to_bytes(2, "big")
        await a.send_many([(b.public_key, bytes([i])) for i in range(5)])  # one read, one write
        assert [(await recv_kind(b, ReceivedPacket)).data for _ in range(5)] == \
            [bytes([i]) for i in range(5)]
    assert direct_writes == [True] * 21
    assert stats.packets_sent - sent_before == 25
    assert stats.buffered_write_frames.by_value[1] - ones_before == 20


async def test_a_control_frame_due_hands_the_read_to_the_writer(start_server, ca,
                                                                direct_writes):
    """A Ping read after a packet for the same idle client: its writer sends pong and
    packets in its own order, and writing directly resumes once it is idle again."""
    server = await start_server(tls=True)
    async with dc.connect(url(server), **connect_opts(server, ca)) as a:
        await assert_relays(a, a)
        direct_writes.clear()
        me = a.public_key
        await a.send_frames([wire.send_packet(me, b"p1"), wire.ping(b"12345678"),
                             wire.send_packet(me, b"p2")])
        got = [await recv_kind(a, (ReceivedPacket, PongMessage)) for _ in range(3)]
        assert [m.data for m in got] == [b"12345678", b"p1", b"p2"]
        assert direct_writes == []
        await assert_relays(a, a, b"p3")
        assert direct_writes == [True]


async def test_a_receiver_that_does_not_read_gets_the_rest_from_its_writer(start_server, ca,
                                                                           direct_writes):
    """The socket of a stalled receiver fills during a direct write: the reader leaves the
    rest to the writer and keeps relaying for others; order and counters stay whole."""
    server = await start_server(tls=True, tcp_write_timeout=0)
    stats = server.relay.stats
    opts = connect_opts(server, ca)
    async with dc.connect(url(server), **opts) as sender, \
            dc.connect(url(server), **opts) as stalled, \
            dc.connect(url(server), **opts) as c, dc.connect(url(server), **opts) as d:
        await assert_relays(sender, stalled)
        server_side = server.relay.router.active[stalled.public_key].stream.transport.socket
        server_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        seq = 0
        with trio.fail_after(30):
            while False not in direct_writes:
                seq += 1
                await sender.send(stalled.public_key, seq.to_bytes(8, "big") + bytes(8 << 10))
                if seq % 8 == 0:
                    await assert_relays(c, d)  # the stall costs others nothing
        for _ in range(100):  # more while the writer waits: these queue and head-drop
            seq += 1
            await sender.send(stalled.public_key, seq.to_bytes(8, "big") + bytes(8 << 10))
        await assert_relays(c, d)
        await sender.send(stalled.public_key, b"last")
        got = []
        with trio.fail_after(30):
            while (m := await recv_kind(stalled, ReceivedPacket)).data != b"last":
                got.append(int.from_bytes(m.data[:8], "big"))
    assert got == sorted(got) and got[-1] == seq
    assert stats.dropped(DropReason.QUEUE_HEAD) == seq - len(got) > 0
    # Whatever was carried over from a partial direct write is counted once it went out.
    await wait_until(lambda: stats.packets_sent
                     == stats.packets_received - stats.dropped(DropReason.QUEUE_HEAD))


async def test_what_a_direct_write_left_is_under_the_write_deadline(start_server, ca,
                                                                    direct_writes):
    server = await start_server(tls=True, tcp_write_timeout=0.5)
    stats = server.relay.stats
    opts = connect_opts(server, ca)
    async with dc.connect(url(server), **opts) as sender, \
            dc.connect(url(server), **opts) as stalled, dc.connect(url(server), **opts) as c:
        await assert_relays(sender, stalled)
        server_side = server.relay.router.active[stalled.public_key].stream.transport.socket
        server_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        big = bytes(wire.MAX_PACKET_SIZE)
        with trio.fail_after(30):
            while stats.sclient_write_timeouts == 0:
                await sender.send_many([(stalled.public_key, big)] * 4)
                await assert_relays(c, sender, b"still flowing")
                await trio.sleep(0.01)
        await wait_until(lambda: stalled.public_key not in server.relay.router.conns)
        await assert_relays(sender, c)
    assert False in direct_writes
    assert stats.dropped(DropReason.WRITE_ERROR) > 0


async def test_packets_a_read_queued_before_a_protocol_error_still_go_out(start_server, ca):
    server = await start_server(tls=True)
    opts = connect_opts(server, ca)
    async with dc.connect(url(server), **opts) as bad, dc.connect(url(server), **opts) as b, \
            dc.connect(url(server), **opts) as c:
        await assert_relays(bad, b)
        await bad.send_frames([wire.send_packet(b.public_key, b"before"),
                               wire.header(wire.FrameType.SEND_PACKET, 4) + b"oops"])
        await expect_closed(bad)
        skip = (KeepAliveMessage, PeerGoneMessage)
        assert (await recv_kind(b, ReceivedPacket, skip)).data == b"before"
        await c.send(b.public_key, b"after")
        assert (await recv_kind(b, ReceivedPacket, skip)).data == b"after"
